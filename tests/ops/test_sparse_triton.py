"""Triton dataflows (implicit GEMM, gather-GEMM-scatter, wgrad) vs the dense float64 reference.

Without CUDA these run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
so sizes stay tiny. Real-GPU tests are marked `gpu`.
"""
import pytest
import torch

from bevfusion.ops.sparse import SparseTensor, sparse_conv3d, sparse_inverse_conv3d, subm_conv3d
from bevfusion.ops.sparse.reference import dense_conv, dense_inverse_conv

from test_sparse import random_tensor

pytest.importorskip("triton")

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _rows(feats, n):
    """n feature rows taken from `feats` (repeated when the strided conv made more sites than it had)."""
    return feats.repeat(-(-n // feats.shape[0]), 1)[:n]


def _case(kind, x, w, impl, dataflow="auto"):
    if kind == "subm":
        return subm_conv3d(x, w, 3, impl=impl, dataflow=dataflow)
    if kind == "conv":
        return sparse_conv3d(x, w, 3, 2, 1, impl=impl, dataflow=dataflow)
    if kind == "conv_aniso":
        return sparse_conv3d(x, w, (1, 1, 3), (1, 1, 2), 0, impl=impl, dataflow=dataflow)
    ones = torch.ones(27, x.feats.shape[1], x.feats.shape[1], dtype=x.feats.dtype, device=x.feats.device)
    y = sparse_conv3d(x, ones, 3, 2, 1)
    return sparse_inverse_conv3d(y.replace_feature(_rows(x.feats, y.feats.shape[0])), w, 3, 2, 1, impl=impl,
                                 dataflow=dataflow)


def _reference(kind, x64, w64):
    if kind == "subm":
        return dense_conv(x64, w64, 3, subm=True)[1]
    if kind == "conv":
        return dense_conv(x64, w64, 3, 2, 1)[1]
    if kind == "conv_aniso":
        return dense_conv(x64, w64, (1, 1, 3), (1, 1, 2), 0)[1]
    y = sparse_conv3d(x64, torch.ones(27, x64.feats.shape[1], x64.feats.shape[1], dtype=torch.float64), 3, 2, 1)
    y = y.replace_feature(_rows(x64.feats, y.feats.shape[0]))
    return dense_inverse_conv(y, w64, 3, 2, 1, 1, x64.coords, x64.spatial_shape)


def _tiny(dtype, cin=5, seed=0):
    return random_tensor(shape=(5, 5, 4), batch=3, density=0.25, cin=cin, seed=seed, empty=(1,), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dataflow", ["igemm", "gather"])
@pytest.mark.parametrize("kind", ["subm", "conv", "conv_aniso", "inverse"])
def test_triton_forward_backward(kind, dataflow, dtype):
    x = _tiny(dtype)
    K = 3 if kind == "conv_aniso" else 27
    g = torch.Generator().manual_seed(3)
    w64 = torch.randn(K, 5, 20, dtype=torch.float64, generator=g) / 5
    feats = x.feats.clone().requires_grad_()
    w = w64.to(dtype).requires_grad_()
    y = _case(kind, x.replace_feature(feats), w, "triton", dataflow)
    assert y.feats.dtype == dtype
    # reference on the same (rounded) inputs in float64
    x64 = x.replace_feature(x.feats.double())
    ref = _reference(kind, x64, w.detach().double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.feats.double(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))
    # grads vs the float64 torch path on the same rounded values
    gy = torch.randn(y.feats.shape, generator=g, dtype=torch.float64)
    (y.feats.double() * gy).sum().backward()
    f64 = x.feats.double().requires_grad_()
    w2 = w.detach().double().requires_grad_()
    y64 = _case(kind, x.replace_feature(f64), w2, "cpu", "gather")
    (y64.feats * gy).sum().backward()
    for got, exp in ((feats.grad, f64.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol * max(1.0, float(exp.abs().max())))


def test_triton_sorted_map_and_channel_tiles():
    """Sorted-row implicit GEMM and several channel tiles (Cin, Cout > block) in one go."""
    from bevfusion.ops.sparse import triton as tk
    from bevfusion.ops.sparse.kmap import build_subm_kmap

    x = _tiny(torch.float32, cin=20, seed=1)
    w = torch.randn(27, 20, 24) / 10
    km = build_subm_kmap(x, 3)
    ref = dense_conv(x.replace_feature(x.feats.double()), w.double(), 3, subm=True)[1]
    for cfg in (dict(BM=32, BN=16, BK=16, SORTED=True, num_warps=4, num_stages=2),
                dict(BM=16, BN=32, BK=16, SORTED=False, num_warps=4, num_stages=2)):
        out = tk.igemm(x.feats, w, km, cfg)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    out = tk.gather_scatter(x.feats, w, km, dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=2))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    gy = torch.randn(x.feats.shape[0], 24)
    dw = tk.wgrad(x.feats, gy, km, dict(BP=16, BC=16, BN=16, CHUNK=40, num_warps=4, num_stages=2))
    from bevfusion.ops.sparse.dataflows import wgrad_gather

    torch.testing.assert_close(dw.double(), wgrad_gather(x.feats.double(), gy.double(), km), rtol=1e-4, atol=1e-4)


def test_triton_empty():
    x = SparseTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), (5, 5, 5), batch_size=1)
    for dataflow in ("igemm", "gather"):
        assert subm_conv3d(x, torch.randn(27, 4, 8), 3, impl="triton", dataflow=dataflow).feats.shape == (0, 8)


def test_triton_rejects_float64():
    x = _tiny(torch.float64)
    with pytest.raises(TypeError, match="float64"):
        subm_conv3d(x, torch.randn(27, 5, 4, dtype=torch.float64), 3, impl="triton", dataflow="igemm")


# ---------------------------------------------------------------- real GPU (skipped without CUDA)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl,dataflow", [("triton", "igemm"), ("triton", "gather"), ("auto", "auto")])
@pytest.mark.parametrize("kind", ["subm", "conv", "conv_aniso", "inverse"])
def test_gpu_vs_cpu_float64(kind, impl, dataflow, dtype):
    x = random_tensor(shape=(40, 40, 12), batch=2, density=0.1, cin=16, empty=(), dtype=torch.float64)
    K = 3 if kind == "conv_aniso" else 27
    w64 = torch.randn(K, 16, 32, dtype=torch.float64) / 10
    xc = SparseTensor(x.feats.to(dtype).cuda(), x.coords.cuda(), x.spatial_shape, batch_size=x.batch_size)
    feats = xc.feats.clone().requires_grad_()
    w = w64.to(dtype).cuda().requires_grad_()
    y = _case(kind, xc.replace_feature(feats), w, impl, dataflow)
    f64 = feats.detach().double().cpu().requires_grad_()
    w2 = w.detach().double().cpu().requires_grad_()
    y64 = _case(kind, SparseTensor(f64, x.coords, x.spatial_shape, batch_size=2), w2, "cpu", "gather")
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    scale = float(y64.feats.abs().max())
    torch.testing.assert_close(y.feats.double().cpu(), y64.feats.detach(), rtol=tol, atol=tol * scale)
    gy = torch.randn(y64.feats.shape, dtype=torch.float64)
    (y.feats.double() * gy.cuda()).sum().backward()
    (y64.feats * gy).sum().backward()
    torch.testing.assert_close(feats.grad.double().cpu(), f64.grad, rtol=tol, atol=tol * float(f64.grad.abs().max()))
    torch.testing.assert_close(w.grad.double().cpu(), w2.grad, rtol=tol, atol=tol * float(w2.grad.abs().max()))


def test_every_autotune_candidate_is_correct():
    """Each config the CUDA autotuner may pick gives the dense answer (forward, dgrad-shaped and wgrad)."""
    from bevfusion.ops.sparse import triton as tk
    from bevfusion.ops.sparse.dataflows import wgrad_gather
    from bevfusion.ops.sparse.kmap import build_subm_kmap

    x = random_tensor(shape=(4, 4, 3), batch=2, density=0.3, cin=5, seed=2, empty=(), dtype=torch.float32)
    w = torch.randn(27, 5, 16) / 5
    km = build_subm_kmap(x, 3)
    ref = dense_conv(x.replace_feature(x.feats.double()), w.double(), 3, subm=True)[1]
    gy = torch.randn(x.feats.shape[0], 16)
    dw_ref = wgrad_gather(x.feats.double(), gy.double(), km)
    for direction in ("fwd", "wgrad"):
        for name, cfg in tk.candidates(direction, 5, 16):
            if name == "igemm":
                out = tk.igemm(x.feats, w, km, cfg)
            elif name == "gather":
                out = tk.gather_scatter(x.feats, w, km, cfg)
            else:
                torch.testing.assert_close(tk.wgrad(x.feats, gy, km, cfg).double(), dw_ref, rtol=1e-4, atol=1e-4)
                continue
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=f"{name} {cfg}")


@pytest.mark.parametrize("block", [1, 3, 64])
def test_block_table_matches_naive_loop(block):
    """Per-program (offset, start, end) rows: every pair in exactly one block, none straddling offsets."""
    from bevfusion.ops.sparse import build_subm_kmap
    from bevfusion.ops.sparse.triton import _block_table

    km = build_subm_kmap(_tiny(torch.float32), 3)
    ks, ss, es = _block_table(km, block, "cpu")
    exp = [(k, s, min(s + block, km.ptr[k + 1])) for k in range(km.kernel_volume)
           for s in range(km.ptr[k], km.ptr[k + 1], block)]
    assert list(zip(ks.tolist(), ss.tolist(), es.tolist())) == exp

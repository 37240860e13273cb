"""Sparse conv engine vs dense conv3d (float64), case by case, on CPU dataflows."""
import threading

import pytest
import torch

from bevfusion.ops.sparse import (SparseTensor, build_conv_kmap, build_subm_kmap, conv_features, convert_weight,
                                  from_spconv1, from_spconv2, sparse_conv3d, sparse_inverse_conv3d, subm_conv3d,
                                  to_conv3d, to_spconv1, to_spconv2)
from bevfusion.ops.sparse import nn as snn
from bevfusion.ops.sparse.reference import dense_conv, dense_inverse_conv

# (impl, dataflow) pairs that run on CPU tensors without the Triton interpreter
CPU_IMPLS = [("cpu", "gather"), ("cpu", "im2col"), ("reference", "auto"), ("auto", "auto")]
CPU_DATAFLOWS = ["gather", "im2col"]  # of impl="cpu"

# (kernel_size, stride, padding, dilation) for SparseConv3d / SparseInverseConv3d
CONV_CASES = [
    (3, 2, 1, 1),                    # the encoder's down convs
    (3, 2, (1, 1, 0), 1),            # encoder layer 3: anisotropic padding
    ((1, 1, 3), (1, 1, 2), 0, 1),    # conv_out: anisotropic kernel and stride
    (3, 1, 0, 1),                    # unstrided, shrinking
    (3, 1, 1, 1),                    # unstrided, growing to the window
    (2, 2, 0, 1),                    # even kernel
    ((3, 1, 2), (2, 1, 1), (1, 0, 1), 1),
    (3, 2, 2, 2),                    # dilated
]
SUBM_CASES = [(3, 1), ((1, 3, 5), 1), ((3, 1, 3), 1), (3, 2), (5, 1), (1, 1)]


def _ksz(ks):
    return (ks,) * 3 if isinstance(ks, int) else tuple(ks)


def _vol(ks):
    a, b, c = _ksz(ks)
    return a * b * c


def random_tensor(shape=(7, 6, 5), batch=3, density=0.3, cin=3, seed=0, empty=(1,), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, *shape, generator=g) < density
    for b in empty:
        occ[b] = False
    coords = occ.nonzero().int()
    perm = torch.randperm(coords.shape[0], generator=g)  # unsorted input rows
    coords = coords[perm]
    feats = torch.randn(coords.shape[0], cin, generator=g, dtype=dtype)
    return SparseTensor(feats, coords, shape, batch_size=batch)


def _sort_rows(coords, feats):
    key = ((coords[:, 0].long() * 1000 + coords[:, 1]) * 1000 + coords[:, 2]) * 1000 + coords[:, 3]
    o = torch.argsort(key)
    return coords[o].long(), feats[o]


@pytest.mark.parametrize("impl,dataflow", CPU_IMPLS)
@pytest.mark.parametrize("ks,dil", SUBM_CASES)
def test_subm_vs_dense(impl, dataflow, ks, dil):
    x = random_tensor()
    w = torch.randn(_vol(ks), 3, 4, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    y = subm_conv3d(x, w, ks, dil, bias=b, impl=impl, dataflow=dataflow)
    rc, rf, _ = dense_conv(x, w, ks, dilation=dil, subm=True, bias=b)
    assert torch.equal(y.coords, x.coords)
    torch.testing.assert_close(y.feats, rf, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl,dataflow", CPU_IMPLS)
@pytest.mark.parametrize("ks,st,pad,dil", CONV_CASES)
def test_sparse_conv_vs_dense(impl, dataflow, ks, st, pad, dil):
    x = random_tensor()
    w = torch.randn(_vol(ks), 3, 4, dtype=torch.float64)
    y = sparse_conv3d(x, w, ks, st, pad, dil, impl=impl, dataflow=dataflow)
    rc, rf, oshape = dense_conv(x, w, ks, st, pad, dil)
    assert y.spatial_shape == oshape
    assert torch.equal(y.coords.long(), rc)  # active sites and their (b, x, y, z) order
    torch.testing.assert_close(y.feats, rf, rtol=1e-10, atol=1e-10)
    st3 = _ksz(st)
    assert y.stride == st3 and y.batch_size == x.batch_size


@pytest.mark.parametrize("impl,dataflow", CPU_IMPLS)
@pytest.mark.parametrize("ks,st,pad,dil", CONV_CASES)
def test_inverse_conv_vs_dense(impl, dataflow, ks, st, pad, dil):
    x = random_tensor()
    w = torch.randn(_vol(ks), 3, 4, dtype=torch.float64)
    y = sparse_conv3d(x, w, ks, st, pad, dil, impl=impl, dataflow=dataflow)
    w2 = torch.randn(_vol(ks), 4, 2, dtype=torch.float64)
    z = sparse_inverse_conv3d(y, w2, ks, st, pad, dil, impl=impl, dataflow=dataflow)
    assert torch.equal(z.coords, x.coords) and z.spatial_shape == x.spatial_shape and z.stride == x.stride
    ref = dense_inverse_conv(y, w2, ks, st, pad, dil, x.coords, x.spatial_shape)
    torch.testing.assert_close(z.feats, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dataflow", CPU_DATAFLOWS)
@pytest.mark.parametrize("kind", ["subm", "conv", "conv_aniso", "inverse"])
def test_gradcheck(dataflow, kind):
    x = random_tensor(shape=(4, 4, 3), batch=2, density=0.35, cin=2, empty=())
    g = torch.Generator().manual_seed(1)
    if kind == "subm":
        w = torch.randn(27, 2, 3, dtype=torch.float64, generator=g)

        def f(feats, weight):
            return subm_conv3d(x.replace_feature(feats), weight, 3, impl="cpu", dataflow=dataflow).feats
    elif kind in ("conv", "conv_aniso"):
        ks, st, pad = (3, 2, 1) if kind == "conv" else ((1, 1, 3), (1, 1, 2), 0)
        w = torch.randn(_vol(ks), 2, 3, dtype=torch.float64, generator=g)

        def f(feats, weight):
            return sparse_conv3d(x.replace_feature(feats), weight, ks, st, pad, impl="cpu", dataflow=dataflow).feats
    else:
        y = sparse_conv3d(x, torch.randn(27, 2, 3, dtype=torch.float64, generator=g), 3, 2, 1)
        x = y
        w = torch.randn(27, 3, 2, dtype=torch.float64, generator=g)

        def f(feats, weight):
            return sparse_inverse_conv3d(y.replace_feature(feats), weight, 3, 2, 1, impl="cpu", dataflow=dataflow).feats
    feats = x.feats.clone().requires_grad_()
    w.requires_grad_()
    # full Jacobians for one case, random projections (fast mode) for the rest, to keep CI short
    assert torch.autograd.gradcheck(f, (feats, w), fast_mode=not (kind == "subm" and dataflow == "gather"))


@pytest.mark.parametrize("dataflow", CPU_DATAFLOWS)
def test_grads_vs_dense_autograd(dataflow):
    x = random_tensor(cin=3)
    w = torch.randn(27, 3, 4, dtype=torch.float64, requires_grad=True)
    feats = x.feats.clone().requires_grad_()
    y = sparse_conv3d(x.replace_feature(feats), w, 3, 2, 1, impl="cpu", dataflow=dataflow)
    gy = torch.randn_like(y.feats)
    (y.feats * gy).sum().backward()
    # dense twin: conv3d on the scattered grid, loss only at the active output sites
    fd = feats.detach().clone().requires_grad_()
    wd = w.detach().clone().requires_grad_()
    dense = x.replace_feature(fd).dense()
    out = torch.nn.functional.conv3d(dense, to_conv3d(wd, (3, 3, 3)), None, 2, 1)
    c = y.coords.long()
    (out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] * gy).sum().backward()
    torch.testing.assert_close(feats.grad, fd.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.grad, wd.grad, rtol=1e-10, atol=1e-10)


def _dense_twin(x, w, stride, padding, coords_out, grad):
    """Dense conv3d of x's scattered grid read at `coords_out`, and its weight gradient for `grad` (float64)."""
    wd = w.detach().double().requires_grad_()
    dense = x.replace_feature(x.feats.double()).dense()
    out = torch.nn.functional.conv3d(dense, to_conv3d(wd, (3, 3, 3)), None, stride, padding)
    c = coords_out.long()
    y = out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
    (y * grad).sum().backward()
    return y.detach(), wd.grad


def test_threads_race_free(monkeypatch):
    """Our CPU convs give the dense answer at any thread count (spconv CPU does not), also when several
    Python threads run convs at once on one input (shared kernel-map cache and lazily built tables), and
    never touch torch's global thread count."""
    from bevfusion.ops.sparse.dataflows import BLOCK_ROWS

    x = random_tensor(shape=(32, 32, 16), batch=2, density=0.3, cin=16, empty=(), dtype=torch.float32)
    # enough im2col blocks for 4 threads of at least 4 blocks each, in both convs
    assert len(build_subm_kmap(x, 3).sorted_blocks(BLOCK_ROWS)[1]) >= 16
    assert len(build_conv_kmap(x, 3, 2, 1)[0].sorted_blocks(BLOCK_ROWS)[1]) >= 16
    w = torch.randn(27, 16, 16)
    g = torch.Generator().manual_seed(4)
    gy_sub = torch.randn(x.coords.shape[0], 16, generator=g, dtype=torch.float64)
    ref_sub, ref_gw_sub = _dense_twin(x, w, 1, 1, x.coords, gy_sub)
    rc, _, _ = dense_conv(x.replace_feature(x.feats.double()), w.double(), 3, 2, 1)
    gy_conv = torch.randn(rc.shape[0], 16, generator=g, dtype=torch.float64)
    ref_conv, ref_gw_conv = _dense_twin(x, w, 2, 1, rc, gy_conv)

    def check(shared, dataflow):
        ws = w.clone().requires_grad_()
        y = subm_conv3d(shared, ws, 3, impl="cpu", dataflow=dataflow)
        torch.testing.assert_close(y.feats.double(), ref_sub, rtol=1e-4, atol=1e-4)
        (y.feats.double() * gy_sub).sum().backward()
        torch.testing.assert_close(ws.grad.double(), ref_gw_sub, rtol=1e-4, atol=1e-3)
        wc = w.clone().requires_grad_()
        z = sparse_conv3d(shared, wc, 3, 2, 1, impl="cpu", dataflow=dataflow)
        assert torch.equal(z.coords.long(), rc)
        torch.testing.assert_close(z.feats.double(), ref_conv, rtol=1e-4, atol=1e-4)
        (z.feats.double() * gy_conv).sum().backward()
        torch.testing.assert_close(wc.grad.double(), ref_gw_conv, rtol=1e-4, atol=1e-3)

    old = torch.get_num_threads()
    calls = []
    try:
        for nt in (2, 4):
            torch.set_num_threads(nt)
            with monkeypatch.context() as m:
                m.setattr(torch, "set_num_threads", lambda n: calls.append(n))
                for dataflow in CPU_DATAFLOWS:
                    check(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=2), dataflow)
                    shared = SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=2)
                    errors = []

                    def worker():
                        try:
                            for _ in range(2):
                                check(shared, dataflow)
                        except BaseException as e:  # noqa: BLE001 - reported by the main thread
                            errors.append(e)

                    threads = [threading.Thread(target=worker) for _ in range(4)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    assert not errors, errors[0]
            assert torch.get_num_threads() == nt
    finally:
        torch.set_num_threads(old)
    assert calls == [], "a conv changed torch's global thread count"


def test_duplicate_coords_rejected():
    c = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1], [0, 1, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="duplicate"):
        SparseTensor(torch.zeros(3, 2), c, (4, 4, 4))


def test_out_of_range_rejected():
    c = torch.tensor([[0, 1, 1, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        SparseTensor(torch.zeros(1, 2), c, (4, 4, 4))


def test_empty_tensor():
    x = SparseTensor(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int32), (5, 5, 5),
                     batch_size=2)
    for dataflow in CPU_DATAFLOWS:
        y = subm_conv3d(x, torch.randn(27, 3, 4, dtype=torch.float64), 3, impl="cpu", dataflow=dataflow)
        assert y.feats.shape == (0, 4)
        z = sparse_conv3d(x, torch.randn(27, 3, 4, dtype=torch.float64), 3, 2, 1, impl="cpu", dataflow=dataflow)
        assert z.feats.shape == (0, 4) and z.spatial_shape == (3, 3, 3)
        assert z.dense().shape == (2, 4, 3, 3, 3)


def test_kernel_map_cache_reused():
    x = random_tensor()
    k1 = build_subm_kmap(x, 3)
    y = subm_conv3d(x, torch.randn(27, 3, 3, dtype=torch.float64), 3)
    assert build_subm_kmap(y, 3) is k1  # same sites: later layers reuse the map
    assert build_subm_kmap(y, 3, dilation=2) is not k1
    d1 = build_conv_kmap(x, 3, 2, 1)
    assert build_conv_kmap(y, 3, 2, 1) is d1
    z = sparse_conv3d(y, torch.randn(27, 3, 3, dtype=torch.float64), 3, 2, 1)
    assert torch.equal(z.coords, d1[1])
    assert build_subm_kmap(z, 3) is not k1
    # pairs are grouped by offset, and within an offset no output repeats
    km = build_subm_kmap(z, 3)
    for k in range(27):
        o = km.out_idx[km.ptr[k]:km.ptr[k + 1]]
        assert o.unique().numel() == o.numel()


def test_inverse_needs_paired_conv():
    x = random_tensor()
    with pytest.raises(ValueError, match="SparseConv3d"):
        sparse_inverse_conv3d(x, torch.randn(27, 3, 3, dtype=torch.float64), 3, 2, 1)


def test_dense_roundtrip_and_bev():
    x = random_tensor(cin=4)
    d = x.dense()
    assert d.shape == (3, 4, 7, 6, 5)
    c = x.coords.long()
    torch.testing.assert_close(d[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], x.feats)
    assert float(d.abs().sum()) == pytest.approx(float(x.feats.abs().sum()))
    x2 = SparseTensor.from_dense(d)
    c1, f1 = _sort_rows(x.coords, x.feats)
    c2, f2 = _sort_rows(x2.coords, x2.feats)
    assert torch.equal(c1, c2) and torch.equal(f1, f2)
    bev = x.to_bev()
    assert bev.shape == (3, 4 * 5, 7, 6)
    # channel index c*Z + z, as BEVFusion's SparseEncoder
    torch.testing.assert_close(bev[:, 2 * 5 + 3], d[:, 2, :, :, 3])


def test_weight_converters_roundtrip():
    ks = (3, 1, 2)
    w = torch.randn(6, 4, 5)
    torch.testing.assert_close(from_spconv1(to_spconv1(w, ks)), w)
    torch.testing.assert_close(from_spconv2(to_spconv2(w, ks)), w)
    assert to_spconv2(w, ks).shape == (5, 3, 1, 2, 4)
    assert convert_weight(to_spconv2(w, ks), ks, 4, 5) is not None
    torch.testing.assert_close(convert_weight(to_spconv2(w, ks), ks, 4, 5), w)
    torch.testing.assert_close(convert_weight(to_spconv1(w, ks), ks, 4, 5), w)
    with pytest.raises(ValueError):
        convert_weight(torch.randn(3, 3), ks, 4, 5)


def test_nn_modules_and_basic_block():
    torch.manual_seed(0)
    x = random_tensor(cin=5, dtype=torch.float32)
    net = snn.SparseSequential(snn.SubMConv3d(5, 8, 3, padding=1), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               snn.SparseBasicBlock(8), snn.SparseConv3d(8, 16, 3, stride=2, padding=1),
                               snn.BatchNorm(16), snn.ReLU(), snn.SparseInverseConv3d(16, 4, 3, stride=2, padding=1))
    assert net[0].weight.shape == (27, 5, 8)
    keys = set(net.state_dict())
    assert {"0.weight", "1.running_mean", "3.conv1.weight", "3.bn2.weight", "4.weight", "7.weight"} <= keys
    y = net(x)
    assert torch.equal(y.coords, x.coords) and y.feats.shape == (x.coords.shape[0], 4)
    y.feats.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_conv_features_checks_weight():
    x = random_tensor()
    km = build_subm_kmap(x, 3)
    with pytest.raises(ValueError, match="weight"):
        conv_features(x.feats, torch.randn(9, 3, 3, dtype=torch.float64), km)


def _pairs_by_offset(km):
    out = []
    for k in range(km.kernel_volume):
        a, b = km.ptr[k], km.ptr[k + 1]
        key = km.out_idx[a:b] * (km.n_in + 1) + km.in_idx[a:b]
        out.append(torch.sort(key).values)
    return out


KMAP_IMPLS = ["reference", "cpu", "triton"]


def _fresh(x, impl, check=True):
    """x's sites in a new SparseTensor (its own map cache) on the device `impl` runs on in this session:
    CUDA for "triton" when there is a GPU (CPU tensors take "triton" only under the interpreter)."""
    dev = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    return SparseTensor(x.feats.to(dev), x.coords.to(dev), x.spatial_shape, batch_size=x.batch_size, check=check)


@pytest.mark.parametrize("ks,dil", [(3, 1), ((1, 3, 5), 2), ((3, 1, 3), 1)])
def test_subm_kmap_backends_equal_reference(ks, dil):
    """numba hash table ("cpu") and sort + searchsorted ("triton") against the Python loop ("reference")."""
    x = random_tensor(shape=(9, 7, 6), batch=3, density=0.3)
    ref = build_subm_kmap(_fresh(x, "reference"), ks, dil, impl="reference")
    assert ref.num_pairs > x.coords.shape[0]  # more than the centre offset
    for impl in ("cpu", "triton"):
        km = _kmap_to_cpu(build_subm_kmap(_fresh(x, impl), ks, dil, impl=impl))
        assert km.ptr == ref.ptr, impl
        for u, v in zip(_pairs_by_offset(ref), _pairs_by_offset(km)):
            assert torch.equal(u, v), impl


@pytest.mark.parametrize("ks,st,pad,dil", CONV_CASES)
def test_conv_kmap_backends_equal_reference(ks, st, pad, dil):
    x = random_tensor(shape=(9, 7, 6), batch=3, density=0.3)
    kr, cr, sr, _ = build_conv_kmap(_fresh(x, "reference"), ks, st, pad, dil, impl="reference")
    for impl in ("cpu", "triton"):
        ka, ca, sa, _ = build_conv_kmap(_fresh(x, impl), ks, st, pad, dil, impl=impl)
        ka = _kmap_to_cpu(ka)
        assert sa == sr and torch.equal(ca.cpu(), cr) and ka.ptr == kr.ptr, impl
        for u, v in zip(_pairs_by_offset(kr), _pairs_by_offset(ka)):
            assert torch.equal(u, v), impl


@pytest.mark.parametrize("impl", KMAP_IMPLS)
def test_duplicates_caught_by_kmap_without_check(impl):
    c = torch.tensor([[0, 1, 1, 1], [1, 2, 1, 1], [0, 1, 1, 1]], dtype=torch.int32)
    x = _fresh(SparseTensor(torch.zeros(3, 2), c, (4, 4, 4), check=False), impl, check=False)
    with pytest.raises(ValueError, match="duplicate"):
        build_subm_kmap(x, 3, impl=impl)


@pytest.mark.parametrize("call", [
    lambda x: build_subm_kmap(x, 3, impl="numba"),
    lambda x: build_conv_kmap(x, 3, 2, 1, impl="torch"),
])
def test_kmap_rejects_unknown_impl(call):
    with pytest.raises(ValueError, match=r"kernel map: impl must be one of \('auto', 'reference', 'cpu', 'triton'\)"):
        call(random_tensor())


@pytest.mark.parametrize("impl,dataflow,match", [
    ("torch", "auto", r"sparse conv: impl must be one of \('auto', 'reference', 'cpu', 'triton'\), got 'torch'"),
    ("gather", "auto", r"impl must be one of .*got 'gather'"),
    ("triton_igemm", "auto", r"impl must be one of .*got 'triton_igemm'"),
    ("cpu", "implicit",
     r"unknown dataflow 'implicit'; dataflows per impl: auto: .*cpu: \('auto', 'gather', 'im2col'\)"),
    ("cpu", "igemm", r"impl='cpu' has no dataflow 'igemm'"),
    ("reference", "gather", r"impl='reference' has no dataflow 'gather'"),
    ("triton", "im2col", r"impl='triton' has no dataflow 'im2col'"),
])
def test_conv_rejects_unknown_names(impl, dataflow, match):
    x = random_tensor()
    w = torch.randn(27, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        subm_conv3d(x, w, 3, impl=impl, dataflow=dataflow)
    with pytest.raises(ValueError, match=match):
        snn.SparseConv3d(3, 4, 3, impl=impl, dataflow=dataflow)


def test_auto_impl_on_cpu_has_no_triton_dataflow():
    x = random_tensor()
    with pytest.raises(ValueError, match="runs 'cpu' on cpu tensors, which has no dataflow 'igemm'"):
        subm_conv3d(x, torch.randn(27, 3, 4, dtype=torch.float64), 3, dataflow="igemm")


@pytest.mark.parametrize("ks,rows", [(3, 16), (3, 1000), ((1, 1, 3), 7), (5, 32)])
def test_sorted_blocks_numba_equals_torch_and_naive(ks, rows):
    """The im2col plan: the numba pass (CPU maps) and the torch ops (other devices) give the same blocks,
    and each block gathers, row by row, exactly the offsets some row of it uses."""
    from bevfusion.ops.sparse.kmap import _sorted_blocks_torch
    from bevfusion.ops.sparse.kmap_numba import sorted_blocks

    km = build_subm_kmap(random_tensor(shape=(9, 8, 7), batch=2, density=0.3, empty=()), ks)
    nb = km.nbmap()
    order, act, starts, flat = sorted_blocks(nb, rows, km.n_in)
    assert torch.equal(order, km.sorted_rows())
    t_act, t_starts, t_flat = _sorted_blocks_torch(nb.index_select(0, km.sorted_rows()), rows, km.n_in)
    assert torch.equal(act, t_act) and starts == t_starts and torch.equal(flat, t_flat.int())
    expected = []
    for s in range(0, km.n_out, rows):
        block = nb[order[s:s + rows]]
        used = [k for k in range(km.kernel_volume) if (block[:, k] >= 0).any()]
        expected += [int(v) if v >= 0 else km.n_in for row in block.tolist() for v in (row[k] for k in used)]
    assert flat.tolist() == expected
    masks = [sum(1 << (km.kernel_volume - 1 - k) for k in range(km.kernel_volume)
                 if nb[o, k] >= 0 and km.kernel_volume - 1 - k <= 62) for o in range(km.n_out)]
    assert order.tolist() == sorted(range(km.n_out), key=lambda o: -masks[o])  # descending, stable


def test_to_bev_backward():
    x = random_tensor(cin=2)
    feats = x.feats.clone().requires_grad_()
    bev = x.replace_feature(feats).to_bev()
    g = torch.randn_like(bev)
    bev.backward(g)
    c = x.coords.long()
    Z = x.spatial_shape[2]
    gd = g.view(3, 2, Z, 7, 6)
    torch.testing.assert_close(feats.grad, gd[c[:, 0], :, c[:, 3], c[:, 1], c[:, 2]])


def test_cpu_autotune_choice_is_deterministic():
    from bevfusion.ops.sparse import tune

    x = random_tensor()
    km = build_subm_kmap(x, 3)
    w = torch.randn(27, 3, 4, dtype=torch.float64)
    choices = {tune.cpu_choice("fwd", x.feats, w, km) for _ in range(3)}
    assert len(choices) == 1 and next(iter(choices)) in ("gather", "im2col")


def test_conv_kmap_isolated_sites_dilation_sharing_stride():
    """stride 2 with dilation 2: each isolated input reaches all 27 outputs (the hash table must be sized
    for that, not for the usual 8)."""
    g = torch.Generator().manual_seed(5)
    c = torch.unique(torch.randint(1, 7, (40, 3), generator=g) * 8, dim=0).int()  # far apart, off the border
    c = torch.cat([torch.zeros(c.shape[0], 1, dtype=torch.int32), c], 1)
    x = SparseTensor(torch.randn(c.shape[0], 2, dtype=torch.float64, generator=g), c, (64, 64, 64))
    w = torch.randn(27, 2, 3, dtype=torch.float64, generator=g)
    y = sparse_conv3d(x, w, 3, 2, 2, 2, impl="cpu", dataflow="im2col")
    rc, rf, _ = dense_conv(x, w, 3, 2, 2, 2)
    assert y.coords.shape[0] == 27 * c.shape[0]
    assert torch.equal(y.coords.long(), rc)
    torch.testing.assert_close(y.feats, rf)


def _encoder_chain(x, impl_kmap, monkeypatch):
    """subm -> strided -> subm on the strided output -> inverse, with the kernel maps forced to one backend."""
    from bevfusion.ops.sparse import kmap as km_mod

    monkeypatch.setattr(km_mod, "_backend", lambda _x, _impl: impl_kmap)
    g = torch.Generator().manual_seed(11)
    w1 = torch.randn(27, x.feats.shape[1], 4, dtype=torch.float64, generator=g)
    w2 = torch.randn(27, 4, 5, dtype=torch.float64, generator=g)
    w3 = torch.randn(27, 5, 5, dtype=torch.float64, generator=g)
    w4 = torch.randn(27, 5, 2, dtype=torch.float64, generator=g)
    a = subm_conv3d(x, w1, 3, impl="cpu", dataflow="gather")
    b = sparse_conv3d(a, w2, 3, 2, 1, impl="cpu", dataflow="gather")
    c = subm_conv3d(b, w3, 3, impl="cpu", dataflow="gather")
    d = sparse_inverse_conv3d(c, w4, 3, 2, 1, impl="cpu", dataflow="gather")
    return a, b, c, d


@pytest.mark.parametrize("batch,empty", [(3, (1,)), (1, ()), (2, (0, 1))])
def test_device_kmaps_end_to_end_equal_numba(batch, empty, monkeypatch):
    """The device-agnostic kernel maps (the CUDA path: sort, searchsorted, prefix-sum compaction, one host
    transfer per map) give the same network outputs as the numba maps, incl. empty batches and inputs."""
    x = random_tensor(shape=(9, 8, 7), batch=batch, density=0.25, empty=empty)
    ref = _encoder_chain(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=batch), "cpu", monkeypatch)
    got = _encoder_chain(SparseTensor(x.feats, x.coords, x.spatial_shape, batch_size=batch), "triton", monkeypatch)
    for r, t in zip(ref, got):
        assert torch.equal(r.coords, t.coords) and r.spatial_shape == t.spatial_shape
        torch.testing.assert_close(t.feats, r.feats)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kmap_build_syncs_once_per_map():
    """Building a kernel map on CUDA reads the device once (its pair counts); a cached map not at all."""
    import warnings

    x = random_tensor(shape=(40, 40, 12), batch=2, density=0.1, empty=(), dtype=torch.float32)
    x = SparseTensor(x.feats.cuda(), x.coords.cuda(), x.spatial_shape, batch_size=2)
    torch.cuda.synchronize()

    def syncs(fn):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return out, sum("synchroniz" in str(w.message) for w in rec)

    km, n = syncs(lambda: build_subm_kmap(x, 3))
    assert n <= 1, f"subm map: {n} syncs"
    assert syncs(lambda: build_subm_kmap(x, 3))[1] == 0  # cached
    (km2, coords, shape, cid), n = syncs(lambda: build_conv_kmap(x, 3, 2, 1))
    assert n <= 1, f"strided map: {n} syncs"
    y = SparseTensor(torch.zeros(coords.shape[0], 1, device="cuda"), coords, shape, check=False,
                     batch_size=2, _cache=x.cache, _coord_id=cid)
    assert syncs(lambda: build_subm_kmap(y, 3))[1] <= 1  # the strided output's sorted keys are cached
    # and the maps equal the CPU (numba) maps
    xc = SparseTensor(x.feats.cpu(), x.coords.cpu(), x.spatial_shape, batch_size=2)
    ref = build_subm_kmap(xc, 3)
    assert km.ptr == ref.ptr
    for u, v in zip(_pairs_by_offset(ref), _pairs_by_offset(_kmap_to_cpu(km))):
        assert torch.equal(u, v)


def _kmap_to_cpu(km):
    from bevfusion.ops.sparse.kmap import KernelMap

    return KernelMap(km.in_idx.cpu(), km.out_idx.cpu(), km.ptr, km.n_in, km.n_out, km.identity_offset)


def test_conv_follows_autocast_dtype():
    """Under autocast a sparse conv computes in the autocast dtype (as F.conv3d does), from fp32 features
    and an fp32 weight; gradients reach the fp32 weight. Checked against the float64 dense conv."""
    x = random_tensor(shape=(9, 8, 7), batch=2, density=0.3, empty=(), cin=8, dtype=torch.float32)
    w = torch.randn(27, 8, 16, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = subm_conv3d(x, w, 3)
    assert y.feats.dtype == torch.bfloat16
    rc, rf, _ = dense_conv(SparseTensor(x.feats.double(), x.coords, x.spatial_shape, batch_size=2),
                           w.detach().double(), 3, 1, 1, 1, subm=True)
    assert torch.equal(y.coords, x.coords)
    f = y.feats.double()
    assert float((f - rf).norm() / rf.norm()) < 2e-2  # bf16 operands
    y.feats.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and bool(torch.isfinite(w.grad).all())
    z = subm_conv3d(x, w, 3)  # outside autocast: fp32 as before
    assert z.feats.dtype == torch.float32


@pytest.mark.parametrize("dataflow", CPU_DATAFLOWS)
def test_every_cpu_dataflow_runs_under_autocast(dataflow):
    """Each dataflow computes in the autocast dtype without mixing dtypes internally (index_add of a
    half-precision product into a float32 buffer used to fail)."""
    x = random_tensor(shape=(9, 8, 7), batch=2, density=0.3, empty=(), cin=4, dtype=torch.float32)
    w = torch.randn(27, 4, 8)
    ref = subm_conv3d(x, w, 3, impl="cpu", dataflow=dataflow).feats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = subm_conv3d(x, w, 3, impl="cpu", dataflow=dataflow).feats
        z = sparse_conv3d(x, w, 3, 2, 1, impl="cpu", dataflow=dataflow).feats
    assert y.dtype == z.dtype == torch.bfloat16
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-2

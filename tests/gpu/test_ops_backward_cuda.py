"""Backward passes on the device under test (CUDA; BEVFUSION_GPU_TEST_DEVICE=cpu dry-runs them on the CPU) that the
op-level GPU tests do not cover, against the CPU:

* the fused LSS lift + BEV pool with only one input needing a gradient (the Triton backward's need_depth /
  need_feats branches) in fp32 and fp16, in bf16, and with a CPU plan moved to the device;
* hard voxelization and mean voxelization, differentiated w.r.t. the points;
* a small SparseEncoder (SubM conv, basic blocks, strided and anisotropic convs, BatchNorm in train mode,
  to_bev): the gradients of the input features and of every parameter, i.e. the kernel maps and their caches
  reused from layer to layer on the device.

(`tests/ops/test_bev_pool.py::TestGpu` checks bev_pool and lift forward and backward with both inputs, and
`tests/ops/test_sparse_triton.py::test_gpu_vs_cpu_float64` single sparse convs forward and backward.)
"""
from __future__ import annotations

import pytest
import torch

import gpu_case as gc

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}  # of the reference's largest magnitude


def _close(name, got, expected, tol):
    err = gc.rel_max_err(got, expected)
    assert err <= tol, f"{name}: max error {err:.3g} of the reference's largest magnitude > {tol:g}"


# ----------------------------------------------------------------------------------------------- lift + bev_pool
# (dtype, which inputs need a gradient, where the plan was built): the one-sided backward kernels in fp32 and
# fp16, bf16 (both), and a CPU plan moved to the device (the fp32 / fp16 two-sided cases are in test_bev_pool.py)
LIFT_CASES = [(torch.float32, "depth", "device"), (torch.float32, "feats", "device"),
              (torch.float16, "depth", "device"), (torch.float16, "feats", "device"),
              (torch.bfloat16, "both", "device"), (torch.float32, "both", "cpu")]


@pytest.mark.parametrize("dtype, needs, plan_from", LIFT_CASES)
def test_lift_bev_pool_backward(device, dtype, needs, plan_from):
    from bevfusion.ops.bev_pool import bev_pool_plan, lift_bev_pool

    gen = torch.Generator().manual_seed(61)
    bn, d_bins, fh, fw, c, batch = 6, 24, 8, 22, 40, 2
    grid = (1, 48, 48)
    depth = torch.rand(batch * bn, d_bins, fh, fw, generator=gen).softmax(1).to(dtype)
    feats = torch.randn(batch * bn, fh, fw, c, generator=gen).to(dtype)
    n = depth.numel()
    # frustum points of both samples (rows in (BN, D, fH, fW) order, batch = row // (bn * D * fH * fW)),
    # clustered so that cells hold many points, and about 5 % outside the grid
    xy = (torch.randn(n, 2, generator=gen) * 12 + 24).round().long()
    coords = torch.cat([xy, torch.zeros(n, 1, dtype=torch.long),
                        torch.arange(batch).repeat_interleave(n // batch)[:, None]], 1)
    plan_cpu = bev_pool_plan(coords, batch, grid)
    plan = plan_cpu.to(device) if plan_from == "cpu" else bev_pool_plan(coords.to(device), batch, grid)
    assert plan.device.type == device.type

    need_d, need_f = needs in ("depth", "both"), needs in ("feats", "both")
    d64, f64 = depth.double().requires_grad_(need_d), feats.double().requires_grad_(need_f)
    ref = lift_bev_pool(d64, f64, plan=plan_cpu, impl="reference")
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, [t for t in (d64, f64) if t.requires_grad], g)

    d = depth.to(device).requires_grad_(need_d)
    f = feats.to(device).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # channels-last view, as the model's
    f.requires_grad_(need_f)
    out = lift_bev_pool(d, f, plan=plan)  # auto: Triton on CUDA
    assert out.dtype == dtype and out.device.type == device.type
    _close("forward", out, ref.detach(), TOL[dtype])
    grads = torch.autograd.grad(out, [t for t in (d, f) if t.requires_grad], g.to(device, dtype))
    names = [k for k, need in (("depth", need_d), ("feats", need_f)) if need]
    for name, got, exp in zip(names, grads, ref_grads):
        assert got.dtype == dtype and got.shape == exp.shape, (name, got.dtype, got.shape)
        _close(f"grad {name}", got, exp, TOL[dtype])


# ----------------------------------------------------------------------------------------------- voxelization
def _scene(n=40_000, seed=62):
    """Points: a dense cluster (many points per voxel) and a wide spread (many voxels)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.tensor([15.0, 15.0, 1.0])
    xyz = torch.randn(n, 3, generator=gen) * torch.where(torch.arange(n)[:, None] < n // 4, spread / 20, spread)
    return torch.cat([xyz, torch.rand(n, 2, generator=gen)], 1)


def test_voxelize_backward(device):
    """Hard voxelization (max 10 points per voxel, 20000 voxels, both limits reached) and the voxel mean."""
    from bevfusion.ops.voxelize import voxel_mean, voxelize

    vs, pr = (0.4, 0.4, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    pts = _scene()
    out = []
    for where, impl in ((torch.device("cpu"), "cpu"), (device, "auto")):
        p = pts.to(where).requires_grad_()
        voxels, coords, num = voxelize(p, vs, pr, 10, 20_000, impl=impl)
        w = torch.randn(voxels.shape, generator=torch.Generator().manual_seed(63)).to(where)
        loss = (voxels * w).sum() + (voxel_mean(voxels, num) * w[:, 0]).sum()
        (grad,) = torch.autograd.grad(loss, p)
        out.append((voxels.detach().cpu(), coords.cpu(), num.cpu(), grad.cpu()))
    (v0, c0, n0, g0), (v1, c1, n1, g1) = out
    assert len(c0) == 20_000 and (n0 == 10).any()
    assert torch.equal(c1, c0) and torch.equal(n1, n0) and torch.equal(v1, v0)
    assert (g0 != 0).any(1).sum() == n0.sum() < len(pts)  # points beyond either limit get no gradient
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)


def test_voxelize_mean_backward(device):
    from bevfusion.ops.voxelize import voxelize_mean

    vs, pr = (0.4, 0.4, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    pts = _scene(seed=64)
    pts[:50, 2] = 10.0  # outside the range: no cell, no gradient
    out = []
    for where, impl in ((torch.device("cpu"), "cpu"), (device, "auto")):
        p = pts.to(where).requires_grad_()
        feats, coords, num = voxelize_mean(p, vs, pr, impl=impl)
        w = torch.randn(feats.shape, generator=torch.Generator().manual_seed(65)).to(where)
        (grad,) = torch.autograd.grad((feats * w).sum(), p)
        out.append((feats.detach().cpu(), coords.cpu(), num.cpu(), grad.cpu()))
    (f0, c0, n0, g0), (f1, c1, n1, g1) = out
    assert torch.equal(c1, c0) and torch.equal(n1, n0)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-5)
    lo, hi = torch.tensor(pr[:3]), torch.tensor(pr[3:])
    inside = ((pts[:, :3] >= lo) & (pts[:, :3] < hi)).all(1)
    assert not inside[:50].any() and torch.equal((g0 != 0).any(1), inside)  # every point inside, and only those
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- sparse encoder
def test_sparse_encoder_backward(device):
    """Train-mode SparseEncoder forward and backward: output, input-feature and parameter gradients vs the CPU
    with the gather dataflow in float64. Tolerances: 1e-4 for the output and the input gradient; 2e-2 of each
    parameter's gradient norm plus 1e-4 of all of them, since conv weight gradients ahead of train-mode
    BatchNorm nearly cancel (see test_model_cuda.py)."""
    from bevfusion.models.lidar.sparse_encoder import SparseEncoder
    from bevfusion.ops.voxelize import voxel_mean, voxelize

    vs, pr = (0.8, 0.8, 0.2), (-25.6, -25.6, -5.0, 25.6, 25.6, 3.0)  # grid 64 x 64 x 40
    feats_list, coords_list = [], []
    for b in range(2):
        voxels, coords, num = voxelize(_scene(n=15_000, seed=66 + b) * torch.tensor([0.5, 0.5, 1, 1, 1]), vs, pr,
                                       10, 30_000)
        feats_list.append(voxel_mean(voxels, num))
        coords_list.append(torch.nn.functional.pad(coords, (1, 0), value=b))
    feats, coords = torch.cat(feats_list), torch.cat(coords_list)
    kwargs = dict(in_channels=5, sparse_shape=[64, 64, 41], base_channels=8, output_channels=32,
                  encoder_channels=[[8, 16], [16, 32], [32, 64], [64]],
                  encoder_paddings=[[0, 1], [0, 1], [0, [1, 1, 0]], [0]], block_type="basicblock")
    torch.manual_seed(67)
    ref_model = SparseEncoder(**kwargs, impl="cpu", dataflow="gather").double().train()
    model = SparseEncoder(**kwargs, **gc.sparse_impl_for(device)).to(device).train()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref_model.state_dict().items()})

    f64 = feats.double().requires_grad_()
    ref = ref_model(f64, coords, 2)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(68), dtype=torch.float64)
    (ref * g).sum().backward()

    f = feats.to(device).requires_grad_()
    out = model(f, coords.to(device), 2)
    assert out.shape == ref.shape and out.dtype == torch.float32
    _close("output", out, ref.detach(), 1e-4)
    (out * g.to(device, out.dtype)).sum().backward()
    _close("grad feats", f.grad, f64.grad, 1e-4)
    ref_params = dict(ref_model.named_parameters())
    total = sum(float(p.grad.norm()) ** 2 for p in ref_params.values()) ** 0.5
    for name, p in model.named_parameters():
        rp = ref_params[name]
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        diff = float((p.grad.double().cpu() - rp.grad).norm())
        assert diff <= 2e-2 * float(rp.grad.norm()) + 1e-4 * total, f"{name}: gradient differs by {diff:.3g}"
    for name, buf in model.named_buffers():  # running statistics from the train-mode batch
        if buf.is_floating_point():
            _close(f"buffer {name}", buf, dict(ref_model.named_buffers())[name], 1e-4)

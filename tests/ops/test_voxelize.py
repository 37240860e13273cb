"""Voxelization: every impl against a naive Python loop with its own numpy cell formula (first-come
semantics), mean voxelization against a float64 loop, gradients, the model-facing helpers and bad input.

Triton runs in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so the cases are small; `pytest -m gpu` runs the CUDA twin on a realistic cloud.
"""
import math

import numpy as np
import pytest
import torch

from bevfusion.ops.voxelize import (DynamicScatter, Voxelization, dynamic_voxelize, grid_size, voxel_mean, voxelize,
                                    voxelize_mean)
from bevfusion.ops.voxelize import sort_based as vox_sorted

IMPLS = ["reference", "cpu", "triton"]
VS, PR = (1.0, 1.0, 0.5), (-4.0, -3.0, -1.0, 4.0, 3.0, 1.0)  # grid 8 x 6 x 4
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----------------------------------------------------------------------------- naive oracles
def naive_cells(points, vs, pr):
    """numpy loop, same arithmetic dtype as the official kernel (float32; float64 for float64 points)."""
    nd = np.float64 if points.dtype == torch.float64 else np.float32
    grid = [int(np.round((nd(pr[k + 3]) - nd(pr[k])) / nd(vs[k]))) for k in range(3)]
    out = []
    for p in points.double().tolist() if points.dtype == torch.float64 else points.float().tolist():
        c = [math.floor(nd(nd(p[k]) - nd(pr[k])) / nd(vs[k])) if math.isfinite(p[k]) else -1 for k in range(3)]
        out.append(tuple(c) if all(0 <= c[k] < grid[k] for k in range(3)) else None)
    return out


def naive_voxelize(points, vs, pr, max_points, max_voxels):
    vid, coords, members = {}, [], []
    for i, c in enumerate(naive_cells(points, vs, pr)):
        if c is None:
            continue
        if c not in vid:
            if len(coords) == max_voxels:
                continue
            vid[c] = len(coords)
            coords.append(c)
            members.append([])
        if len(members[vid[c]]) < max_points:
            members[vid[c]].append(i)
    f = points.shape[1]
    voxels = torch.zeros(len(coords), max_points, f, dtype=torch.float64)
    for v, idx in enumerate(members):
        for k, i in enumerate(idx):
            voxels[v, k] = points[i].double()
    return voxels, coords, [len(m) for m in members]


def naive_mean(points, vs, pr):
    sums, counts = {}, {}
    for i, c in enumerate(naive_cells(points, vs, pr)):
        if c is None:
            continue
        sums[c] = sums.get(c, 0) + points[i].double()
        counts[c] = counts.get(c, 0) + 1
    coords = list(sums)  # dicts keep insertion order = first appearance
    feats = torch.stack([sums[c] / counts[c] for c in coords]) if coords else torch.zeros(0, points.shape[1])
    return feats.double(), coords, [counts[c] for c in coords]


def make_points(name, gen, n=300, f=5):
    lo, hi = torch.tensor(PR[:3]), torch.tensor(PR[3:])
    if name == "empty":
        return torch.zeros(0, f)
    if name == "one_point":
        return torch.tensor([[0.3, -0.2, 0.1, 7.0, 1.0]])[:, :f]
    if name == "one_cell":  # 40 points in one cell: only the first max_points survive
        return torch.cat([torch.rand(40, 3, generator=gen) * torch.tensor([0.9, 0.9, 0.4]) + torch.tensor([1.05, 0.05, 0.05]),
                          torch.randn(40, f - 3, generator=gen)], 1)
    if name == "all_outside":
        pts = torch.tensor([[-4.5, 0, 0], [4.0, 0, 0], [0, 3.0, 0], [0, -3.01, 0], [0, 0, 1.0], [0, 0, -1.2],
                            [math.nan, 0, 0], [0, math.inf, 0], [0, 0, -math.inf], [1e30, 0, 0]])
        return torch.cat([pts, torch.randn(len(pts), f - 3, generator=gen)], 1)
    if name == "boundaries":  # points exactly on cell faces, the range minimum (inside) and maximum (outside)
        xyz = torch.tensor([[-4.0, -3.0, -1.0], [-3.0, -2.0, -0.5], [3.0, 2.0, 0.5], [3.999, 2.999, 0.999],
                            [0.0, 0.0, 0.0], [0.5, 1.0, 0.25], [-0.1, 0.1, -0.75], [4.0, 3.0, 1.0]])
        return torch.cat([xyz, torch.randn(len(xyz), f - 3, generator=gen)], 1)
    if name == "random":  # ~20% outside, dense enough that voxels fill up and max_voxels cuts
        xyz = torch.rand(n, 3, generator=gen) * (hi - lo) * 1.2 + lo - 0.1 * (hi - lo)
        return torch.cat([xyz, torch.randn(n, f - 3, generator=gen)], 1)
    if name == "clustered":  # few cells, many points each
        centers = torch.tensor([[0.5, 0.5, 0.25], [-3.5, 2.5, -0.75], [2.2, -1.7, 0.6]])
        xyz = centers[torch.randint(0, 3, (n,), generator=gen)] + torch.rand(n, 3, generator=gen) * 0.3 - 0.15
        return torch.cat([xyz, torch.randn(n, f - 3, generator=gen)], 1)
    raise ValueError(name)


CASES = ["empty", "one_point", "one_cell", "all_outside", "boundaries", "random", "clustered"]


def check_against_naive(out, points, max_points, max_voxels, tol=0.0):
    voxels, coords, num = out
    ev, ec, en = naive_voxelize(points, VS, PR, max_points, max_voxels)
    assert voxels.shape == (len(ec), max_points, points.shape[1]) and voxels.dtype == points.dtype
    assert coords.dtype == torch.int32 and num.dtype == torch.int32
    assert [tuple(c) for c in coords.tolist()] == ec
    assert num.tolist() == en
    torch.testing.assert_close(voxels.double(), ev, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- hard voxelization
class TestVoxelize:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("max_points,max_voxels", [(3, 1000), (10, 7)])
    def test_matches_naive(self, impl, case, max_points, max_voxels):
        pts = make_points(case, torch.Generator().manual_seed(hash(case) % 1000))
        out = voxelize(pts, VS, PR, max_points, max_voxels, impl=impl)
        check_against_naive(out, pts, max_points, max_voxels)

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
    def test_dtypes(self, impl, dtype):
        pts = make_points("random", torch.Generator().manual_seed(3)).to(dtype)
        out = voxelize(pts, VS, PR, 4, 1000, impl=impl)
        check_against_naive(out, pts, 4, 1000)

    @pytest.mark.parametrize("impl", IMPLS)
    def test_non_contiguous_and_extra_columns(self, impl):
        base = make_points("random", torch.Generator().manual_seed(4), f=8)
        pts = base.t().contiguous().t()[:, ::2]  # column-major storage, columns 0, 2, 4, 6
        assert not pts.is_contiguous()
        out = voxelize(pts, VS, PR, 5, 1000, impl=impl)
        check_against_naive(out, pts.contiguous(), 5, 1000)
        rows = base[::3]  # strided rows
        check_against_naive(voxelize(rows, VS, PR, 5, 1000, impl=impl), rows.contiguous(), 5, 1000)

    def test_impls_agree_on_a_larger_cloud(self):
        gen = torch.Generator().manual_seed(5)
        pts = torch.cat([torch.randn(20000, 3, generator=gen) * torch.tensor([2.0, 1.5, 0.5]),
                         torch.rand(20000, 2, generator=gen)], 1)
        ref = voxelize(pts, (0.25, 0.25, 0.2), PR, 6, 3000, impl="reference", return_slots=True)
        for impl in ["cpu", "triton"]:
            out = voxelize(pts, (0.25, 0.25, 0.2), PR, 6, 3000, impl=impl, return_slots=True)
            for a, b in zip(out, ref):
                assert torch.equal(a, b), impl

    @pytest.mark.parametrize("impl", IMPLS)
    def test_several_batches(self, impl):
        """The model voxelizes per sample and prepends the batch index (facts §2.1)."""
        gen = torch.Generator().manual_seed(6)
        samples = [make_points("random", gen, n=n) for n in (50, 0, 120)]
        rows, feats = [], []
        for b, pts in enumerate(samples):
            v, c, n = voxelize(pts, VS, PR, 3, 40, impl=impl)
            check_against_naive((v, c, n), pts, 3, 40)
            rows.append(torch.nn.functional.pad(c, (1, 0), value=b))
            feats.append(voxel_mean(v, n))
        coords = torch.cat(rows)
        assert coords.shape[1] == 4 and set(coords[:, 0].tolist()) <= {0, 2}
        assert torch.cat(feats).shape == (coords.shape[0], 5)

    @pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
    def test_gradient(self, impl):
        pts = make_points("clustered", torch.Generator().manual_seed(7), n=60).double().requires_grad_()
        voxels, coords, num, slots = voxelize(pts, VS, PR, 4, 2, impl=impl, return_slots=True)
        w = torch.randn(voxels.shape, dtype=torch.float64)
        (grad,) = torch.autograd.grad((voxels * w).sum(), pts)
        expected = torch.zeros_like(pts)
        flat = w.view(-1, pts.shape[1])
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                expected[i] = flat[s]
        assert (slots >= 0).sum() == num.sum() and (slots < 0).any()
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)

    def test_deterministic_and_order_follows_input(self):
        pts = make_points("random", torch.Generator().manual_seed(8))
        a = voxelize(pts, VS, PR, 2, 1000)
        b = voxelize(pts, VS, PR, 2, 1000)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        flipped = voxelize(pts.flip(0), VS, PR, 100, 1000)
        full = voxelize(pts, VS, PR, 100, 1000)
        assert sorted(map(tuple, flipped[1].tolist())) == sorted(map(tuple, full[1].tolist()))
        assert flipped[1].tolist() != full[1].tolist()

    def test_voxel_mean_matches_float64_loop(self):
        pts = make_points("clustered", torch.Generator().manual_seed(9))
        voxels, coords, num = voxelize(pts, VS, PR, 10, 1000)
        ev, ec, en = naive_voxelize(pts, VS, PR, 10, 1000)
        expected = torch.stack([ev[v, :n].mean(0) for v, n in enumerate(en)])
        torch.testing.assert_close(voxel_mean(voxels, num).double(), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- dynamic / mean
class TestDynamic:
    @pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
    @pytest.mark.parametrize("case", ["empty", "all_outside", "boundaries", "random"])
    def test_dynamic_cells(self, impl, case):
        pts = make_points(case, torch.Generator().manual_seed(10))
        cells = dynamic_voxelize(pts, VS, PR, impl=impl)
        assert cells.dtype == torch.int32 and cells.shape == (len(pts), 3)
        expected = [list(c) if c is not None else [-1, -1, -1] for c in naive_cells(pts, VS, PR)]
        assert cells.tolist() == expected

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", ["empty", "one_point", "one_cell", "all_outside", "random", "clustered"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_mean_matches_float64_loop(self, impl, case, dtype):
        pts = make_points(case, torch.Generator().manual_seed(11)).to(dtype)
        feats, coords, num = voxelize_mean(pts, VS, PR, impl=impl)
        ef, ec, en = naive_mean(pts, VS, PR)
        assert [tuple(c) for c in coords.tolist()] == ec and num.tolist() == en
        assert feats.dtype == dtype and coords.dtype == torch.int32 and num.dtype == torch.int32
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(feats.double(), ef.reshape(-1, pts.shape[1]), rtol=tol, atol=tol)

    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_mean_gradcheck(self, impl):
        pts = make_points("clustered", torch.Generator().manual_seed(12), n=25).double().requires_grad_()
        assert torch.autograd.gradcheck(lambda p: voxelize_mean(p, VS, PR, impl=impl)[0], (pts,))

    def test_mean_equals_hard_with_room_for_all(self):
        pts = make_points("random", torch.Generator().manual_seed(13))
        feats, coords, num = voxelize_mean(pts, VS, PR)
        v, c, n = voxelize(pts, VS, PR, len(pts), len(pts))
        assert torch.equal(coords, c) and torch.equal(num, n)
        torch.testing.assert_close(feats, voxel_mean(v, n), rtol=1e-6, atol=1e-6)


    @pytest.mark.parametrize("case", CASES)
    def test_torch_sort_baseline_matches_naive(self, case):
        """The plain-torch voxelization (torch cells + the sort-based assignment the Triton path uses),
        which the benchmark times as its baseline."""
        pts = make_points(case, torch.Generator().manual_seed(hash(case) % 997))
        voxels, coords, num, slots = vox_sorted.hard_voxelize_sorted(pts, VS, PR, 3, 7)
        check_against_naive((voxels, coords, num), pts, 3, 7)


# ----------------------------------------------------------------------------- DynamicScatter
class TestDynamicScatter:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_matches_naive_loop(self, impl, case, dtype):
        """Means of every point of each occupied cell, coords (x, y, z), first-appearance order."""
        pts = make_points(case, torch.Generator().manual_seed(16)).to(dtype)
        out = DynamicScatter(list(VS), list(PR), impl=impl)(pts)
        assert isinstance(out, tuple) and len(out) == 2
        feats, coords = out
        ef, ec, _ = naive_mean(pts, VS, PR)
        assert coords.dtype == torch.int32 and coords.shape == (len(ec), 3)
        assert [tuple(c) for c in coords.tolist()] == ec
        assert feats.dtype == dtype and feats.shape == (len(ec), pts.shape[1])
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(feats.double(), ef.reshape(-1, pts.shape[1]), rtol=tol, atol=tol)

    def test_coords_follow_voxelization(self):
        """Same voxels, order and (x, y, z) columns as the hard Voxelization with room for every point."""
        pts = make_points("clustered", torch.Generator().manual_seed(17))
        feats, coords = DynamicScatter(list(VS), list(PR))(pts)
        voxels, hard_coords, num = Voxelization(list(VS), list(PR), max_num_points=len(pts),
                                                max_voxels=len(pts)).eval()(pts)
        assert torch.equal(coords, hard_coords)
        torch.testing.assert_close(feats, voxel_mean(voxels, num), rtol=1e-6, atol=1e-6)

    def test_module_and_config_arguments(self):
        m = DynamicScatter(list(VS), list(PR), max_num_points=-1, max_voxels=[5, 9])  # a hard config with -1
        assert len(m.state_dict()) == 0 and not list(m.parameters())
        pts = make_points("random", torch.Generator().manual_seed(18))
        assert m(pts)[1].shape[0] == len(naive_mean(pts, VS, PR)[1])  # max_voxels does not cap it
        with pytest.raises(ValueError, match="average_points=True"):
            DynamicScatter(list(VS), list(PR), average_points=False)
        with pytest.raises(ValueError, match="max_num_points=10 asks for hard voxels"):
            DynamicScatter(list(VS), list(PR), max_num_points=10)
        with pytest.raises(ValueError, match=r"DynamicScatter: impl must be one of \('auto', 'reference', 'cpu', "
                                             r"'triton'\), got 'numba'"):
            DynamicScatter(list(VS), list(PR), impl="numba")

    def test_gradient_reaches_the_points(self):
        pts = make_points("clustered", torch.Generator().manual_seed(19), n=25).double().requires_grad_()
        assert torch.autograd.gradcheck(lambda p: DynamicScatter(list(VS), list(PR), impl="cpu")(p)[0], (pts,))


def test_bevfusion_with_dynamic_voxels_builds_and_runs():
    """`voxelize.max_num_points: -1` makes BEVFusion build DynamicScatter (the official rule); the fused
    synthetic model then runs a training step and inference on it."""
    import sys
    from pathlib import Path

    from bevfusion.config import load_config
    from bevfusion.models import build_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
    import gpu_case  # the GPU tests' deterministic batch builder (runs on the CPU)

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/nuscenes/synthetic/fusion.yaml",
                      ["model.encoders.lidar.voxelize.max_num_points=-1"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    lidar = model.encoders["lidar"]
    assert isinstance(lidar.voxelize, DynamicScatter)
    batch = gpu_case.make_batch(cfg, batch_size=2, seed=1, points_per_sample=1500, boxes_per_sample=4)
    feats, coords, sizes = lidar.voxels(batch["points"])
    assert sizes is None and feats.shape == (coords.shape[0], 5) and coords.shape[1] == 4
    # each sample's voxels are DynamicScatter's means, after the batch column
    for b, pts in enumerate(batch["points"]):
        f, c = DynamicScatter(cfg.voxel_size, cfg.point_cloud_range)(pts.float())
        rows = coords[:, 0] == b
        assert torch.equal(coords[rows, 1:], c) and torch.equal(feats[rows], f)
    model.train()
    losses = model(batch)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        preds = model(batch)
    assert len(preds) == 2 and all(torch.isfinite(p["boxes_3d"]).all() for p in preds)


# ----------------------------------------------------------------------------- helpers and bad input
def test_grid_size_official():
    assert grid_size([0.075, 0.075, 0.2], [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]) == (1440, 1440, 40)
    assert grid_size([0.1, 0.1, 0.2], [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]) == (1024, 1024, 40)


def test_voxelization_module():
    m = Voxelization([1.0, 1.0, 0.5], list(PR), max_num_points=3, max_voxels=[5, 9])
    assert len(m.state_dict()) == 0 and not list(m.parameters())
    pts = make_points("random", torch.Generator().manual_seed(14))
    assert m.train()(pts)[0].shape == (5, 3, 5)
    assert m.eval()(pts)[0].shape == (9, 3, 5)
    dyn = Voxelization([1.0, 1.0, 0.5], list(PR), max_num_points=-1)
    assert torch.equal(dyn(pts), dynamic_voxelize(pts, VS, PR))
    with pytest.raises(ValueError, match=r"Voxelization: impl must be one of \('auto', 'reference', 'cpu', 'triton'\)"):
        Voxelization([1.0, 1.0, 0.5], list(PR), max_num_points=3, impl="torch")


@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_bad_input(impl):
    pts = make_points("random", torch.Generator().manual_seed(15))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        voxelize(pts.long(), VS, PR, 3, 10, impl=impl)
    with pytest.raises(ValueError, match="F >= 3"):
        voxelize(pts[:, :2], VS, PR, 3, 10, impl=impl)
    with pytest.raises(ValueError, match=r"\(P, F\)"):
        voxelize(pts[:, 0], VS, PR, 3, 10, impl=impl)
    with pytest.raises(TypeError, match="must be a tensor"):
        voxelize(pts.numpy(), VS, PR, 3, 10, impl=impl)
    with pytest.raises(ValueError, match="voxel_size must be 3"):
        voxelize(pts, VS[:2], PR, 3, 10, impl=impl)
    with pytest.raises(ValueError, match="positive"):
        voxelize(pts, (1.0, -1.0, 0.5), PR, 3, 10, impl=impl)
    with pytest.raises(ValueError, match="max > min"):
        voxelize(pts, VS, (0, 0, 0, 1, -1, 1), 3, 10, impl=impl)
    with pytest.raises(ValueError, match="empty axis"):
        voxelize(pts, (1.0, 1.0, 5.0), PR, 3, 10, impl=impl)
    with pytest.raises(ValueError, match="max_points must be >= 1"):
        voxelize(pts, VS, PR, 0, 10, impl=impl)
    with pytest.raises(TypeError, match="max_voxels must be an int"):
        voxelize(pts, VS, PR, 3, 10.5, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        voxelize(pts, VS, PR, 3, 10, impl="cuda")
    with pytest.raises(TypeError, match="max_points must be an int"):
        voxelize(pts, VS, PR, True, 10, impl=impl)
    # numpy / tensor integers are fine, and max_voxels=0 gives an empty result
    v, c, n = voxelize(pts, VS, PR, np.int64(3), torch.tensor(0), impl=impl)
    assert v.shape == (0, 3, 5) and c.shape == (0, 3) and n.shape == (0,)
    with pytest.raises(ValueError, match="voxel_size must be 3 finite"):
        dynamic_voxelize(pts, (1.0, math.nan, 1.0), PR, impl=impl)


# ----------------------------------------------------------------------------- GPU (pytest -m gpu)
@pytest.mark.gpu
@cuda_only
class TestGpu:
    def test_scene_matches_cpu(self):
        gen = torch.Generator().manual_seed(20)
        pts = torch.cat([torch.randn(300_000, 3, generator=gen) * torch.tensor([20.0, 20.0, 1.0]),
                         torch.rand(300_000, 2, generator=gen)], 1)
        vs, pr = (0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
        for dtype in (torch.float32, torch.float16, torch.float64):
            p = pts.to(dtype)
            cpu = voxelize(p, vs, pr, 10, 120_000, impl="cpu", return_slots=True)
            gpu = voxelize(p.cuda(), vs, pr, 10, 120_000, return_slots=True)
            for a, b in zip(gpu, cpu):
                assert torch.equal(a.cpu(), b)
            f1, c1, n1 = voxelize_mean(p, vs, pr)
            f2, c2, n2 = voxelize_mean(p.cuda(), vs, pr)
            assert torch.equal(c1, c2.cpu()) and torch.equal(n1, n2.cpu())
            torch.testing.assert_close(f1, f2.cpu(), rtol=1e-5 if dtype != torch.float16 else 1e-3, atol=1e-5)

"""BEV pooling: every impl against the float64 reference, the plan against first principles, the fused
lift + pool against the materialised path, gradchecks, geometry helpers and bad input.

Triton runs in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA),
so its cases use tiny shapes; `pytest -m gpu` runs the CUDA twins at realistic sizes.
"""
import pytest
import torch

import bevfusion.ops.bev_pool as bp
from bevfusion.ops.bev_pool import (BevPoolPlan, bev_pool, bev_pool_plan, bev_pool_reference, bev_pool_with_plan,
                                    grid_from_bounds, lift_bev_pool, points_to_bev_coords)
from bevfusion.ops.bev_pool.reference import lift_reference

IMPLS = ["reference", "cpu", "triton"]
# Elementwise relative tolerance per output dtype (inputs are exact in that dtype; error = fp32
# accumulation + one output rounding), plus the same times max|ref| as absolute slack for cancellation.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_matches(out, ref, dtype):
    assert out.dtype == dtype
    tol = TOL[dtype]
    ref = ref.detach().double()
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(out.detach().double(), ref, rtol=tol, atol=tol * scale)


def naive_pool(feats, coords, batch_size, grid):
    """Python loop over points in float64: the oracle's oracle."""
    d, h, w = grid
    out = torch.zeros(batch_size, feats.shape[1], d, h, w, dtype=torch.float64)
    for f, (x, y, z, b) in zip(feats.double(), coords.tolist()):
        if 0 <= x < h and 0 <= y < w and 0 <= z < d and 0 <= b < batch_size:
            out[b, :, z, x, y] += f
    return out


def make_case(name, gen, c=5, batch_size=2, grid=(2, 4, 3)):
    d, h, w = grid
    if name == "empty":
        coords = torch.zeros(0, 4, dtype=torch.int32)
    elif name == "one_point":
        coords = torch.tensor([[1, 2, 1, 1]], dtype=torch.int32)
    elif name == "one_cell":
        coords = torch.tensor([[3, 0, 1, 0]] * 37, dtype=torch.int32)
    elif name == "all_outside":
        coords = torch.tensor([[-1, 0, 0, 0], [h, 0, 0, 0], [0, w, 0, 0], [0, -1, 0, 0], [0, 0, d, 0],
                               [0, 0, -1, 0], [0, 0, 0, batch_size], [0, 0, 0, -1]], dtype=torch.int32)
    elif name == "random":  # several batches, duplicates, about a third outside
        n = 150
        coords = torch.stack([torch.randint(-2, h + 2, (n,), generator=gen),
                              torch.randint(-1, w + 1, (n,), generator=gen),
                              torch.randint(-1, d + 1, (n,), generator=gen),
                              torch.randint(0, batch_size + 1, (n,), generator=gen)], 1).to(torch.int64)
    else:
        raise KeyError(name)
    feats = torch.randn(coords.shape[0], c, generator=gen, dtype=torch.float64)
    return feats, coords, batch_size, grid


CASES = ["empty", "one_point", "one_cell", "all_outside", "random"]


class TestReference:
    @pytest.mark.parametrize("case", CASES)
    def test_reference_vs_python_loop(self, case):
        feats, coords, b, grid = make_case(case, torch.Generator().manual_seed(0))
        out = bev_pool_reference(feats, coords, b, grid)
        torch.testing.assert_close(out, naive_pool(feats, coords, b, grid), rtol=1e-12, atol=1e-12)


class TestBevPool:
    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("impl", IMPLS)
    def test_fp32_cases(self, impl, case):
        feats, coords, b, grid = make_case(case, torch.Generator().manual_seed(1))
        out = bev_pool(feats.float(), coords, b, grid, impl=impl)
        assert out.shape == (b, feats.shape[1], *grid)
        assert_matches(out, naive_pool(feats.float(), coords, b, grid), torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    @pytest.mark.parametrize("impl", IMPLS)
    def test_dtypes(self, impl, dtype):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(2))
        feats = feats.to(dtype)
        out = bev_pool(feats, coords, b, grid, impl=impl)
        assert_matches(out, bev_pool_reference(feats.double(), coords, b, grid), dtype)

    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_long_intervals_and_wide_channels(self, impl):
        # Intervals longer than a kernel step and C > 128 (two channel blocks in Triton).
        gen = torch.Generator().manual_seed(3)
        n, c, grid = 300, 130 if impl == "triton" else 300, (1, 3, 2)
        coords = torch.stack([torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen),
                              torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)], 1)
        feats = torch.randn(n, c, generator=gen)
        out = bev_pool(feats, coords, 1, grid, impl=impl)
        assert_matches(out, bev_pool_reference(feats.double(), coords, 1, grid), torch.float32)

    def test_cpu_realistic_size(self):
        # Many cells and long, uneven intervals through the threaded numba path.
        gen = torch.Generator().manual_seed(4)
        n, c, grid = 60000, 16, (1, 40, 40)
        xy = (torch.randn(n, 2, generator=gen) * 8 + 20).long()
        coords = torch.cat([xy, torch.zeros(n, 1, dtype=torch.long), torch.randint(0, 2, (n, 1), generator=gen)], 1)
        feats = torch.randn(n, c, generator=gen)
        assert_matches(bev_pool(feats, coords, 2, grid, impl="cpu"),
                       bev_pool_reference(feats.double(), coords, 2, grid), torch.float32)

    @pytest.mark.parametrize("impl", IMPLS)
    def test_layout_and_noncontiguous_inputs(self, impl):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(5), c=6)
        feats = feats.float()
        ref = bev_pool_reference(feats.double(), coords, b, grid)
        feats_t = feats.t().contiguous().t()  # same values, column-major strides
        coords_nc = torch.stack([coords, coords], 2)[:, :, 0]  # same values, stride 2
        assert not feats_t.is_contiguous() and not coords_nc.is_contiguous()
        assert torch.equal(coords_nc, coords)
        out = bev_pool(feats_t, coords_nc, b, grid, impl=impl)
        assert_matches(out, ref, torch.float32)
        if impl != "reference":  # the kernels write channel rows: (B, D, H, W, C) memory
            assert out.is_contiguous(memory_format=torch.channels_last_3d)

    def test_auto_is_cpu_on_cpu(self, monkeypatch):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(6))
        calls = []
        real = bp._pool_forward
        monkeypatch.setattr(bp, "_pool_forward", lambda f, p, impl: calls.append(impl) or real(f, p, impl))
        bev_pool(feats.float(), coords, b, grid)
        assert calls == ["cpu"]

    @pytest.mark.parametrize("impl", ["torch", "numba", "gather"])
    def test_unknown_impl_names_the_op_and_the_choices(self, impl):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(7))
        match = r"impl must be one of \('auto', 'reference', 'cpu', 'triton'\), got '" + impl + "'"
        with pytest.raises(ValueError, match="bev_pool: " + match):
            bev_pool(feats.float(), coords, b, grid, impl=impl)
        with pytest.raises(ValueError, match="bev_pool_plan: " + match):
            bev_pool_plan(coords, b, grid, impl=impl)


class TestPlan:
    def test_plan_from_first_principles(self):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(8))
        d, h, w = grid
        plan = bev_pool_plan(coords, b, grid)
        assert plan.num_points == coords.shape[0] and plan.num_cells == b * d * h * w
        expected_cells = []
        for x, y, z, bi in coords.tolist():
            inside = 0 <= x < h and 0 <= y < w and 0 <= z < d and 0 <= bi < b
            expected_cells.append(((bi * d + z) * h + x) * w + y if inside else -1)
        assert plan.point_cells.tolist() == expected_cells
        kept = [i for i, cell in enumerate(expected_cells) if cell >= 0]
        # Stable sort of the kept points by cell.
        assert plan.order.tolist() == sorted(kept, key=lambda i: expected_cells[i])
        assert plan.ranks.tolist() == [expected_cells[i] for i in plan.order.tolist()]
        counts = {}
        for cell in expected_cells:
            if cell >= 0:
                counts[cell] = counts.get(cell, 0) + 1
        assert plan.interval_cells.tolist() == sorted(counts)
        assert plan.interval_lengths.tolist() == [counts[cell] for cell in sorted(counts)]
        for s, length, cell in zip(plan.interval_starts.tolist(), plan.interval_lengths.tolist(),
                                   plan.interval_cells.tolist()):
            assert set(plan.ranks[s:s + length].tolist()) == {cell}
            assert plan.cell_ptr[cell] == s and plan.cell_ptr[cell + 1] == s + length
        lengths = (plan.cell_ptr[1:] - plan.cell_ptr[:-1])[plan.launch_cells]
        assert sorted(plan.launch_cells.tolist()) == list(range(plan.num_cells))
        assert torch.all(lengths[1:] <= lengths[:-1])

    @pytest.mark.parametrize("case", CASES)
    def test_torch_sort_path_matches_counting_sort(self, case):
        # The torch build is what CUDA coords take (impl "triton"), and the reference's.
        _, coords, b, grid = make_case(case, torch.Generator().manual_seed(9))
        fast = bev_pool_plan(coords, b, grid, impl="cpu")
        slow = bev_pool_plan(coords, b, grid, impl="reference")
        for name in ("order", "ranks", "point_cells", "interval_starts", "interval_lengths", "interval_cells",
                     "cell_ptr", "launch_cells"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name

    @pytest.mark.parametrize("impl", IMPLS)
    def test_cached_plan_reused_across_frames(self, impl):
        gen = torch.Generator().manual_seed(10)
        _, coords, b, grid = make_case("random", gen)
        plan = bev_pool_plan(coords, b, grid).to("cpu")
        assert isinstance(plan, BevPoolPlan)
        for _ in range(2):
            feats = torch.randn(coords.shape[0], 3, generator=gen)
            ref = bev_pool_reference(feats.double(), coords, b, grid)
            assert_matches(bev_pool(feats, plan=plan, impl=impl), ref, torch.float32)
            assert_matches(bev_pool_with_plan(feats, plan, impl=impl), ref, torch.float32)

    def test_promise_inside_is_checked(self):
        coords = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [5, 0, 0, 0]])
        with pytest.raises(ValueError, match=r"1 of 3 points lie outside.*point 2"):
            bev_pool_plan(coords, 1, (1, 2, 2), drop_outside=False)
        plan = bev_pool_plan(coords[:2], 1, (1, 2, 2), drop_outside=False)
        assert plan.num_kept == 2
        for impl in IMPLS:
            with pytest.raises(ValueError, match="lie outside"):
                bev_pool(torch.ones(3, 2), coords, 1, (1, 2, 2), impl=impl, drop_outside=False)


class TestGradients:
    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_gradcheck(self, impl):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(11), c=3)
        feats = feats[:40].clone().requires_grad_()
        coords = coords[:40]
        # The interpreter is slow: Triton gets gradcheck's fast mode (random projections of the Jacobian).
        assert torch.autograd.gradcheck(lambda f: bev_pool(f, coords, b, grid, impl=impl), (feats,),
                                        fast_mode=impl == "triton")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_backward_matches_reference(self, impl, dtype):
        feats, coords, b, grid = make_case("random", torch.Generator().manual_seed(12))
        f = feats.to(dtype).requires_grad_()
        out = bev_pool(f, coords, b, grid, impl=impl)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).to(dtype)
        (grad,) = torch.autograd.grad(out, f, g)
        fr = feats.to(dtype).double().requires_grad_()
        (ref,) = torch.autograd.grad(bev_pool_reference(fr, coords, b, grid), fr, g.double())
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=0)  # a gather: exact


def make_lift_case(gen, bn=2, d_bins=3, fh=2, fw=3, c=4, grid=(1, 3, 3), batch_size=2, outside=True):
    depth = torch.rand(bn, d_bins, fh, fw, generator=gen, dtype=torch.float64)
    feats = torch.randn(bn, fh, fw, c, generator=gen, dtype=torch.float64)
    n = depth.numel()
    lo = -1 if outside else 0
    coords = torch.stack([torch.randint(lo, grid[1], (n,), generator=gen),
                          torch.randint(lo, grid[2], (n,), generator=gen),
                          torch.zeros(n, dtype=torch.int64), torch.arange(n) * batch_size // n], 1)
    return depth, feats, coords, batch_size, grid


class TestLiftBevPool:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("impl", IMPLS)
    def test_forward(self, impl, dtype):
        depth, feats, coords, b, grid = make_lift_case(torch.Generator().manual_seed(20))
        depth, feats = depth.to(dtype), feats.to(dtype)
        out = lift_bev_pool(depth, feats, coords, b, grid, impl=impl)
        # Oracle: the products in float64 from the same (rounded) inputs, then the float64 pool.
        ref = bev_pool_reference(lift_reference(depth.double(), feats.double()), coords, b, grid)
        if impl == "reference" and dtype != torch.float32:  # materialises the products in `dtype`
            tol = TOL[dtype] * 4
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
        else:
            assert_matches(out, ref, dtype)

    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_gradcheck(self, impl):
        depth, feats, coords, b, grid = make_lift_case(torch.Generator().manual_seed(21))
        depth.requires_grad_()
        feats.requires_grad_()
        assert torch.autograd.gradcheck(lambda d, f: lift_bev_pool(d, f, coords, b, grid, impl=impl), (depth, feats),
                                        fast_mode=impl == "triton")

    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_backward_fp32_and_plan(self, impl):
        depth, feats, coords, b, grid = make_lift_case(torch.Generator().manual_seed(22), c=5)
        plan = bev_pool_plan(coords, b, grid)
        d, f = depth.float().requires_grad_(), feats.float().permute(0, 3, 1, 2).requires_grad_()
        out = lift_bev_pool(d, f.permute(0, 2, 3, 1), plan=plan, impl=impl)  # non-contiguous feats view
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(23))
        gd, gf = torch.autograd.grad(out, (d, f), g)
        dr, fr = depth.float().double().requires_grad_(), feats.float().double().requires_grad_()
        rd, rf = torch.autograd.grad(bev_pool_reference(lift_reference(dr, fr), coords, b, grid), (dr, fr), g.double())
        torch.testing.assert_close(gd.double(), rd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gf.double(), rf.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)

    def test_only_depth_grad(self):
        depth, feats, coords, b, grid = make_lift_case(torch.Generator().manual_seed(24))
        d = depth.requires_grad_()
        (gd,) = torch.autograd.grad(lift_bev_pool(d, feats, coords, b, grid, impl="triton").sum(), d)
        dr = depth.detach().clone().requires_grad_()
        (rd,) = torch.autograd.grad(bev_pool_reference(lift_reference(dr, feats), coords, b, grid).sum(), dr)
        torch.testing.assert_close(gd, rd)

    def test_bad_input(self):
        depth, feats, coords, b, grid = make_lift_case(torch.Generator().manual_seed(25))
        with pytest.raises(TypeError, match="share a dtype"):
            lift_bev_pool(depth.float(), feats, coords, b, grid)
        with pytest.raises(ValueError, match=r"\(BN, D, fH, fW\)"):
            lift_bev_pool(depth, feats.permute(0, 3, 1, 2), coords, b, grid)
        with pytest.raises(ValueError, match="coords must be"):
            lift_bev_pool(depth, feats, coords[:-1], b, grid)
        plan = bev_pool_plan(coords[:-1], b, grid)
        with pytest.raises(ValueError, match="plan covers"):
            lift_bev_pool(depth, feats, plan=plan)


class TestGeometry:
    def test_grid_from_bounds(self):
        dx, lower, nx = grid_from_bounds([-54.0, 54.0, 0.3], [-54.0, 54.0, 0.3], [-10.0, 10.0, 20.0])
        assert nx == (360, 360, 1)
        torch.testing.assert_close(dx, torch.tensor([0.3, 0.3, 20.0]))
        torch.testing.assert_close(lower, torch.tensor([-54.0, -54.0, -10.0]))

    def test_official_truncation(self):
        dx, lower, nx = grid_from_bounds([-54.0, 54.0, 0.3], [-54.0, 54.0, 0.3], [-10.0, 10.0, 20.0])
        pts = torch.tensor([[-54.1, 0.0, 0.0],   # within one cell below: truncates to cell 0 (quirk)
                            [-54.4, 0.0, 0.0],   # more than a cell below: -1, dropped
                            [53.99, 53.99, 9.9],  # last cell
                            [54.0, 0.0, 0.0],    # upper bound: cell nx, dropped
                            [float("nan"), 0.0, 0.0], [1e30, 0.0, 0.0], [-1e30, 0.0, 0.0]])
        coords = points_to_bev_coords(pts[None], dx, lower, nx)
        assert coords.dtype == torch.int64 and coords.shape == (7, 4)
        assert coords[:, 0].tolist() == [0, -1, 359, 360, -1, 361, -1]
        assert coords[2, :3].tolist() == [359, 359, 0]
        plan = bev_pool_plan(coords, 1, (nx[2], nx[0], nx[1]))
        assert plan.order.tolist() == [0, 2]

    def test_matches_official_formula_and_batch_column(self):
        gen = torch.Generator().manual_seed(30)
        dx, lower, nx = grid_from_bounds([-54.0, 54.0, 0.3], [-54.0, 54.0, 0.3], [-10.0, 10.0, 20.0])
        geom = (torch.rand(2, 3, 4, 5, 3, generator=gen) - 0.5) * torch.tensor([100.0, 100.0, 15.0])
        coords = points_to_bev_coords(geom, dx, lower, nx)
        bx = torch.tensor([-54.0 + 0.15, -54.0 + 0.15, 0.0])
        official = ((geom - (bx - dx / 2.0)) / dx).long().view(-1, 3)  # vtransforms/base.py
        assert torch.equal(coords[:, :3], official)
        assert coords[:, 3].tolist() == [0] * 60 + [1] * 60

    def test_view_transform_flow_matches_official_steps(self):
        # geometry -> coords -> plan -> fused lift + pool, against the official steps written out:
        # outer product, truncating cell index, mask, sum per cell.
        gen = torch.Generator().manual_seed(31)
        b, n_cam, d_bins, fh, fw, c = 2, 2, 3, 2, 4, 5
        dx, lower, nx = grid_from_bounds([-3.0, 3.0, 1.0], [-2.0, 2.0, 0.5], [-1.0, 1.0, 2.0])
        geom = (torch.rand(b, n_cam, d_bins, fh, fw, 3, generator=gen) - 0.5) * torch.tensor([7.0, 5.0, 2.5])
        depth = torch.rand(b * n_cam, d_bins, fh, fw, generator=gen, dtype=torch.float64)
        feats = torch.randn(b * n_cam, fh, fw, c, generator=gen, dtype=torch.float64)
        grid = (nx[2], nx[0], nx[1])
        coords = points_to_bev_coords(geom, dx, lower, nx)
        plan = bev_pool_plan(coords, b, grid)
        expected = torch.zeros(b, c, *grid, dtype=torch.float64)
        x = depth.view(b, n_cam, d_bins, fh, fw, 1) * feats.view(b, n_cam, 1, fh, fw, c)
        cell = ((geom - lower) / dx).long()
        for idx in torch.cartesian_prod(*(torch.arange(s) for s in geom.shape[:5])).tolist():
            ix, iy, iz = cell[tuple(idx)].tolist()
            if 0 <= ix < nx[0] and 0 <= iy < nx[1] and 0 <= iz < nx[2]:
                expected[idx[0], :, iz, ix, iy] += x[tuple(idx)]
        for impl in IMPLS:
            torch.testing.assert_close(lift_bev_pool(depth, feats, plan=plan, impl=impl), expected)


class TestBadInput:
    def setup_method(self):
        self.feats, self.coords, self.b, self.grid = make_case("random", torch.Generator().manual_seed(40))
        self.feats = self.feats.float()

    @pytest.mark.parametrize("impl", IMPLS)
    def test_dtypes(self, impl):
        with pytest.raises(TypeError, match="integer"):
            bev_pool(self.feats, self.coords.float(), self.b, self.grid, impl=impl)
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            bev_pool(self.feats.int(), self.coords, self.b, self.grid, impl=impl)

    @pytest.mark.parametrize("impl", IMPLS)
    def test_shapes(self, impl):
        with pytest.raises(ValueError, match="N = "):
            bev_pool(self.feats[:-1], self.coords, self.b, self.grid, impl=impl)
        with pytest.raises(ValueError, match=r"\(N, 4\)"):
            bev_pool(self.feats, self.coords[:, :3], self.b, self.grid, impl=impl)
        with pytest.raises(ValueError, match="grid"):
            bev_pool(self.feats, self.coords, self.b, (2, 4), impl=impl)
        with pytest.raises(ValueError, match="batch_size"):
            bev_pool(self.feats, self.coords, 0, self.grid, impl=impl)

    def test_plan_misuse(self):
        plan = bev_pool_plan(self.coords, self.b, self.grid)
        with pytest.raises(ValueError, match="plan.num_points"):
            bev_pool(self.feats[:-1], plan=plan)
        with pytest.raises(ValueError, match="either coords"):
            bev_pool(self.feats, self.coords, plan=plan)
        with pytest.raises(ValueError, match="disagrees"):
            bev_pool(self.feats, batch_size=self.b + 1, plan=plan)
        with pytest.raises(ValueError, match="disagrees"):
            bev_pool(self.feats, grid=(1, 1, 1), plan=plan)
        with pytest.raises(TypeError, match="BevPoolPlan"):
            bev_pool_with_plan(self.feats, {"order": plan.order})
        with pytest.raises(ValueError, match="impl must be one of"):
            bev_pool(self.feats, plan=plan, impl="cuda")

    def test_triton_on_cpu_without_interpreter(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            bev_pool(self.feats, self.coords, self.b, self.grid, impl="triton")

    def test_huge_coords_are_dropped_not_wrapped(self):
        # Cell ids computed in int64: no overflow into a valid cell.
        coords = torch.tensor([[2**31 - 1, 0, 0, 0], [0, 2**31 - 1, 0, 0], [-2**31, 0, 0, 0], [1, 1, 1, 1]],
                              dtype=torch.int32)
        feats = torch.ones(4, 2)
        for impl in IMPLS:
            out = bev_pool(feats, coords, 2, (2, 4, 3), impl=impl)
            assert float(out.sum()) == 2.0 and float(out[1, :, 1, 1, 1].sum()) == 2.0


# ----------------------------------------------------------------------------- GPU (pytest -m gpu)
@pytest.mark.gpu
@cuda_only
class TestGpu:
    def _problem(self, n=200_000, c=80, grid=(1, 128, 128), b=2):
        gen = torch.Generator().manual_seed(50)
        xy = (torch.randn(n, 2, generator=gen) * 40 + 64).long()
        coords = torch.cat([xy, torch.zeros(n, 1, dtype=torch.long), torch.randint(0, b, (n, 1), generator=gen)], 1)
        feats = torch.randn(n, c, generator=gen)
        return feats, coords, b, grid

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
    def test_forward_backward(self, dtype):
        feats, coords, b, grid = self._problem()
        ref = bev_pool_reference(feats.to(dtype).double(), coords, b, grid)
        f = feats.to("cuda", dtype).requires_grad_()
        out = bev_pool(f, coords.cuda(), b, grid)  # auto -> triton
        assert_matches(out.cpu(), ref, dtype)
        g = torch.randn(out.shape, device="cuda", dtype=dtype)
        (grad,) = torch.autograd.grad(out, f, g)
        cells = bev_pool_plan(coords, b, grid).point_cells
        expected = g.permute(0, 2, 3, 4, 1).reshape(-1, feats.shape[1]).cpu()[cells.clamp(min=0)]
        expected[cells < 0] = 0
        assert torch.equal(grad.cpu(), expected)

    def test_plan_on_cuda_matches_cpu(self):
        _, coords, b, grid = self._problem()
        cpu_plan, gpu_plan = bev_pool_plan(coords, b, grid), bev_pool_plan(coords.cuda(), b, grid)
        for name in ("order", "ranks", "point_cells", "interval_starts", "interval_lengths", "interval_cells",
                     "cell_ptr", "launch_cells"):
            assert torch.equal(getattr(gpu_plan, name).cpu(), getattr(cpu_plan, name)), name

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_lift(self, dtype):
        gen = torch.Generator().manual_seed(51)
        bn, d_bins, fh, fw, c = 6, 20, 8, 22, 80
        depth = torch.rand(bn, d_bins, fh, fw, generator=gen).to(dtype)
        feats = torch.randn(bn, fh, fw, c, generator=gen).to(dtype)
        n = depth.numel()
        coords = torch.stack([torch.randint(-2, 60, (n,), generator=gen), torch.randint(-2, 60, (n,), generator=gen),
                              torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)], 1)
        grid = (1, 60, 60)
        dr, fr = depth.double().requires_grad_(), feats.double().requires_grad_()
        ref = bev_pool_reference(lift_reference(dr, fr), coords, 1, grid)
        g = torch.randn(ref.shape, generator=gen)
        rd, rf = torch.autograd.grad(ref, (dr, fr), g.double())
        d, f = depth.cuda().requires_grad_(), feats.cuda().requires_grad_()
        out = lift_bev_pool(d, f, coords.cuda(), 1, grid)
        assert_matches(out.cpu(), ref.detach(), dtype)
        gd, gf = torch.autograd.grad(out, (d, f), g.to("cuda", dtype))
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(gd.double().cpu(), rd, rtol=tol, atol=tol * float(rd.abs().max()))
        torch.testing.assert_close(gf.double().cpu(), rf, rtol=tol, atol=tol * float(rf.abs().max()))

    def test_empty_and_outside_on_cuda(self):
        out = bev_pool(torch.zeros(0, 8, device="cuda"), torch.zeros(0, 4, dtype=torch.int32, device="cuda"), 2,
                       (1, 5, 5))
        assert out.shape == (2, 8, 1, 5, 5) and not out.any()
        coords = torch.tensor([[5, 0, 0, 0], [0, 0, 0, 2], [-1, 0, 0, 0]], device="cuda")
        out = bev_pool(torch.ones(3, 8, device="cuda"), coords, 2, (1, 5, 5))
        assert not out.any()


def test_import_needs_no_triton_or_numba():
    import subprocess
    import sys

    code = ("import sys; import bevfusion.ops.bev_pool as bp; "
            "assert 'triton' not in sys.modules and 'numba' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


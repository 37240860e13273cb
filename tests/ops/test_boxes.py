"""Box ops: rotated BEV IoU and intersection area against shapely polygons (random and degenerate
pairs), the IoU's union clamp (`min_union`, old mmdet3d's iou_bev) against a float64 loop, NMS against a
naive greedy loop with shapely IoU, circle NMS against a float32 loop (as mmdet3d's), points-in-boxes
against a float64 loop, corners against the numpy structures helper, and bad input.

Triton runs in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so its cases are small; `pytest -m gpu` runs the CUDA twins at realistic sizes.
"""
import math

import numpy as np
import pytest
import torch

shapely = pytest.importorskip("shapely")
from shapely import affinity  # noqa: E402
from shapely.geometry import box as shapely_box  # noqa: E402

from bevfusion.ops.boxes import (batched_circle_nms, batched_nms_bev, box_corners_3d, box_corners_bev,  # noqa: E402
                                 circle_nms, nms_bev, points_in_boxes, points_in_boxes_idx, rotated_intersection_bev,
                                 rotated_iou_bev)
from bevfusion.structures.boxes import box_corners as box_corners_np  # noqa: E402

IMPLS = ["reference", "cpu", "triton"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----------------------------------------------------------------------------- oracles
def shapely_poly(b):
    x, y, dx, dy, yaw = float(b[0]), float(b[1]), float(b[3]), float(b[4]), float(b[6])
    p = shapely_box(-dx / 2, -dy / 2, dx / 2, dy / 2)
    return affinity.translate(affinity.rotate(p, yaw, origin=(0, 0), use_radians=True), x, y)


def shapely_iou(a, b):
    pa, pb = shapely_poly(a), shapely_poly(b)
    union = pa.union(pb).area
    return pa.intersection(pb).area / union if union > 0 else 0.0


def shapely_matrix(a, b):
    return torch.tensor([[shapely_iou(p, q) for q in b.double()] for p in a.double()],
                        dtype=torch.float64).reshape(len(a), len(b))


def shapely_inter(a, b):
    return shapely_poly(a).intersection(shapely_poly(b)).area


def shapely_inter_matrix(a, b):
    return torch.tensor([[shapely_inter(p, q) for q in b.double()] for p in a.double()],
                        dtype=torch.float64).reshape(len(a), len(b))


def clamped_iou(a, b, min_union):
    """Old mmdet3d's iou_bev in float64: inter / max(area_a + area_b - inter, min_union) (shapely areas)."""
    inter = shapely_inter(a, b)
    union = max(float(a[3] * a[4] + b[3] * b[4]) - inter, min_union)
    return inter / union if union > 0 else 0.0


def rand_boxes(n, gen, spread=4.0, dtype=torch.float64):
    b = torch.zeros(n, 9, dtype=torch.float64)
    b[:, :2] = (torch.rand(n, 2, generator=gen) * 2 - 1) * spread
    b[:, 2] = torch.randn(n, generator=gen)
    b[:, 3:6] = torch.rand(n, 3, generator=gen) * 3 + 0.2
    b[:, 6] = (torch.rand(n, generator=gen) * 2 - 1) * math.pi
    b[:, 7:] = torch.randn(n, 2, generator=gen)  # velocity columns: ignored
    return b.to(dtype)


def degenerate_pairs():
    """(a, b) pairs that stress exactness: identical, disjoint, touching, contained, 90° turns."""
    base = torch.tensor([1.0, -2.0, 0.0, 4.0, 2.0, 1.5, 0.4, 0.0, 0.0], dtype=torch.float64)
    c, s = math.cos(0.4), math.sin(0.4)
    pairs = []

    def shifted(b, along, across, **kw):
        out = b.clone()
        out[0] += along * c - across * s
        out[1] += along * s + across * c
        for k, v in kw.items():
            out[{"dx": 3, "dy": 4, "yaw": 6}[k]] = v
        return out

    pairs.append((base, base.clone()))  # identical
    pairs.append((base, shifted(base, 10.0, 0.0)))  # disjoint
    pairs.append((base, shifted(base, 4.0, 0.0)))  # touching along a short side
    pairs.append((base, shifted(base, 0.0, 2.0)))  # touching along a long side
    pairs.append((base, shifted(base, 4.0, 2.0)))  # touching at a corner
    pairs.append((base, shifted(base, 2.0, 0.5)))  # shares a side line, half overlaps
    pairs.append((base, shifted(base, 0.3, 0.1, dx=1.0, dy=0.5)))  # contained, same heading
    pairs.append((base, shifted(base, -0.5, 0.2, dx=1.0, dy=0.5, yaw=1.9)))  # contained, rotated
    sq = base.clone()
    sq[3] = sq[4] = 2.0
    pairs.append((sq, shifted(sq, 0, 0, yaw=0.4 + math.pi / 2)))  # square turned 90°: identical shape
    pairs.append((base, shifted(base, 0, 0, yaw=0.4 + math.pi / 2)))  # cross (plus sign)
    pairs.append((base, shifted(base, 0, 0, yaw=0.4 + math.pi)))  # turned 180°: same rectangle
    pairs.append((base, shifted(base, 1.0, 0.0, yaw=0.4 - math.pi / 2)))  # turned -90° and shifted
    pairs.append((base, shifted(base, 0, 0, dx=0.0)))  # zero-area box
    ax = base.clone()
    ax[6] = 0.0
    ax2 = ax.clone()
    ax2[0] += 4.0
    pairs.append((ax, ax2))  # axis-aligned, touching
    ax3 = ax.clone()
    ax3[6] = math.pi / 2
    pairs.append((ax, ax3))  # axis-aligned cross
    a = torch.stack([p[0] for p in pairs])
    b = torch.stack([p[1] for p in pairs])
    return a, b


def tol(dtype):
    return 1e-9 if dtype == torch.float64 else 2e-5


# ----------------------------------------------------------------------------- IoU
class TestRotatedIou:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_random_vs_shapely(self, impl, dtype):
        gen = torch.Generator().manual_seed(0)
        a, b = rand_boxes(12, gen, spread=2.5, dtype=dtype), rand_boxes(9, gen, spread=2.5, dtype=dtype)
        expected = shapely_matrix(a, b)
        assert (expected > 0).float().mean() > 0.2  # the test must see overlaps
        out = rotated_iou_bev(a, b, impl=impl)
        assert out.shape == (12, 9) and out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol(dtype))

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_degenerate_pairs_vs_shapely(self, impl, dtype):
        a, b = degenerate_pairs()
        a, b = a.to(dtype), b.to(dtype)
        expected = torch.tensor([shapely_iou(p, q) for p, q in zip(a.double(), b.double())], dtype=torch.float64)
        out = rotated_iou_bev(a, b, aligned=True, impl=impl)
        assert out.shape == (len(a),)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol(dtype))
        # and in the full matrix, both argument orders (IoU is symmetric)
        full = rotated_iou_bev(a, b, impl=impl)
        torch.testing.assert_close(full.diagonal().double(), expected, rtol=0, atol=tol(dtype))
        torch.testing.assert_close(rotated_iou_bev(b, a, impl=impl).double(), full.double().t(), rtol=0,
                                   atol=tol(dtype))

    def test_identical_is_exactly_one(self):
        a = rand_boxes(20, torch.Generator().manual_seed(1))
        assert torch.all(rotated_iou_bev(a, a, aligned=True, impl="cpu") == 1.0)  # b in a's frame: exact
        ref = rotated_iou_bev(a, a, aligned=True, impl="reference")  # world-frame clipping: rounding
        torch.testing.assert_close(ref, torch.ones_like(ref), rtol=0, atol=1e-12)

    @pytest.mark.parametrize("impl", IMPLS)
    def test_batched_and_empty(self, impl):
        gen = torch.Generator().manual_seed(2)
        a, b = rand_boxes(6, gen).view(2, 3, 9), rand_boxes(8, gen).view(2, 4, 9)
        out = rotated_iou_bev(a, b, impl=impl)
        assert out.shape == (2, 3, 4)
        for k in range(2):
            torch.testing.assert_close(out[k], shapely_matrix(a[k], b[k]), rtol=0, atol=1e-9)
        assert rotated_iou_bev(a[0, :0], b[0], impl=impl).shape == (0, 4)
        assert rotated_iou_bev(a[0], b[0, :0], impl=impl).shape == (3, 0)
        assert rotated_iou_bev(a[0, :0], b[0, :0], aligned=True, impl=impl).shape == (0,)
        assert rotated_iou_bev(a[:0], b[:0], impl=impl).shape == (0, 3, 4)

    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_non_contiguous_and_half(self, impl):
        gen = torch.Generator().manual_seed(3)
        a, b = rand_boxes(7, gen), rand_boxes(5, gen)
        at = a.t().contiguous().t()  # column-major
        assert not at.is_contiguous()
        torch.testing.assert_close(rotated_iou_bev(at, b[::1], impl=impl), shapely_matrix(a, b), rtol=0, atol=1e-9)
        torch.testing.assert_close(rotated_iou_bev(a[::2], b, impl=impl), shapely_matrix(a[::2], b), rtol=0,
                                   atol=1e-9)
        h = rotated_iou_bev(a.half(), b.half(), impl=impl)
        assert h.dtype == torch.float16
        torch.testing.assert_close(h.double(), shapely_matrix(a.half(), b.half()), rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------- intersection area, union clamp
def area_tol(dtype, scale=1.0):
    """Absolute tolerance on areas of boxes up to `scale` m across."""
    return (1e-9 if dtype == torch.float64 else 2e-5) * max(scale, 1.0) ** 2


class TestRotatedIntersection:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_random_vs_shapely(self, impl, dtype):
        gen = torch.Generator().manual_seed(30)
        a, b = rand_boxes(12, gen, spread=2.5, dtype=dtype), rand_boxes(9, gen, spread=2.5, dtype=dtype)
        expected = shapely_inter_matrix(a, b)
        assert (expected > 0).float().mean() > 0.2
        out = rotated_intersection_bev(a, b, impl=impl)
        assert out.shape == (12, 9) and out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=area_tol(dtype, 4.0))
        # the IoU is this area over the union, for every impl
        area = (a[:, 3] * a[:, 4]).double()[:, None] + (b[:, 3] * b[:, 4]).double()[None]
        torch.testing.assert_close(rotated_iou_bev(a, b, impl=impl).double(), expected / (area - expected), rtol=0,
                                   atol=tol(dtype))

    @pytest.mark.parametrize("impl", IMPLS)
    def test_degenerate_pairs_batched_and_empty(self, impl):
        a, b = degenerate_pairs()
        expected = torch.tensor([shapely_inter(p, q) for p, q in zip(a, b)], dtype=torch.float64)
        assert expected[0] == pytest.approx(8.0) and expected[1] == 0.0  # identical: the whole 4 x 2 box; disjoint
        out = rotated_intersection_bev(a, b, aligned=True, impl=impl)
        assert out.shape == (len(a),)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        torch.testing.assert_close(rotated_intersection_bev(a, b, impl=impl).diagonal(), expected, rtol=0, atol=1e-9)
        batched = rotated_intersection_bev(a[:14].view(2, 7, 9), b[:12].view(2, 6, 9), impl=impl)
        assert batched.shape == (2, 7, 6)
        for k in range(2):
            torch.testing.assert_close(batched[k], shapely_inter_matrix(a[7 * k:7 * k + 7], b[6 * k:6 * k + 6]),
                                       rtol=0, atol=1e-9)
        assert rotated_intersection_bev(a[:0], b, impl=impl).shape == (0, len(b))
        assert rotated_intersection_bev(a[:0], b[:0], aligned=True, impl=impl).shape == (0,)

    def test_half_precision_triton(self):
        gen = torch.Generator().manual_seed(31)
        a, b = rand_boxes(7, gen), rand_boxes(5, gen)
        h = rotated_intersection_bev(a.half(), b.half(), impl="triton")
        assert h.dtype == torch.float16
        torch.testing.assert_close(h.double(), shapely_inter_matrix(a.half(), b.half()), rtol=2e-3, atol=2e-3)

    @pytest.mark.parametrize("impl", ["reference", "cpu"])
    def test_extreme_sizes(self, impl):
        """Needles kilometres long and boxes of a few nanometres (what random head weights decode to):
        areas stay within [0, min(area_a, area_b)] up to float64 rounding at the pair's scale, IoUs within
        [0, 1]."""
        gen = torch.Generator().manual_seed(32)
        b = rand_boxes(40, gen, spread=30.0)
        b[:, 3:5] *= torch.exp(torch.randn(40, 2, generator=gen) * 8)  # sizes from ~1e-10 to ~1e10 m
        inter = rotated_intersection_bev(b, b, impl=impl)
        area = b[:, 3] * b[:, 4]
        reach = b[:, 3:5].amax(1) + b[:, :2].abs().amax(1)  # coordinates the polygon clipping works with
        slack = 1e-14 * reach[:, None] * reach[None]  # float64 rounding of areas at that scale
        assert torch.all(inter >= 0)
        assert torch.all(inter <= torch.minimum(area[:, None], area[None]) + slack)
        iou = rotated_iou_bev(b, b, impl=impl)
        assert torch.all((iou >= 0) & (iou <= 1))
        assert torch.all(iou.diagonal() == 1.0) if impl == "cpu" else True  # b in a's frame: identical is exact
        # a 1 km needle through a 1 x 1 box: the intersection is the needle's width times 1 m
        needle = torch.tensor([[0.0, 0.0, 0.0, 1000.0, 1e-3, 1.0, 0.3, 0.0, 0.0]], dtype=torch.float64)
        unit = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3, 0.0, 0.0]], dtype=torch.float64)
        assert rotated_intersection_bev(needle, unit, impl=impl).item() == pytest.approx(1e-3, rel=1e-9)

    @pytest.mark.parametrize("impl", IMPLS)
    def test_min_union_vs_loop(self, impl):
        """IoU with the union clamped at min_union, and NMS with it: tiny identical boxes have IoU < 1."""
        gen = torch.Generator().manual_seed(33)
        b = rand_boxes(16, gen, spread=2.0)
        b[:6, 3:5] = torch.rand(6, 2, generator=gen) * 1e-4 + 1e-5  # areas 1e-10 .. 1e-8 m²
        b[:6, :2] *= 2e-5  # near the origin (world-frame clipping of the oracles stays exact), overlapping
        b[6] = b[0]
        b[7] = b[1]
        b[7, 6] += 0.3  # same centre, turned
        for mu in (0.0, 1e-8, 0.5):
            expected = torch.tensor([[clamped_iou(p, q, mu) for q in b] for p in b], dtype=torch.float64)
            out = rotated_iou_bev(b, b, impl=impl, min_union=mu)
            torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
        tiny = rotated_iou_bev(b[:1], b[6:7], impl=impl, min_union=1e-8).item()
        assert tiny == pytest.approx(float(b[0, 3] * b[0, 4]) / 1e-8, rel=1e-9) and tiny < 1
        assert rotated_iou_bev(b[:1], b[6:7], impl=impl).item() == pytest.approx(1.0, abs=1e-12)
        scores = torch.rand(16, generator=gen)
        for mu, thr in ((1e-8, 0.05), (0.0, 0.05), (1e-8, 0.5)):
            order = sorted(range(16), key=lambda i: (-float(scores[i]), i))
            keep = []
            for i in order:
                if all(clamped_iou(b[k], b[i], mu) <= thr for k in keep):
                    keep.append(i)
            assert nms_bev(b, scores, thr, impl=impl, min_union=mu).tolist() == keep
        # the clamp changes the answer here: the tiny duplicate survives only with it
        with_clamp = set(nms_bev(b, scores, 0.5, impl=impl, min_union=1e-8).tolist())
        without = set(nms_bev(b, scores, 0.5, impl=impl).tolist())
        assert with_clamp != without

    def test_min_union_float32_triton_matches_cpu(self):
        gen = torch.Generator().manual_seed(34)
        b = rand_boxes(10, gen, spread=2.0)
        b[:4, 3:5] = torch.rand(4, 2, generator=gen) * 1e-4 + 1e-5
        b[4] = b[0]
        cpu = rotated_iou_bev(b, b, impl="cpu", min_union=1e-8)
        tri = rotated_iou_bev(b.float(), b.float(), impl="triton", min_union=1e-8)
        assert tri.dtype == torch.float32
        torch.testing.assert_close(tri.double(), cpu, rtol=1e-4, atol=2e-5)
        aligned = rotated_iou_bev(b.float(), b.float().flip(0), aligned=True, impl="triton", min_union=1e-8)
        torch.testing.assert_close(aligned.double(), cpu.flip(1).diagonal(), rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- corners
def test_corners_match_structures_and_shapely():
    b = rand_boxes(10, torch.Generator().manual_seed(4))
    c3 = box_corners_3d(b)
    assert c3.shape == (10, 8, 3)
    np.testing.assert_allclose(c3.numpy(), box_corners_np(b.numpy()), rtol=0, atol=1e-12)
    bev = box_corners_bev(b)
    assert bev.shape == (10, 4, 2)
    for corners, box in zip(bev, b):
        poly = shapely_poly(box)
        assert abs(poly.area - float(box[3] * box[4])) < 1e-9
        # same polygon, counter-clockwise (positive signed area), front-left corner first
        ring = corners.tolist()
        signed = sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(ring, ring[1:] + ring[:1])) / 2
        assert signed == pytest.approx(poly.area, abs=1e-9)
        x, y, dx, dy, yaw = (float(box[k]) for k in (0, 1, 3, 4, 6))
        fl = (x + dx / 2 * math.cos(yaw) - dy / 2 * math.sin(yaw), y + dx / 2 * math.sin(yaw) + dy / 2 * math.cos(yaw))
        assert ring[0] == pytest.approx(fl, abs=1e-12)
    batched = box_corners_3d(b.view(2, 5, 9))
    assert torch.equal(batched.view(10, 8, 3), c3)
    g = b.clone().requires_grad_()
    box_corners_3d(g).sum().backward()
    assert g.grad is not None


# ----------------------------------------------------------------------------- NMS
def naive_nms(boxes, scores, thr, pre_max=None, post_max=None):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:pre_max]
    keep = []
    for i in order:
        if all(shapely_iou(boxes[k], boxes[i]) <= thr for k in keep):
            keep.append(i)
    return keep[:post_max]


def naive_circle_nms(xy, scores, thr, post_max=None):
    """mmdet3d's circle_nms: squared distance in float32 (its dets are float32), compared with the
    threshold in float64 (numba promotes the comparison)."""
    xy = xy.float().numpy()
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    suppressed = set()
    keep = []
    for n, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[n + 1:]:
            dx, dy = xy[i, 0] - xy[j, 0], xy[i, 1] - xy[j, 1]
            if float(dx * dx + dy * dy) <= thr:
                suppressed.add(j)
    return keep[:post_max]


class TestNms:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("thr,pre_max,post_max", [(0.1, None, None), (0.3, 15, 6), (0.0, None, 5)])
    def test_vs_naive(self, impl, thr, pre_max, post_max):
        gen = torch.Generator().manual_seed(5)
        boxes = rand_boxes(24, gen, spread=2.5)
        scores = torch.rand(24, generator=gen)
        scores[10] = scores[20]  # a tie: the lower index goes first
        out = nms_bev(boxes, scores, thr, pre_max=pre_max, post_max=post_max, impl=impl)
        expected = naive_nms(boxes, scores, thr, pre_max, post_max)
        assert len(naive_nms(boxes, scores, thr, pre_max)) < min(pre_max or 24, 24)  # something is suppressed
        assert out.dtype == torch.int64
        assert out.tolist() == expected

    @pytest.mark.parametrize("impl", IMPLS)
    def test_float32_and_edge_cases(self, impl):
        gen = torch.Generator().manual_seed(6)
        boxes = rand_boxes(20, gen, spread=2.5, dtype=torch.float32)
        scores = torch.rand(20, generator=gen, dtype=torch.float64)
        assert nms_bev(boxes, scores, 0.2, impl=impl).tolist() == naive_nms(boxes, scores, 0.2)
        assert nms_bev(boxes[:0], scores[:0], 0.2, impl=impl).tolist() == []
        assert nms_bev(boxes[:1], scores[:1], 0.2, impl=impl).tolist() == [0]
        assert nms_bev(boxes, scores, 0.2, post_max=0, impl=impl).tolist() == []
        same = boxes[:1].repeat(5, 1)
        assert nms_bev(same, torch.arange(5.0), 0.5, impl=impl).tolist() == [4]
        assert nms_bev(same, torch.arange(5.0), 1.0, impl=impl).tolist() == [4, 3, 2, 1, 0]  # IoU 1 is not > 1

    def test_batched(self):
        gen = torch.Generator().manual_seed(7)
        boxes = [rand_boxes(n, gen, spread=3.0) for n in (15, 0, 9)]
        scores = [torch.rand(len(b), generator=gen) for b in boxes]
        out = batched_nms_bev(boxes, scores, 0.2, post_max=6)
        assert [o.tolist() for o in out] == [naive_nms(b, s, 0.2, None, 6) for b, s in zip(boxes, scores)]

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("thr", [4.0, 0.175])  # CenterHead min_radius values (squared metres)
    def test_circle_vs_naive(self, impl, thr):
        gen = torch.Generator().manual_seed(8)
        xy = (torch.rand(60, 2, generator=gen) * 2 - 1) * 6
        xy[5] = xy[3] + torch.tensor([math.sqrt(thr), 0.0])  # at the threshold distance (up to rounding)
        scores = torch.rand(60, generator=gen)
        out = circle_nms(xy, scores, thr, impl=impl)
        assert out.tolist() == naive_circle_nms(xy, scores, thr)
        assert circle_nms(xy, scores, thr, post_max=4, impl=impl).tolist() == naive_circle_nms(xy, scores, thr, 4)
        boxes = torch.cat([xy, torch.ones(60, 7)], 1)  # boxes work as centres (x, y first)
        assert circle_nms(boxes, scores, thr, impl=impl).tolist() == out.tolist()
        assert circle_nms(xy[:0], scores[:0], thr, impl=impl).tolist() == []

    def test_circle_boundary_is_suppressed(self):
        xy = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
        scores = torch.tensor([0.9, 0.8, 0.7])
        for impl in IMPLS:
            assert circle_nms(xy, scores, 4.0, impl=impl).tolist() == [0, 2]  # distance^2 == 4 is suppressed

    def test_batched_circle(self):
        gen = torch.Generator().manual_seed(9)
        xy = [torch.rand(n, 2, generator=gen) * 5 for n in (12, 3)]
        sc = [torch.rand(len(c), generator=gen) for c in xy]
        out = batched_circle_nms(xy, sc, 1.0)
        assert [o.tolist() for o in out] == [naive_circle_nms(c, s, 1.0) for c, s in zip(xy, sc)]


# ----------------------------------------------------------------------------- points in boxes
def naive_points_in_boxes(points, boxes):
    out = torch.zeros(len(points), len(boxes), dtype=torch.bool)
    for i, p in enumerate(points.double().tolist()):
        for m, b in enumerate(boxes.double().tolist()):
            dx, dy = p[0] - b[0], p[1] - b[1]
            c, s = math.cos(b[6]), math.sin(b[6])
            lx, ly = dx * c + dy * s, -dx * s + dy * c
            out[i, m] = abs(lx) <= b[3] / 2 and abs(ly) <= b[4] / 2 and abs(p[2] - b[2]) <= b[5] / 2
    return out


def face_margin(points, boxes):
    """(P, M) float64 distance of each point to the nearest face plane of each box (for float32 slack)."""
    p, b = points.double()[:, None], boxes.double()[None]
    d = p[..., :3] - b[..., :3]
    c, s = torch.cos(b[..., 6]), torch.sin(b[..., 6])
    lx, ly = d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c
    return torch.stack([(lx.abs() - b[..., 3] / 2).abs(), (ly.abs() - b[..., 4] / 2).abs(),
                        (d[..., 2].abs() - b[..., 5] / 2).abs()]).amin(0)


class TestPointsInBoxes:
    def _case(self, gen, n=400, m=12):
        boxes = rand_boxes(m, gen, spread=3.0)
        pts = torch.cat([(torch.rand(n, 2, generator=gen) * 2 - 1) * 5, torch.randn(n, 1, generator=gen),
                         torch.rand(n, 2, generator=gen)], 1)
        # points exactly on faces of an axis-aligned box (inclusive) and just outside
        boxes[0, 6] = 0.0
        b = boxes[0]
        extra = torch.tensor([[b[0] + b[3] / 2, b[1], b[2], 0, 0], [b[0], b[1] - b[4] / 2, b[2] + b[5] / 2, 0, 0],
                              [b[0] + b[3] / 2 + 1e-9, b[1], b[2], 0, 0]], dtype=torch.float64)
        return torch.cat([pts, extra]), boxes

    @pytest.mark.parametrize("impl", IMPLS)
    def test_vs_naive_float64(self, impl):
        pts, boxes = self._case(torch.Generator().manual_seed(10))
        expected = naive_points_in_boxes(pts, boxes)
        assert expected.any() and expected[-3:-1, 0].all() and not expected[-1, 0]
        out = points_in_boxes(pts, boxes, impl=impl)
        assert out.dtype == torch.bool and out.shape == expected.shape
        assert torch.equal(out, expected)
        idx = points_in_boxes_idx(pts, boxes, impl=impl)
        exp_idx = [next((m for m in range(len(boxes)) if expected[i, m]), -1) for i in range(len(pts))]
        assert idx.tolist() == exp_idx

    @pytest.mark.parametrize("impl", ["cpu", "triton"])
    def test_float32_non_contiguous_batched(self, impl):
        gen = torch.Generator().manual_seed(11)
        pts, boxes = self._case(gen, n=200)
        pts32 = pts.float().t().contiguous().t()  # column-major float32
        boxes32 = boxes.float()
        expected = naive_points_in_boxes(pts32, boxes32)
        out = points_in_boxes(pts32, boxes32, impl=impl)
        near = face_margin(pts32, boxes32) < 1e-5  # float32 arithmetic may decide these either way
        assert torch.equal(out[~near], expected[~near])
        batched = points_in_boxes(pts32[:200].reshape(2, 100, 5), boxes32[:12].reshape(2, 6, 9), impl=impl)
        assert batched.shape == (2, 100, 6)
        for k in range(2):
            e = naive_points_in_boxes(pts32[100 * k:100 * (k + 1)], boxes32[6 * k:6 * (k + 1)])
            nk = face_margin(pts32[100 * k:100 * (k + 1)], boxes32[6 * k:6 * (k + 1)]) < 1e-5
            assert torch.equal(batched[k][~nk], e[~nk])

    @pytest.mark.parametrize("impl", IMPLS)
    def test_empty(self, impl):
        pts, boxes = self._case(torch.Generator().manual_seed(12), n=5, m=2)
        assert points_in_boxes(pts[:0], boxes, impl=impl).shape == (0, 2)
        assert points_in_boxes(pts, boxes[:0], impl=impl).shape == (len(pts), 0)
        assert points_in_boxes_idx(pts, boxes[:0], impl=impl).tolist() == [-1] * len(pts)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl):
    gen = torch.Generator().manual_seed(13)
    boxes, scores = rand_boxes(6, gen), torch.rand(6, generator=gen)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        rotated_iou_bev(boxes.long(), boxes, impl=impl)
    with pytest.raises(ValueError, match="at least 7 columns"):
        rotated_iou_bev(boxes[:, :5], boxes, impl=impl)
    with pytest.raises(ValueError, match="aligned=True needs as many"):
        rotated_iou_bev(boxes, boxes[:3], aligned=True, impl=impl)
    with pytest.raises(ValueError, match="same B"):
        rotated_iou_bev(boxes.view(2, 3, 9), boxes.view(3, 2, 9), impl=impl)
    with pytest.raises(ValueError, match="one per box"):
        nms_bev(boxes, scores[:5], 0.5, impl=impl)
    with pytest.raises(ValueError, match="one per box"):
        nms_bev(boxes, scores[:, None], 0.5, impl=impl)
    with pytest.raises(ValueError, match="pre_max must be >= 0"):
        nms_bev(boxes, scores, 0.5, pre_max=-1, impl=impl)
    with pytest.raises(TypeError, match="post_max must be an int"):
        nms_bev(boxes, scores, 0.5, post_max=2.5, impl=impl)
    with pytest.raises(ValueError, match="one per box"):
        circle_nms(boxes[:, :2], scores[:4], 1.0, impl=impl)
    with pytest.raises(ValueError, match="at least 3 columns"):
        points_in_boxes(boxes[:, :2], boxes, impl=impl)
    with pytest.raises(ValueError, match=r"\(B, P, 3\+\)"):
        points_in_boxes(boxes.view(2, 3, 9), boxes, impl=impl)
    with pytest.raises(TypeError, match="must be a tensor"):
        points_in_boxes(boxes.numpy(), boxes, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        nms_bev(boxes, scores, 0.5, impl="gpu")
    with pytest.raises(ValueError, match="min_union must be >= 0"):
        nms_bev(boxes, scores, 0.5, impl=impl, min_union=-1e-8)
    with pytest.raises(ValueError, match="min_union must be >= 0"):
        rotated_iou_bev(boxes, boxes, impl=impl, min_union=float("nan"))
    with pytest.raises(ValueError, match="aligned=True needs as many"):
        rotated_intersection_bev(boxes, boxes[:3], aligned=True, impl=impl)
    neg = boxes.clone()
    neg[2, 4] = -1.0
    for call in (lambda: rotated_iou_bev(boxes, neg, impl=impl), lambda: nms_bev(neg, scores, 0.5, impl=impl),
                 lambda: points_in_boxes(boxes[:, :3], neg, impl=impl),
                 lambda: rotated_intersection_bev(neg, boxes, impl=impl)):
        with pytest.raises(ValueError, match="negative sizes"):
            call()
    with pytest.raises(ValueError, match="same device|is on"):
        rotated_iou_bev(boxes, boxes.to("meta"), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_boxes_overlap_nothing(impl):
    boxes = rand_boxes(4, torch.Generator().manual_seed(14), spread=0.5)
    boxes[1, 0] = math.nan
    iou = rotated_iou_bev(boxes, boxes, impl=impl)
    assert iou[1].eq(0).all() and iou[:, 1].eq(0).all()
    inter = rotated_intersection_bev(boxes, boxes, impl=impl)
    assert inter[1].eq(0).all() and inter[:, 1].eq(0).all()
    assert rotated_iou_bev(boxes, boxes, impl=impl, min_union=1e-8)[1].eq(0).all()
    assert 1 in nms_bev(boxes, torch.tensor([0.1, 0.9, 0.5, 0.3]), 0.0, impl=impl).tolist()


# ----------------------------------------------------------------------------- GPU (pytest -m gpu)
@pytest.mark.gpu
@cuda_only
class TestGpu:
    def test_iou_nms_points_match_cpu(self):
        gen = torch.Generator().manual_seed(20)
        boxes = rand_boxes(1000, gen, spread=50.0)
        boxes[:, 3:5] *= 2
        scores = torch.rand(1000, generator=gen)
        cpu = rotated_iou_bev(boxes, boxes[:300], impl="cpu")
        cpu_inter = rotated_intersection_bev(boxes, boxes[:300], impl="cpu")
        for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
            gpu = rotated_iou_bev(boxes.to("cuda", dtype), boxes[:300].to("cuda", dtype))
            torch.testing.assert_close(gpu.double().cpu(), cpu, rtol=0, atol=atol)
            gpu = rotated_intersection_bev(boxes.to("cuda", dtype), boxes[:300].to("cuda", dtype))
            torch.testing.assert_close(gpu.double().cpu(), cpu_inter, rtol=atol, atol=atol * 100)
            gpu = rotated_iou_bev(boxes.to("cuda", dtype), boxes[:300].to("cuda", dtype), min_union=1e-8)
            torch.testing.assert_close(gpu.double().cpu(), cpu, rtol=0, atol=atol)
        a, b = degenerate_pairs()
        expected = torch.tensor([shapely_iou(p, q) for p, q in zip(a, b)], dtype=torch.float64)
        torch.testing.assert_close(rotated_iou_bev(a.cuda().float(), b.cuda().float(), aligned=True).double().cpu(),
                                   expected, rtol=0, atol=1e-5)
        keep_cpu = nms_bev(boxes, scores, 0.2, pre_max=800, post_max=200, impl="cpu")
        keep_gpu = nms_bev(boxes.cuda(), scores.cuda(), 0.2, pre_max=800, post_max=200)
        assert keep_gpu.tolist() == keep_cpu.tolist()
        assert circle_nms(boxes.cuda(), scores.cuda(), 4.0).tolist() == circle_nms(boxes, scores, 4.0).tolist()
        pts = torch.cat([(torch.rand(200_000, 2, generator=gen) * 2 - 1) * 50, torch.randn(200_000, 1, generator=gen)],
                        1).double()
        exp = points_in_boxes(pts, boxes, impl="cpu")
        assert torch.equal(points_in_boxes(pts.cuda(), boxes.cuda()).cpu(), exp)
        got32 = points_in_boxes(pts.float().cuda(), boxes.float().cuda()).cpu()
        near = face_margin(pts.float()[:5000], boxes.float()) < 1e-4
        assert torch.equal(got32[:5000][~near], exp[:5000][~near])

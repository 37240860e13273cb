"""Shared pieces of the whole-model GPU tests (`pytest -m gpu tests/gpu`).

* The device under test: CUDA, or the device named by BEVFUSION_GPU_TEST_DEVICE (`cpu` dry-runs every GPU
  test on the CPU, so the test code itself can be checked on a machine without a GPU).
* A small fused camera + LiDAR model with both heads, from `configs/nuscenes/synthetic/fusion.yaml` (ResNet-18
  with 16 base channels, LSS + bev_pool, a real sparse encoder, ConvFuser, SECOND/FPN, TransFusion, BEV map
  head), seeded weights and BatchNorm statistics calibrated on the test batch, so activations have the scale of
  a trained model rather than of a random one.
* A deterministic batch built here: a jittered 6-camera rig, LiDAR points, boxes and map masks.
* `Replay`: the few discrete decisions in the model (which BEV cell each frustum point falls in, which
  TransFusion queries are picked, which query each GT box is matched to) are recorded on the CPU run and
  replayed on the device run, so that the two runs' tensors are comparable element by element. A decision
  can legitimately flip between devices when its inputs differ by rounding (a frustum point within 1e-6 m of a
  cell boundary; two proposals with nearly equal scores), and one flip changes everything downstream. The
  device's own decisions are kept as well, and the tests check that they agree with the CPU's except at such
  near-ties.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "nuscenes" / "synthetic" / "fusion.yaml"
DEVICE_ENV = "BEVFUSION_GPU_TEST_DEVICE"


def device_under_test() -> torch.device:
    """CUDA (the default) or $BEVFUSION_GPU_TEST_DEVICE; skips when CUDA is wanted but missing."""
    name = os.environ.get(DEVICE_ENV, "cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a torch device (expected cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"needs CUDA (set {DEVICE_ENV}=cpu to dry-run these tests on the CPU)")
    return device


def sparse_impl_for(device: torch.device) -> dict[str, str]:
    """The sparse-conv backend and dataflow on the device under test, as keyword arguments (impl, dataflow).

    On CUDA a fixed Triton dataflow (implicit GEMM): "auto" would autotune every layer signature on first use
    (tens of kernel compilations, too slow for a short GPU check; the tuner's candidates have their own tests).
    On the CPU (dry run) the default rule ("auto"; the "gather" dataflow, which would sum in another order, fails
    under fp16 autocast: `index_add_` of an fp16 product into an fp32 output).
    """
    if device.type == "cuda":
        return {"impl": "triton", "dataflow": "igemm"}
    return {"impl": "auto", "dataflow": "auto"}


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls and convolutions in full precision on CUDA (cuDNN convolutions default to TF32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------- model and data
def load_case_config(overrides=()):
    from bevfusion.config import load_config

    return load_config(CONFIG, list(overrides))


def build_case_model(cfg, batch: dict, seed: int = 0) -> torch.nn.Module:
    """The fused det + seg model on the CPU with seeded weights and BatchNorm statistics of `batch`, in eval mode."""
    from bevfusion.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    calibrate_batchnorm(model, batch)
    return model.eval()


def calibrate_batchnorm(model: torch.nn.Module, batch: dict) -> None:
    """One train-mode forward with momentum 1: every BN's running statistics become the batch's."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(batch)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum


def set_sparse_impl(model: torch.nn.Module, impl: str, dataflow: str = "auto") -> None:
    for m in model.modules():
        if hasattr(m, "impl") and isinstance(m.impl, str) and hasattr(m, "kernel_size"):
            m.impl, m.dataflow = impl, dataflow


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _homogeneous(rot: np.ndarray, trans) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rot, trans
    return m


def make_batch(cfg, batch_size: int = 2, seed: int = 0, points_per_sample: int = 6000,
               boxes_per_sample: int = 10) -> dict[str, Any]:
    """A deterministic batch in the data pipeline's format (CPU tensors), for the config's image size, point
    range, voxel size and map grid.

    Cameras: six around the LiDAR at jittered yaws, heights and pitches, images normalised noise; sample 1 gets a
    rotated and scaled LiDAR augmentation and a resize/crop image augmentation. Points: a ground plane, points
    inside the boxes and clutter, moved off voxel boundaries (voxel coordinate fractions in [0.05, 0.95]).
    """
    rng = np.random.default_rng(seed)
    H, W = (int(v) for v in cfg.image_size)
    pcr = np.array(cfg.point_cloud_range, dtype=np.float64)
    vs = np.array(cfg.voxel_size, dtype=np.float64)
    n_cams = 6
    mats = {k: np.zeros((batch_size, n_cams, 4, 4)) for k in ("camera2ego", "lidar2camera", "lidar2image",
                                                                 "camera_intrinsics", "camera2lidar",
                                                                 "img_aug_matrix")}
    lidar2ego = np.zeros((batch_size, 4, 4))
    lidar_aug = np.zeros((batch_size, 4, 4))
    points, boxes, labels = [], [], []
    # camera axes in the LiDAR frame for yaw 0 (looking along +x): x right (-y), y down (-z), z forward (+x)
    base = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    for b in range(batch_size):
        l2e = _homogeneous(_rot_z(rng.uniform(-0.02, 0.02)), [0.94 + rng.uniform(-0.05, 0.05), 0.0, 1.84])
        lidar2ego[b] = l2e
        for k in range(n_cams):
            yaw = 2 * math.pi * k / n_cams + rng.uniform(-0.1, 0.1)
            rot = _rot_z(yaw) @ _rot_x(rng.uniform(-0.05, 0.05)) @ base
            trans = [0.8 * math.cos(yaw) + rng.uniform(-0.1, 0.1), 0.8 * math.sin(yaw) + rng.uniform(-0.1, 0.1),
                     rng.uniform(-0.4, -0.2)]
            c2l = _homogeneous(rot, trans)
            f = rng.uniform(0.5, 0.6) * W
            intr = np.eye(4)
            intr[0, 0], intr[1, 1] = f, f
            intr[0, 2], intr[1, 2] = W / 2 + rng.uniform(-4, 4), H / 2 + rng.uniform(-4, 4)
            if b == 0:
                aug = np.eye(4)
            else:  # resize by s, then crop (tx, ty) pixels, as ImageAug3D writes it
                s = rng.uniform(0.9, 1.1)
                aug = np.eye(4)
                aug[0, 0] = aug[1, 1] = s
                aug[0, 3], aug[1, 3] = -rng.uniform(0, 8), -rng.uniform(0, 8)
            l2c = np.linalg.inv(c2l)
            mats["camera2lidar"][b, k], mats["lidar2camera"][b, k] = c2l, l2c
            mats["camera_intrinsics"][b, k], mats["img_aug_matrix"][b, k] = intr, aug
            mats["lidar2image"][b, k] = intr @ l2c
            mats["camera2ego"][b, k] = l2e @ c2l
        lidar_aug[b] = np.eye(4) if b == 0 else _homogeneous(_rot_z(rng.uniform(-0.4, 0.4)) * 1.03,
                                                             rng.normal(0, 0.3, 3))

        # boxes (internal convention: x, y, z centre, dx along the heading, dy, dz, yaw, vx, vy)
        m = boxes_per_sample
        dims = np.stack([rng.uniform(0.6, 6.0, m), rng.uniform(0.6, 2.6, m), rng.uniform(1.0, 3.0, m)], 1)
        centre = np.stack([rng.uniform(-40, 40, m), rng.uniform(-40, 40, m), -1.8 + dims[:, 2] / 2], 1)
        yaw = rng.uniform(-math.pi, math.pi, m)
        vel = rng.normal(0, 2.0, (m, 2))
        boxes.append(np.concatenate([centre, dims, yaw[:, None], vel], 1))
        labels.append(rng.integers(0, 10, m))

        n_ground = points_per_sample // 2
        n_obj = points_per_sample // 4
        r = np.sqrt(rng.uniform(1, 48**2, n_ground))
        a = rng.uniform(-math.pi, math.pi, n_ground)
        ground = np.stack([r * np.cos(a), r * np.sin(a), rng.normal(-1.8, 0.05, n_ground)], 1)
        which = rng.integers(0, m, n_obj)
        local = (rng.uniform(-0.5, 0.5, (n_obj, 3)) * dims[which])
        c, s = np.cos(yaw[which]), np.sin(yaw[which])
        obj = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1)
        obj += centre[which]
        n_rest = points_per_sample - n_ground - n_obj
        clutter = np.stack([rng.uniform(-50, 50, n_rest), rng.uniform(-50, 50, n_rest),
                            rng.uniform(-4, 2.5, n_rest)], 1)
        xyz = np.concatenate([ground, obj, clutter])
        # off voxel boundaries: a point exactly on one may fall on either side on another device
        cell = (xyz - pcr[:3]) / vs
        cell = np.floor(cell) + np.clip(cell - np.floor(cell), 0.05, 0.95)
        xyz = cell * vs + pcr[:3]
        inside = np.all((xyz >= pcr[:3]) & (xyz < pcr[3:]), 1)
        xyz = xyz[inside]
        feats = np.stack([rng.uniform(0, 1, len(xyz)), rng.choice([0.0, 0.05, 0.1], len(xyz))], 1)
        points.append(torch.from_numpy(np.concatenate([xyz, feats], 1)).float())

    gen = torch.Generator().manual_seed(seed)
    map_bound = cfg.map_bound
    size = int(round((map_bound[1] - map_bound[0]) / map_bound[2]))
    coarse = torch.rand(batch_size, len(cfg.map_classes), size // 10, size // 10, generator=gen)
    masks = (F.interpolate(coarse, size=(size, size), mode="nearest") > 0.6).long()
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    return {
        "img": torch.randn(batch_size, n_cams, 3, H, W, generator=gen),
        "points": points,
        **{k: f32(v) for k, v in mats.items()},
        "lidar2ego": f32(lidar2ego), "lidar_aug_matrix": f32(lidar_aug),
        "gt_bboxes_3d": [f32(x) for x in boxes], "gt_labels_3d": [torch.from_numpy(x).long() for x in labels],
        "gt_masks_bev": masks,
        "metas": [{"token": f"gpu-case-{b}"} for b in range(batch_size)],
    }


# ----------------------------------------------------------------------------------------------- capture
CAPTURED = {
    "camera_bev": "encoders.camera.vtransform",
    "lidar_bev": "encoders.lidar.backbone",
    "fused": "fuser",
    "decoder": "decoder.neck",
    "object": "heads.object",
    "map": "heads.map",
}


@contextlib.contextmanager
def capture(model: torch.nn.Module):
    """Collect the outputs of the modules in CAPTURED (detached, on the CPU, floats as float32) into a dict."""
    out: dict[str, Any] = {}
    handles = []

    def to_cpu(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            return x.float() if x.is_floating_point() else x
        if isinstance(x, dict):
            return {k: to_cpu(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return to_cpu(x[0]) if len(x) == 1 else [to_cpu(v) for v in x]
        return x

    for name, path in CAPTURED.items():
        module = model.get_submodule(path)

        def hook(mod, args, output, name=name):
            out[name] = to_cpu(output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- replay
class Replay:
    """Record the discrete decisions of a reference run, then replay them in another run.

    Patched (with pytest's monkeypatch, only inside `active`): `BaseTransform._plan` (the BEV-pool plan of the
    camera branch), `transfusion.select_queries` (TransFusion's top-k proposals) and
    `scipy.optimize.linear_sum_assignment` (the Hungarian matching, which runs on the CPU either way; its input,
    the cost matrix, is computed on the device). In replay mode each call still computes the device's own
    decision (kept in `natural`) and returns the recorded one, moved to the device.
    """

    KINDS = ("plan", "queries", "assignment")

    def __init__(self, recorded: dict[str, list] | None = None):
        self.recorded: dict[str, list] = recorded if recorded is not None else {k: [] for k in self.KINDS}
        self.natural: dict[str, list] = {k: [] for k in self.KINDS}
        self.mode = "record"
        self._next = {k: 0 for k in self.KINDS}

    def fork(self) -> "Replay":
        """A new Replay sharing this one's recorded decisions (for another device run)."""
        return Replay(self.recorded)

    def _take(self, kind: str):
        i = self._next[kind]
        if i >= len(self.recorded[kind]):
            raise AssertionError(f"replay: the device run made more {kind} decisions ({i + 1}) than the reference "
                                 f"run ({len(self.recorded[kind])})")
        self._next[kind] = i + 1
        return self.recorded[kind][i]

    @contextlib.contextmanager
    def active(self, mode: str):
        import scipy.optimize

        from bevfusion.models.camera import vtransforms
        from bevfusion.models.heads import transfusion

        assert mode in ("record", "replay")
        self.mode = mode
        self._next = {k: 0 for k in self.KINDS}
        orig_plan = vtransforms.BaseTransform._plan
        orig_select = transfusion.select_queries
        orig_lsa = scipy.optimize.linear_sum_assignment
        replay = self

        def plan(self_, geometry_inputs, geom_fn, batch_size):
            p = orig_plan(self_, geometry_inputs, geom_fn, batch_size)
            if replay.mode == "record":
                replay.recorded["plan"].append(p.to("cpu"))
                return p
            replay.natural["plan"].append(p.to("cpu"))
            return replay._take("plan").to(p.device)

        def select(heatmap, num_proposals):
            labels, cells = orig_select(heatmap, num_proposals)
            entry = (labels.cpu(), cells.cpu(), heatmap.detach().float().cpu())
            if replay.mode == "record":
                replay.recorded["queries"].append(entry)
                return labels, cells
            replay.natural["queries"].append(entry)
            ref_labels, ref_cells, _ = replay._take("queries")
            return ref_labels.to(labels.device), ref_cells.to(cells.device)

        def lsa(cost, *args, **kwargs):
            rows, cols = orig_lsa(cost, *args, **kwargs)
            entry = (np.array(cost, dtype=np.float64), rows, cols)
            if replay.mode == "record":
                replay.recorded["assignment"].append(entry)
                return rows, cols
            replay.natural["assignment"].append(entry)
            _, ref_rows, ref_cols = replay._take("assignment")
            return ref_rows.copy(), ref_cols.copy()

        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(vtransforms.BaseTransform, "_plan", plan)
            mp.setattr(transfusion, "select_queries", select)
            mp.setattr(scipy.optimize, "linear_sum_assignment", lsa)
            yield self
        finally:
            mp.undo()
        if mode == "replay":
            for kind in self.KINDS:
                if self._next[kind] != len(self.recorded[kind]):
                    raise AssertionError(f"replay: the device run made {self._next[kind]} {kind} decisions, the "
                                         f"reference run {len(self.recorded[kind])}")


# ----------------------------------------------------------------------------------------------- checks
def rel_max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (both to float64 on the CPU)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (tuple(a.shape), tuple(e.shape))
    if not torch.isfinite(a).all():
        return math.inf
    scale = float(e.abs().max()) if e.numel() else 0.0
    return float((a - e).abs().max()) / max(scale, 1e-30) if e.numel() else 0.0


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel: float, report: dict | None = None):
    err = rel_max_err(actual, expected)
    if report is not None:
        report[name] = err
    assert err <= rel, f"{name}: max error {err:.3g} of the reference's largest magnitude > {rel:g}"


def check_plans(recorded, natural, max_fraction: float) -> int:
    """The device's BEV-pool plans vs the CPU's: at most `max_fraction` of the frustum points land in another
    cell, and each of those in a neighbouring cell (or is dropped at the grid edge on one side).
    Returns the number of such points."""
    assert len(recorded) == len(natural)
    total = 0
    for ref, dev in zip(recorded, natural):
        assert ref.grid == dev.grid and ref.batch_size == dev.batch_size and ref.num_points == dev.num_points
        a, b = ref.point_cells, dev.point_cells
        diff = torch.nonzero(a != b).flatten()
        assert len(diff) <= max(2, max_fraction * len(a)), \
            f"bev_pool plan: {len(diff)} of {len(a)} frustum points in another cell on the device"
        d, h, w = ref.grid

        def unravel(c):
            return torch.stack([c // (d * h * w), c // (h * w) % d, c // w % h, c % w], 1)  # (b, z, x, y)

        for i in diff.tolist():
            ca, cb = int(a[i]), int(b[i])
            if ca < 0 or cb < 0:
                b_, z, x, y = unravel(torch.tensor([max(ca, cb)]))[0].tolist()
                assert z in (0, d - 1) or x in (0, h - 1) or y in (0, w - 1), \
                    f"bev_pool plan: point {i} dropped on one device only, far from the grid edge (cell {max(ca, cb)})"
            else:
                ua, ub = unravel(torch.tensor([ca, cb])).tolist()
                assert ua[0] == ub[0] and sum(abs(p - q) for p, q in zip(ua[1:], ub[1:])) <= 1, \
                    f"bev_pool plan: point {i} in cell {ua} on the CPU but {ub} on the device (not neighbours)"
        total += len(diff)
    return total


def neighbour_max(prob: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, C, X, Y) → the largest value in each cell's kernel window, the cell itself excluded."""
    pad = kernel_size // 2
    padded = F.pad(prob, (pad, pad, pad, pad), value=-math.inf)
    X, Y = prob.shape[-2:]
    shifts = [padded[..., i:i + X, j:j + Y] for i in range(kernel_size) for j in range(kernel_size)
              if (i, j) != (pad, pad)]
    return torch.stack(shifts).amax(0)


def near_tie(prob, neighbours, threshold, b, c, cell, tie) -> bool:
    """Whether proposal (class c, cell) of sample b could be picked differently on two devices whose heatmaps
    differ by up to `tie`: its probability is within `tie` of the selection threshold (the P-th score), or of the
    largest neighbour in its local-max window (a peak on one device, suppressed on the other)."""
    p = float(prob[b, c].reshape(-1)[cell])
    n = float(neighbours[b, c].reshape(-1)[cell])
    return abs(p - threshold) <= tie or abs(p - n) <= tie


def check_queries(recorded, natural, dense_cpu: torch.Tensor, kernel_size: int, tie: float) -> int:
    """The device's TransFusion proposals vs the CPU's, as sets of (class, cell) per sample: every proposal picked
    on one side only must be a near-tie on the CPU heatmap (`near_tie`). Returns the number of differing
    proposals."""
    assert len(recorded) == len(natural)
    prob = dense_cpu.float().sigmoid()  # (B, C, X, Y)
    neighbours = neighbour_max(prob, kernel_size)
    total = 0
    for (ref_l, ref_c, ref_h), (dev_l, dev_c, _) in zip(recorded, natural):
        B, C, N = ref_h.shape
        for b in range(B):
            ref_keys = set((ref_l[b] * N + ref_c[b]).tolist())
            dev_keys = set((dev_l[b] * N + dev_c[b]).tolist())
            threshold = float(ref_h[b].reshape(-1)[sorted(ref_keys)].min())
            for key in ref_keys ^ dev_keys:
                c, cell = divmod(key, N)
                assert near_tie(prob, neighbours, threshold, b, c, cell, tie), (
                    f"TransFusion proposals: (class {c}, cell {cell}) of sample {b} picked on one device only, "
                    f"but not a near-tie on the CPU heatmap (probability {float(prob[b, c].reshape(-1)[cell]):.6f}, "
                    f"threshold {threshold:.6f}, largest neighbour {float(neighbours[b, c].reshape(-1)[cell]):.6f}, "
                    f"tie {tie:g})")
            total += len(ref_keys ^ dev_keys)
    return total


def check_assignment_costs(recorded, natural, rel: float, report: dict | None = None) -> None:
    """The Hungarian cost matrices computed on the device (for the replayed queries) vs the CPU's."""
    assert len(recorded) == len(natural) > 0
    worst = 0.0
    for (ref_cost, _, _), (dev_cost, _, _) in zip(recorded, natural):
        worst = max(worst, rel_max_err(torch.from_numpy(dev_cost), torch.from_numpy(ref_cost)))
    if report is not None:
        report["assignment_cost"] = worst
    assert worst <= rel, f"Hungarian cost matrix: max error {worst:.3g} of its largest magnitude > {rel:g}"


def angle_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a.double() - b.double()
    return torch.remainder(d + math.pi, 2 * math.pi) - math.pi


def move_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of `model` on `device` (the CPU original is left alone)."""
    import copy

    model = copy.deepcopy(model).to(device)
    for m in model.modules():
        if hasattr(m, "_plan_cache"):
            m._plan_cache = None  # the device computes its own BEV-pool plan
    return model

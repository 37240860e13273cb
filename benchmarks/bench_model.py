#!/usr/bin/env python3
"""Whole-model benchmark: per-module and end-to-end latency, frames/s, peak memory, one AMP training step.

Builds a config's model once (default: the released camera+LiDAR fusion detector, Swin-T, 0.075 m voxels,
official 256x704 resolution, six cameras) and times, for each requested dtype, the eval forward
including box decoding:

  * fp32: true fp32 (TF32 off for cuBLAS and cuDNN; our Triton sparse conv uses ieee dots in fp32);
  * fp16 / bf16: the same model under torch.autocast (CUDA only for fp16).

Each dtype gets `--warmup` forwards first (Triton JIT compiles, the sparse autotuner's first-call timing,
cuDNN/cuBLAS set-up), then `--runs` forwards with forward hooks timing each top-level module (hooks
synchronise the device), then `--runs` forwards without hooks for the end-to-end wall time (median) and
CUDA-event time; peak memory is torch.cuda.max_memory_allocated over the timed runs (reset after warm-up).
`--train-step` then times whole training steps in train mode: fp16 autocast forward with losses on the
inputs' ground-truth boxes, GradScaler backward, gradient clipping and an AdamW step as the config sets
(on CPU: fp32, no scaler), median of `--train-runs` after `--train-warmup`.

Inputs (`--inputs`):
  * synthetic: one in-memory batch with exactly the keys, dtypes and shapes of the official test
    pipeline + collate: six normalised images, the nuScenes-like camera rig of the synthetic drive
    generator (calibration close to the published one), img_aug_matrix of the test-time resize + crop,
    identity lidar_aug_matrix, and a ray-cast 32-beam spinning LiDAR (keyframe + `sweeps_num` sweeps at
    20 Hz while driving at 12 m/s; cars, poles, pedestrians, building rows, bushes; about 300k points in
    range), car/pedestrian boxes from that scene as ground truth, and a simple road layout as BEV masks.
    Seeded and deterministic.
  * drive: samples of a generated drive (`--data`, with info files) through the config's test pipeline.
  * auto (default): drive when `--data` holds nuscenes_infos_val.pkl and nuscenes-devkit imports (the
    test pipeline rasterises map masks with it), else synthetic.

    python benchmarks/bench_model.py [--config CFG] [--device cuda] [--dtype fp32,fp16] [--train-step] \
        [--inputs auto|synthetic|drive] [--data data/synthetic] [--runs 5] [--warmup 2] [--json PATH] [--small] \
        [--train-runs 3] [--train-warmup 2] [--batch 1] [--seed 0] [--set KEY=VALUE ...]

`--small` shrinks the inputs for quick CPU checks (128x352 images, two LiDAR sweeps at 256 azimuth
steps); it is not the official setting. Results print as markdown tables; `--json PATH` writes the
shared benchmark JSON (benchmarks/common.py), rewritten after every section, so a run stopped part-way
keeps what it measured. JSON rows: table "setup" (build time, parameters, input making); per dtype a table
"model forward, <dtype> ..." with one row per module (ms: median with hooks), "end to end (incl.
decoding)" (ms: median wall time without hooks, peak_mib, frames/s in the note), "end to end, CUDA
events" and "first forward (JIT compiles, autotune)"; non-fp32 rows carry ratio = fp32 ms / this ms
with ratio_vs naming the fp32 row of the same `what`; a "training step ..." table with the step time,
its peak memory, the first (compiling) step and one row per loss / statistic (value in the note).
The exit status is 1 when a section failed (recorded under "skipped") or a loss was not finite.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import traceback
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import JsonReport, Record, device_name, one_line, peak_memory_mb, sync  # noqa: E402

from bevfusion.config import load_config  # noqa: E402
from bevfusion.datasets.collate import collate  # noqa: E402
from bevfusion.evaluation.runner import move_batch  # noqa: E402
from bevfusion.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"
PARTS = ("encoders.camera.backbone", "encoders.camera.neck", "encoders.camera.vtransform",
         "encoders.lidar.voxelize", "encoders.lidar.backbone", "fuser", "decoder.backbone", "decoder.neck",
         "heads.object", "heads.map")
# Methods timed inside modules: (row label, module name, attribute).
SUBPARTS = (("encoders.camera.vtransform.depth_image", "encoders.camera.vtransform", "depth_image"),
            ("encoders.camera.vtransform.pool (lift + bev_pool)", "encoders.camera.vtransform", "pool"),
            ("heads.object.get_bboxes (decode)", "heads.object", "get_bboxes"))
ROW_ORDER = (PARTS[:3] + tuple(s[0] for s in SUBPARTS[:2]) + PARTS[3:9] + (SUBPARTS[2][0],) + PARTS[9:])
END_TO_END = "end to end (incl. decoding)"
END_TO_END_EVENTS = "end to end, CUDA events"
FIRST_CALL = "first forward (JIT compiles, autotune)"
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGET_FPS = 25.0
SMALL_OVERRIDES = ("image_size=[128, 352]",)

# Synthetic scene: 20 Hz sweeps while driving along ego x (the time lag of sweep k is k * 0.05 s).
SWEEP_PERIOD_S = 0.05
EGO_SPEED = 12.0
FULL_AZIMUTH_STEPS = 1084  # a 32-beam HDL-32E at 20 Hz: ~34.7k rays per sweep, as nuScenes keyframes
SMALL_AZIMUTH_STEPS, SMALL_SWEEPS = 256, 1
SOURCE_SIZE = (1600, 900)  # (W, H) of the nuScenes camera images the test-time resize applies to


# ----------------------------------------------------------------------------------------- inputs
def pipeline_step(cfg: Mapping[str, Any], kind: str) -> dict:
    """The parameters of the first `kind` step of the config's test pipeline (without `type`)."""
    for step in cfg["data"]["test"]["pipeline"]:
        if step.get("type") == kind:
            return {k: v for k, v in step.items() if k != "type"}
    raise KeyError(f"data.test.pipeline: no {kind} step (the synthetic inputs mirror the official test pipeline)")


def _scene_boxes(seed: int) -> np.ndarray:
    """Axis-aligned obstacles (xmin, ymin, zmin, xmax, ymax, zmax) in the ego frame, ground at z = 0."""
    from bench_sparse import _obstacles

    return _obstacles(np.random.default_rng(seed))


def synthetic_points(seed: int, lidar2ego: np.ndarray, sweeps_num: int, point_range: Sequence[float],
                     azimuth_steps: int = FULL_AZIMUTH_STEPS) -> np.ndarray:
    """Ray-cast keyframe + `sweeps_num` sweeps in the keyframe LiDAR frame: (P, 5) float32 (x, y, z,
    intensity 0..255, time lag s), as LoadPointsFromFile + LoadPointsFromMultiSweeps (remove_close) +
    PointsRangeFilter produce them. Sweeps are motion-compensated (static world, moving ego)."""
    from bench_sparse import _cast

    from bevfusion.data.synthetic.sensors import lidar_ray_directions, rot_z

    rng = np.random.default_rng(seed + 1)
    boxes = _scene_boxes(seed)
    rot, trans = lidar2ego[:3, :3], lidar2ego[:3, 3]
    dirs_lidar, _ = lidar_ray_directions(azimuth_steps)
    clouds = []
    for k in range(sweeps_num + 1):
        lag = k * SWEEP_PERIOD_S
        origin = trans + np.array([-EGO_SPEED * lag, 0.0, 0.0])  # the sensor then, in today's ego frame
        spin = rot_z(rng.uniform(0, 2 * np.pi / azimuth_steps))
        dirs = dirs_lidar @ (rot @ spin).T  # (R, 3) in the ego frame
        t = _cast(origin, dirs, boxes)
        hit = np.isfinite(t)
        p_ego = origin + dirs[hit] * (t[hit] + rng.normal(0, 0.02, int(hit.sum())))[:, None]
        p = (p_ego - trans) @ rot  # ego → keyframe LiDAR frame: R^T (p - t)
        if k > 0:  # remove_close on the sweeps, as LoadPointsFromMultiSweeps
            p = p[~((np.abs(p[:, 0]) < 1.0) & (np.abs(p[:, 1]) < 1.0))]
        clouds.append(np.column_stack([p, rng.integers(0, 256, len(p)).astype(np.float64), np.full(len(p), lag)]))
    pts = np.concatenate(clouds)
    lo, hi = np.asarray(point_range[:3], np.float64), np.asarray(point_range[3:], np.float64)
    pts = pts[np.all((pts[:, :3] > lo) & (pts[:, :3] < hi), axis=1)]  # PointsRangeFilter (strict)
    return np.ascontiguousarray(pts, dtype=np.float32)


def synthetic_boxes(seed: int, lidar2ego: np.ndarray, classes: Sequence[str], point_range: Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth from the scene's car- and pedestrian-sized obstacles: internal boxes (M, 9) in the
    LiDAR frame (x, y, z centre, dx along the heading, dy, dz, yaw, vx, vy; static: zero velocity) and
    labels (M,) int64 into `classes`."""
    from bevfusion.structures.boxes import limit_period

    boxes = _scene_boxes(seed)
    size = boxes[:, 3:] - boxes[:, :3]
    short, long_, height = np.minimum(size[:, 0], size[:, 1]), np.maximum(size[:, 0], size[:, 1]), size[:, 2]
    label = np.full(len(boxes), -1, np.int64)
    if "car" in classes:
        label[(short >= 1.6) & (short <= 2.2) & (long_ >= 3.7) & (long_ <= 5.3) & (height <= 2.0)] = \
            list(classes).index("car")
    if "pedestrian" in classes:
        label[(long_ <= 0.75) & (height <= 2.0)] = list(classes).index("pedestrian")
    rot, trans = lidar2ego[:3, :3], lidar2ego[:3, 3]
    centre = ((boxes[:, :3] + boxes[:, 3:]) / 2 - trans) @ rot
    yaw_ego = np.where(size[:, 0] >= size[:, 1], 0.0, np.pi / 2)  # heading along the longer side
    yaw = limit_period(yaw_ego - np.arctan2(rot[1, 0], rot[0, 0]))
    out = np.column_stack([centre, long_, short, height, yaw, np.zeros((len(boxes), 2))])
    keep = (label >= 0) & np.all((centre[:, :2] > np.asarray(point_range[:2])) &
                                 (centre[:, :2] < np.asarray(point_range[3:5])), axis=1)
    return out[keep].astype(np.float32), label[keep]


def _bev_masks(map_classes: Sequence[str], bound: Sequence[float], lidar2ego: np.ndarray) -> np.ndarray:
    """(C, X, Y) int64 masks of a straight road along ego x (cell [i, j] at LiDAR x_i, y_j, as
    LoadBEVSegmentation): drivable |y_ego| < 8 m, walkways 8..11 m, a divider on the centre line."""
    lo, hi, step = (float(v) for v in bound)
    n = int(round((hi - lo) / step))
    centres = lo + (np.arange(n) + 0.5) * step
    x, y = np.meshgrid(centres, centres, indexing="ij")
    pts = np.stack([x, y, np.zeros_like(x)], -1) @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
    y_ego = np.abs(pts[..., 1])
    layers = {"drivable_area": y_ego < 8.0, "walkway": (y_ego >= 8.0) & (y_ego < 11.0), "divider": y_ego < 0.15}
    return np.stack([layers.get(c, np.zeros_like(y_ego, dtype=bool)) for c in map_classes]).astype(np.int64)


def synthetic_sample(cfg: Mapping[str, Any], seed: int = 0, small: bool = False) -> dict:
    """One sample as the config's test pipeline returns it (after Collect3D), built in memory."""
    from bevfusion.data.synthetic.sensors import CAMERA_NAMES, LIDAR_NAME, build_rig
    from bevfusion.datasets.transforms.augment import ImageAug3D
    from bevfusion.structures.geometry import invert_transform

    rng = np.random.default_rng(seed)
    rig = build_rig(SOURCE_SIZE)
    lidar2ego = rig[LIDAR_NAME].to_ego
    camera2ego = np.stack([rig[c].to_ego for c in CAMERA_NAMES])
    camera2lidar = np.linalg.inv(lidar2ego) @ camera2ego
    lidar2camera = np.stack([invert_transform(T) for T in camera2lidar])
    intrinsics = np.tile(np.eye(4), (len(CAMERA_NAMES), 1, 1))
    intrinsics[:, :3, :3] = [np.asarray(rig[c].intrinsic) for c in CAMERA_NAMES]

    aug = ImageAug3D(**pipeline_step(cfg, "ImageAug3D"))
    mats = []
    for _ in CAMERA_NAMES:
        _resize, dims, crop, flip, rotate = aug.sample_augmentation(SOURCE_SIZE, rng)
        mats.append(aug.aug_matrix(SOURCE_SIZE, dims, crop, flip, rotate))
    H, W = aug.final_dim
    norm = pipeline_step(cfg, "ImageNormalize")
    pixels = rng.integers(0, 256, (len(CAMERA_NAMES), 3, H, W), dtype=np.uint8).astype(np.float32) / 255.0
    mean = np.asarray(norm["mean"], np.float32)[:, None, None]
    std = np.asarray(norm["std"], np.float32)[:, None, None]

    sweeps = pipeline_step(cfg, "LoadPointsFromMultiSweeps")
    point_range = pipeline_step(cfg, "PointsRangeFilter")["point_cloud_range"]
    if small:
        points = synthetic_points(seed, lidar2ego, SMALL_SWEEPS, point_range, SMALL_AZIMUTH_STEPS)
    else:
        points = synthetic_points(seed, lidar2ego, int(sweeps["sweeps_num"]), point_range)
    boxes, labels = synthetic_boxes(seed, lidar2ego, list(cfg["object_classes"]), point_range)
    seg = pipeline_step(cfg, "LoadBEVSegmentation")
    values = {
        "img": torch.from_numpy(np.ascontiguousarray((pixels - mean) / std)),
        "points": torch.from_numpy(points),
        "gt_bboxes_3d": torch.from_numpy(boxes).reshape(-1, 9),
        "gt_labels_3d": torch.from_numpy(labels),
        "gt_masks_bev": torch.from_numpy(_bev_masks(seg["classes"], seg["xbound"], lidar2ego)),
        "camera_intrinsics": intrinsics, "camera2ego": camera2ego, "lidar2ego": lidar2ego,
        "lidar2camera": lidar2camera, "camera2lidar": camera2lidar, "lidar2image": intrinsics @ lidar2camera,
        "img_aug_matrix": np.stack(mats), "lidar_aug_matrix": np.eye(4),
    }
    collect = pipeline_step(cfg, "Collect3D")
    out: dict = {}
    for key in collect["keys"]:
        if key not in values:
            raise KeyError(f"data.test.pipeline Collect3D key {key!r}: the synthetic inputs do not make it")
        out[key] = values[key]
    for key in collect.get("meta_keys", ()):
        if key in values:
            out[key] = torch.as_tensor(values[key], dtype=torch.float32)
    out["metas"] = {"token": f"synthetic-{seed:04d}", "timestamp": 1.5e9 + seed, "location": "singapore-onenorth",
                    "lidar2ego": lidar2ego, "ego2global": np.eye(4), "ori_shape": SOURCE_SIZE,
                    "lidar_path": "(synthetic, in memory)"}
    return out


def synthetic_batch(cfg: Mapping[str, Any], batch_size: int = 1, seed: int = 0, small: bool = False) -> dict:
    """`batch_size` synthetic samples (seeds seed, seed + 1, ...) through the collate the data loader uses."""
    return collate([synthetic_sample(cfg, seed + i, small) for i in range(batch_size)])


def drive_batches(cfg: Mapping[str, Any], count: int, batch_size: int) -> list[dict]:
    from bevfusion.datasets.builder import build_dataset

    dataset = build_dataset(cfg["data"]["test"], "data.test", filter_empty_gt=False)
    return [collate([dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]) for i in range(count)]


# ----------------------------------------------------------------------------------------- timing
class Timer:
    """Forward pre/post hooks recording wall time per named module (synchronising the device) while
    `enabled`; disabled hooks cost a Python call and nothing else."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._start, self.enabled = device, defaultdict(list), {}, False

    def attach(self, name: str, module: torch.nn.Module) -> None:
        def pre(_m, _inp):
            if self.enabled:
                sync(self.device)
                self._start[name] = time.perf_counter()

        def post(_m, _inp, _out):
            if self.enabled and name in self._start:
                sync(self.device)
                self.times[name].append((time.perf_counter() - self._start.pop(name)) * 1e3)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap_method(self, name: str, obj, attr: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.times[name].append((time.perf_counter() - start) * 1e3)
            return out

        setattr(obj, attr, timed)


@contextmanager
def _tf32_off():
    """cuBLAS and cuDNN without TF32 (true fp32), restored afterwards. Uses torch's legacy allow_tf32 flags,
    or the newer fp32_precision settings when the process already uses those (torch refuses a mix)."""
    try:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

        def restore():
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    except RuntimeError:
        saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"

        def restore():
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    try:
        yield
    finally:
        restore()


@contextmanager
def precision(device: torch.device, dtype_name: str):
    """fp32: TF32 off for cuBLAS and cuDNN on CUDA (true fp32); otherwise autocast to the dtype."""
    amp = DTYPES[dtype_name]
    with ExitStack() as stack:
        if device.type == "cuda" and amp is None:
            stack.enter_context(_tf32_off())
        stack.enter_context(torch.autocast(device.type, dtype=amp, enabled=amp is not None))
        yield


class Clock:
    """Wall time (perf_counter after a device sync) and, on CUDA, event time of one region."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall_ms: float = math.nan
        self.event_ms: float | None = None

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._events[1].record()
        sync(self.device)
        self.wall_ms = (time.perf_counter() - self._t0) * 1e3
        if self.device.type == "cuda":
            self.event_ms = self._events[0].elapsed_time(self._events[1])
        return False


_START = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the seconds since the script started (flushed: shows how far a killed run got)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {msg}", flush=True)


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_forward(model: torch.nn.Module, batches: Sequence[dict], device: torch.device, dtype_name: str,
                  timer: Timer, warmup: int, runs: int) -> dict[str, Any]:
    """Eval forwards under one precision: first-call time, per-module medians, end-to-end medians, peak."""
    model.eval()
    first_ms, outputs = None, None
    it = 0
    with torch.no_grad(), precision(device, dtype_name):
        for k in range(warmup):
            with Clock(device) as clock:
                outputs = model(batches[it % len(batches)])
            it += 1
            first_ms = clock.wall_ms if first_ms is None else first_ms
            log(f"{dtype_name}: warm-up forward {k + 1}/{warmup}: {clock.wall_ms:.0f} ms")
        _reset_peak(device)
        timer.times.clear()
        timer.enabled = True
        try:
            for _ in range(runs):
                outputs = model(batches[it % len(batches)])
                it += 1
        finally:
            timer.enabled = False
        walls, events = [], []
        for _ in range(runs):
            with Clock(device) as clock:
                outputs = model(batches[it % len(batches)])
            it += 1
            walls.append(clock.wall_ms)
            events.append(clock.event_ms)
    return {"first_ms": first_ms, "modules": {k: statistics.median(v) for k, v in timer.times.items() if v},
            "total_ms": _median(walls), "event_ms": _median(events), "peak_mib": peak_memory_mb(device),
            "outputs": outputs}


def bench_train_step(model: torch.nn.Module, cfg: Mapping[str, Any], batches: Sequence[dict],
                     device: torch.device, warmup: int, runs: int) -> dict[str, Any]:
    """Whole training steps (forward with losses, backward, clip, AdamW) as bevfusion.engine.Trainer does
    them: fp16 autocast + the config's GradScaler on CUDA, fp32 without a scaler elsewhere."""
    from bevfusion.engine.launch import make_scaler
    from bevfusion.engine.optim import build_optimizer
    from bevfusion.engine.trainer import parse_losses

    amp = torch.float16 if device.type == "cuda" else None
    optimizer = build_optimizer(model, cfg["optimizer"])
    scaler = make_scaler(cfg, amp, device)
    clip = dict((cfg.get("optimizer_config") or {}).get("grad_clip") or {}) or None
    model.train()
    walls, events, log_vars = [], [], {}
    first_ms = None
    for i in range(warmup + runs):
        if i == warmup:
            _reset_peak(device)
        with Clock(device) as clock:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                outputs = model(batches[i % len(batches)])
            loss, log_vars = parse_losses(outputs)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if clip is not None:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                log_vars["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, **clip).detach()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        first_ms = clock.wall_ms if first_ms is None else first_ms
        log(f"train step {i + 1}/{warmup + runs}{' (warm-up)' if i < warmup else ''}: {clock.wall_ms:.0f} ms, "
            f"loss {float(log_vars['loss']):.4g}")
        if i >= warmup:
            walls.append(clock.wall_ms)
            events.append(clock.event_ms)
    values = {k: float(v) for k, v in log_vars.items()}
    return {"first_ms": first_ms, "total_ms": _median(walls), "event_ms": _median(events),
            "peak_mib": peak_memory_mb(device), "values": values,
            "scale": float(scaler.get_scale()) if scaler is not None else None,
            "amp": "fp16" if amp is not None else "fp32",
            "finite": all(math.isfinite(v) for k, v in values.items() if k.startswith("loss"))}


# ----------------------------------------------------------------------------------------- report
def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_forward_table(title: str, res: Mapping[str, Any]) -> None:
    print(f"\n## {title}")
    print(f"| {'module':<50} | {'ms (median)':>12} |")
    print(f"|{'-' * 52}|{'-' * 14}|")
    for name in ROW_ORDER:
        if name in res["modules"]:
            print(f"| {name:<50} | {res['modules'][name]:>12.1f} |")
    print(f"| {END_TO_END:<50} | {res['total_ms']:>12.1f} |")
    if res["event_ms"] is not None:
        print(f"| {END_TO_END_EVENTS:<50} | {res['event_ms']:>12.1f} |")
    print(f"frames/s: {1e3 / res['total_ms']:.2f}; first forward {_fmt(res['first_ms'])} ms; "
          f"peak memory {_fmt(res['peak_mib'], '.0f')} MiB")


def _describe_batch(batch: Mapping[str, Any]) -> str:
    pts = sum(len(p) for p in batch["points"])
    img = tuple(batch["img"].shape) if "img" in batch else None
    return f"points {pts}, images {img}"


def _forward_rows(report: JsonReport, title: str, dtype_name: str, res: Mapping[str, Any],
                  fp32_ms: dict[str, float], batch_size: int, input_note: str) -> None:
    times = dict(res["modules"], **{END_TO_END: res["total_ms"]})
    if res["event_ms"] is not None:
        times[END_TO_END_EVENTS] = res["event_ms"]
    records = []
    for name in ROW_ORDER + (END_TO_END, END_TO_END_EVENTS):
        if name not in times:
            continue
        ms = times[name]
        if dtype_name == "fp32":
            fp32_ms[name] = ms
        ratio = fp32_ms[name] / ms if dtype_name != "fp32" and name in fp32_ms and ms > 0 else None
        if name == END_TO_END:
            fps = 1e3 / ms
            boxes = sum(len(o.get("boxes_3d", ())) for o in res["outputs"])
            note = (f"{fps:.2f} frames/s (batch {batch_size}: {fps * batch_size:.2f} samples/s); {boxes} boxes out; "
                    f"{input_note}; no hooks")
            if dtype_name == "fp16":
                note += f"; target >= {TARGET_FPS:g} frames/s: {'met' if fps >= TARGET_FPS else 'NOT met'}"
        elif name == END_TO_END_EVENTS:
            note = "CUDA events around the same forwards (host gaps included: the forward syncs)"
        else:
            note = "forward hooks (device synchronised at module boundaries)"
        records.append(Record(table=title, what=name, dtype=dtype_name, ms=ms, ratio=ratio,
                              ratio_vs=name if ratio is not None else None,
                              peak_mib=res["peak_mib"] if name == END_TO_END else None, note=note))
    records.append(Record(table=title, what=FIRST_CALL, dtype=dtype_name, ms=res["first_ms"],
                          note="the first warm-up forward of this dtype" if res["first_ms"] is not None
                          else "no warm-up requested"))
    report.add(*records)


def _train_rows(report: JsonReport, title: str, res: Mapping[str, Any], runs: int, warmup: int) -> None:
    amp = res["amp"]
    values = res["values"]
    keys = sorted(k for k in values if k.startswith("loss")) + sorted(k for k in values if not k.startswith("loss"))
    note = (f"median of {runs} after {warmup} warm-up; losses {'finite' if res['finite'] else 'NOT FINITE'}; "
            f"total loss {values.get('loss', math.nan):.4g}"
            + (f"; loss scale {res['scale']:g}" if res["scale"] is not None else ""))
    records = [Record(table=title, what="train step (forward + losses + backward + clip + AdamW)", dtype=amp,
                      ms=res["total_ms"], peak_mib=res["peak_mib"], note=note)]
    if res["event_ms"] is not None:
        records.append(Record(table=title, what="train step, CUDA events", dtype=amp, ms=res["event_ms"],
                              note="CUDA events around the same steps"))
    records.append(Record(table=title, what="first train step (JIT compiles, autotune)", dtype=amp,
                          ms=res["first_ms"]))
    for key in keys:
        records.append(Record(table=title, what=key, dtype=amp,
                              note=f"value {values[key]:.6g}" + ("" if math.isfinite(values[key]) else " NOT FINITE")))
    report.add(*records)
    print(f"\n## {title}")
    print(f"train step: {_fmt(res['total_ms'])} ms (median), first {_fmt(res['first_ms'])} ms, "
          f"peak memory {_fmt(res['peak_mib'], '.0f')} MiB, losses {'finite' if res['finite'] else 'NOT FINITE'}")
    for key in keys:
        print(f"  {key} = {values[key]:.6g}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic",
                        help="generated drive with info files (for --inputs drive/auto)")
    parser.add_argument("--inputs", default="auto", choices=["auto", "synthetic", "drive"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32",
                        help="comma-separated precisions of the eval forward: fp32 (TF32 off), fp16, bf16 (autocast)")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per phase (module hooks, end to end)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per dtype before timing")
    parser.add_argument("--train-step", action="store_true", help="also time training steps (AMP on CUDA)")
    parser.add_argument("--train-runs", type=int, default=3)
    parser.add_argument("--train-warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="samples per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    parser.add_argument("--small", action="store_true",
                        help="small synthetic inputs for CPU checks (128x352 images, 2 sparse sweeps)")
    parser.add_argument("--json", type=Path, default=None, help="write the shared benchmark JSON here")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="config overrides, e.g. model.encoders.lidar.backbone.dataflow=igemm")
    args = parser.parse_args(argv)

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        parser.error(f"--dtype: unknown {unknown or args.dtype!r} (expected a comma-separated list of "
                     "fp32, fp16, bf16)")
    if args.runs < 1 or args.warmup < 0 or args.train_runs < 1 or args.train_warmup < 0 or args.batch < 1:
        parser.error("--runs, --train-runs and --batch must be >= 1, --warmup and --train-warmup >= 0")
    device = torch.device(args.device)
    inputs, why_synthetic = args.inputs, None
    if inputs == "auto":
        if not (args.data / "nuscenes_infos_val.pkl").is_file():
            why_synthetic = f"no {args.data / 'nuscenes_infos_val.pkl'}"
        elif importlib.util.find_spec("nuscenes") is None:
            why_synthetic = "nuscenes-devkit is missing (the test pipeline's LoadBEVSegmentation needs it)"
        inputs = "synthetic" if why_synthetic else "drive"
    if inputs == "drive" and args.small:
        parser.error("--small applies to --inputs synthetic only")
    overrides = [f"dataset_root={args.data.as_posix().rstrip('/')}/"] if inputs == "drive" else []
    overrides += (list(SMALL_OVERRIDES) if args.small else []) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    config_path = args.config.resolve()
    config_name = config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path
    report = JsonReport(str(args.json) if args.json is not None else None, "model", device_name(device))
    setup = "setup"

    log(f"building {config_name} on {device}")
    t0 = time.perf_counter()
    model = build_model(cfg["model"])
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = model.to(device).eval()
    sync(device)
    report.add(Record(table=setup, what="build model (CPU) + move to device", ms=(time.perf_counter() - t0) * 1e3,
                      note=str(config_name)),
               Record(table=setup, what="parameters",
                      note=f"{n_train / 1e6:.2f} M trainable ({n_train}); {n_params} with the fixed frustum/grid "
                           "tensors stored as parameters"))

    log(f"model built; making the inputs ({inputs})")
    t0 = time.perf_counter()
    if inputs == "synthetic":
        batches = [move_batch(synthetic_batch(cfg, args.batch, args.seed, args.small), device)]
    else:
        batches = [move_batch(b, device) for b in drive_batches(cfg, args.runs, args.batch)]
    sync(device)
    input_note = f"inputs {inputs}{' (small)' if args.small else ''}, batch {args.batch}, {_describe_batch(batches[0])}"
    report.add(Record(table=setup, what=f"make inputs ({inputs})", ms=(time.perf_counter() - t0) * 1e3,
                      note=input_note + (f" (auto: {why_synthetic})" if why_synthetic else "")))

    timer = Timer(device)
    named = dict(model.named_modules())
    for part in PARTS:
        if part in named:
            timer.attach(part, named[part])
    for label, part, attr in SUBPARTS:
        if part in named and hasattr(named[part], attr):
            timer.wrap_method(label, named[part], attr)

    print(f"# {config_name}")
    print(f"# {device_name(device)}, {input_note}, {args.runs} runs after {args.warmup} warm-up, "
          f"{n_train / 1e6:.1f} M trainable parameters, {time.strftime('%Y-%m-%d')}", flush=True)
    failed = False
    fp32_ms: dict[str, float] = {}
    for dtype_name in dtypes:
        title = f"model forward, {dtype_name}" + (" (TF32 off)" if dtype_name == "fp32" else " autocast")
        if dtype_name == "fp16" and device.type != "cuda":
            report.skip(title, "fp16 autocast needs a CUDA device")
            continue
        log(f"{title}: {args.warmup} warm-up + 2 x {args.runs} timed forwards")
        try:
            res = bench_forward(model, batches, device, dtype_name, timer, args.warmup, args.runs)
        except Exception as exc:  # noqa: BLE001 - record the failure, go on with the other sections
            traceback.print_exc()
            report.skip(title, f"failed: {one_line(exc)}")
            failed = True
            continue
        print_forward_table(title, res)
        _forward_rows(report, title, dtype_name, res, fp32_ms, args.batch, input_note)

    if args.train_step:
        title = "training step (AdamW" + (", fp16 autocast + GradScaler)" if device.type == "cuda" else ", fp32)")
        log(f"{title}: {args.train_warmup} warm-up + {args.train_runs} timed steps")
        try:
            res = bench_train_step(model, cfg, batches, device, args.train_warmup, args.train_runs)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            report.skip(title, f"failed: {one_line(exc)}")
            failed = True
        else:
            _train_rows(report, title, res, args.train_runs, args.train_warmup)
            if not res["finite"]:
                print("error: the training step produced non-finite losses", file=sys.stderr)
                failed = True
    else:
        report.skip("training step", "not requested (--train-step)")
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

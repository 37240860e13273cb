"""One picture of a run, `summary.png`: what a user without a display (or without rerun) looks at.

    from bevfusion.visualization.summary import summary_frames, write_summary
    frames = summary_frames(dataset, records, count=3)          # records of tools/test.py (or --out's pickle)
    write_summary("work/summary.png", frames=frames, log_jsonl="work/log.jsonl", metrics=metrics,
                  pr_curves="work/pr_curves", object_classes=dataset.object_classes, map_classes=dataset.map_classes)

Top row: (a) the training losses of the trainer's `log.jsonl` (total and main terms, smoothed, against the
iteration), (b) per-class detection AP with mAP / NDS, (c) per-class map IoU with mIoU, (d) the nuScenes
devkit's own precision-recall curves of one class (car), drawn by the devkit's `class_pr_curve` into this
figure from the `metrics_summary.json` / `metrics_details.json` that `evaluate_detection(curves_dir=...)`
leaves in the PR-curve folder (beside them, the devkit's full set of PR and TP plots as PDFs). Bottom row:
a bird's-eye view of a few samples (`draw_bev`). A panel whose input is missing says so instead.

Drawn on matplotlib's Agg canvas through the object API (no pyplot state, no display needed); the PNG is
written atomically. matplotlib is imported only here, when a picture is made.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bevfusion.structures.boxes import box_corners
from bevfusion.utils.io import atomic_write_bytes
from bevfusion.utils.logging import get_logger
from bevfusion.visualization.colors import class_color
from bevfusion.visualization.frames import BEV_XBOUND, BEV_YBOUND, Frame, FrameOptions

__all__ = ["write_summary", "summary_figure", "summary_frames", "draw_bev", "bev_figure", "read_training_log",
           "best_map_thresholds", "is_summary_png", "PNG_SIGNATURE", "GT_STYLE", "EGO_COLOR", "PR_CLASS"]

log = get_logger("visualization")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GT_STYLE = {"color": "black", "linestyle": (0, (3.0, 1.5)), "linewidth": 0.9}  # thin dashed neutral outline
PRED_LINEWIDTH = 1.4
EGO_COLOR = "#d6197b"  # magenta: no object or map class uses it
MAP_ALPHA = 0.45
PR_CLASS = "car"


def _mpl():
    """matplotlib's Figure and Agg canvas; a clear error when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"the summary picture needs matplotlib ({exc}); install it with `pip install matplotlib` "
                          "(it also comes with the package's [nuscenes] extra)") from None
    return Figure, FigureCanvasAgg


def _rgb(name: str) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in class_color(name))  # type: ignore[return-value]


def is_summary_png(path: str | os.PathLike) -> bool:
    """An existing PNG file (what `write_summary` writes): `tools/test.py --summary` may replace it."""
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# inputs


def read_training_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The training records of the trainer's `log.jsonl` as columns, sorted by `global_iter`.

    Returns {"iter": (N,) global iteration, "loss": (N,) total, "<key>": (N,) every other loss term
    (`loss/<head>/<name>`, or `loss_*` of other trainers)}, NaN where a record lacks a term. Validation
    records are skipped; a line that is not a JSON object (a run killed mid-write) is skipped with a warning;
    a resumed run that logged an iteration twice keeps the later record.
    """
    path = Path(path)
    by_iter: dict[int, Mapping[str, Any]] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(rec, dict) or rec.get("mode", "train") != "train" or "loss" not in rec:
                continue
            it = rec.get("global_iter", rec.get("iter"))
            if isinstance(it, (int, float)) and not isinstance(it, bool):
                by_iter[int(it)] = rec
    if bad:
        log.warning("%s: %d lines are not JSON records and are skipped", path, bad)
    iters = sorted(by_iter)
    keys = ["loss"]
    for it in iters:
        keys.extend(k for k in by_iter[it] if k.startswith("loss") and k != "loss_scale" and k not in keys)

    def column(key: str) -> np.ndarray:
        vals = [by_iter[it].get(key) for it in iters]
        return np.array([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
                         for v in vals], dtype=np.float64)

    out = {"iter": np.array(iters, dtype=np.int64)}
    out.update({k: column(k) for k in keys})
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Debiased exponential moving average with a time constant of `window` records (NaN are skipped)."""
    if window <= 1:
        return values
    a = 1.0 - 1.0 / window
    out = np.full_like(values, np.nan)
    acc = weight = 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            acc = a * acc + (1 - a) * v
            weight = a * weight + (1 - a)
        if weight > 0:
            out[i] = acc / weight
    return out


def _loss_lines(columns: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The terms to draw besides the total: each term of a head with at most 4, else the head's sum."""
    heads: dict[str, list[str]] = {}
    for key in columns:
        if key in ("iter", "loss"):
            continue
        parts = key.split("/")
        head = parts[1] if parts[0] == "loss" and len(parts) > 2 else ""
        heads.setdefault(head, []).append(key)
    lines = []
    for head, keys in heads.items():
        if len(keys) <= 4:
            lines.extend((k[len("loss/"):] if k.startswith("loss/") else k, columns[k]) for k in keys)
        else:
            total = np.sum([np.nan_to_num(columns[k]) for k in keys], axis=0)
            lines.append((f"{head or 'other'} (sum of {len(keys)} terms)", total))
    return lines


def _metrics_dict(metrics: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if isinstance(metrics, (str, os.PathLike)):
        try:
            metrics = json.loads(Path(metrics).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{metrics}: not a readable metrics JSON ({exc})") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"{metrics}: a metrics JSON is an object of numbers")
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def best_map_thresholds(metrics: Mapping[str, float], map_classes: Sequence[str]) -> dict[str, float]:
    """{class: the threshold of its best IoU} from `map/<class>/iou@<threshold>` metrics (classes without: none)."""
    out: dict[str, float] = {}
    for name in map_classes:
        prefix = f"map/{name}/iou@"
        scored = [(v, float(k[len(prefix):])) for k, v in metrics.items()
                  if k.startswith(prefix) and k[len(prefix):] != "max"]
        if scored:
            out[name] = max(scored, key=lambda vt: (vt[0], -vt[1]))[1]
    return out


# ---------------------------------------------------------------------------------------------------
# panels


def _note(ax, text: str, title: str | None = None) -> None:
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="#555555",
            transform=ax.transAxes)


def draw_losses(ax, columns: Mapping[str, np.ndarray] | None, source: str = "log.jsonl") -> None:
    """Total loss (raw faint, smoothed solid) and the main terms (smoothed) against the iteration."""
    if columns is None or len(columns.get("iter", ())) == 0:
        _note(ax, f"no training log\n({source} not found or without training records)", "training loss")
        return
    it = columns["iter"]
    window = max(1, len(it) // 30)
    ax.plot(it, columns["loss"], color="black", alpha=0.18, linewidth=0.8)
    ax.plot(it, _smooth(columns["loss"], window), color="black", linewidth=2.0, label="total")
    for k, (name, values) in enumerate(_loss_lines(columns)):
        ax.plot(it, _smooth(values, window), linewidth=1.2, label=name, color=f"C{k % 10}")
    finite = np.concatenate([v[np.isfinite(v)] for k, v in columns.items() if k != "iter"])
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss ({len(it)} logged steps, smoothed)", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.85)


def _bars(ax, names: Sequence[str], values: Sequence[float], colors, title: str, xlabel: str) -> None:
    y = np.arange(len(names))
    vals = np.nan_to_num(np.asarray(values, dtype=np.float64))
    ax.barh(y, vals, color=colors, edgecolor="#333333", linewidth=0.5)
    for k, v in enumerate(values):
        ax.text(min(float(np.nan_to_num(v)), 1.0) + 0.01, k, "n/a" if not math.isfinite(v) else f"{v:.3f}",
                va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)


def draw_ap(ax, metrics: Mapping[str, float], object_classes: Sequence[str]) -> None:
    """Per-class detection AP (`object/<class>_ap`, the mean over the devkit's distance thresholds)."""
    if "object/map" not in metrics:
        _note(ax, "no detection metrics\n(run with --eval bbox)", "detection AP")
        return
    names = [c for c in object_classes if f"object/{c}_ap" in metrics] or list(object_classes)
    _bars(ax, names, [metrics.get(f"object/{c}_ap", float("nan")) for c in names], [_rgb(c) for c in names],
          f"detection AP: mAP {metrics['object/map']:.3f}, NDS {metrics.get('object/nds', float('nan')):.3f}",
          "AP (mean over 0.5 / 1 / 2 / 4 m)")


def draw_iou(ax, metrics: Mapping[str, float], map_classes: Sequence[str]) -> None:
    """Per-class map IoU at the best threshold (`map/<class>/iou@max`)."""
    if "map/mean/iou@max" not in metrics:
        _note(ax, "no map metrics\n(run with --eval map)", "map IoU")
        return
    names = [c for c in map_classes if f"map/{c}/iou@max" in metrics] or list(map_classes)
    _bars(ax, names, [metrics.get(f"map/{c}/iou@max", float("nan")) for c in names], [_rgb(c) for c in names],
          f"map IoU: mIoU {metrics['map/mean/iou@max']:.3f}", "IoU (best threshold)")


def draw_pr_curve(ax, pr_curves: str | os.PathLike | None, class_name: str = PR_CLASS) -> None:
    """The devkit's PR curves of `class_name` (one per distance threshold), drawn by the devkit itself."""
    title = f"{class_name} precision-recall (nuScenes devkit)"
    folder = Path(pr_curves) if pr_curves is not None else None
    if folder is None or not (folder / "metrics_details.json").is_file() \
            or not (folder / "metrics_summary.json").is_file():
        where = f"metrics_details.json not in {folder}" if folder is not None else "no detection evaluation"
        _note(ax, f"no PR curves\n({where})", title)
        return
    try:
        from nuscenes.eval.detection.data_classes import DetectionMetricDataList, DetectionMetrics
        from nuscenes.eval.detection.render import class_pr_curve
    except ImportError:
        _note(ax, "no PR curves\n(nuscenes-devkit is not installed)", title)
        return
    details = json.loads((folder / "metrics_details.json").read_text())
    summary = json.loads((folder / "metrics_summary.json").read_text())
    md_list = DetectionMetricDataList.deserialize(details)
    metrics = DetectionMetrics.deserialize(summary)
    if not any(key.startswith(f"{class_name}:") for key in details):
        _note(ax, f"no PR curves\n({class_name} is not an evaluated class)", title)
        return
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    class_pr_curve(md_list, metrics, class_name, metrics.cfg.min_precision, metrics.cfg.min_recall, ax=ax)
    ax.axvline(metrics.cfg.min_recall, linestyle="--", color="#999999", linewidth=0.8)
    ax.axhline(metrics.cfg.min_precision, linestyle="--", color="#999999", linewidth=0.8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    legend = ax.get_legend()
    if legend is not None:
        for text in legend.get_texts():
            text.set_fontsize(7)


def _lidar_to_ego_2d(frame: Frame) -> tuple[np.ndarray, np.ndarray, float]:
    """(2, 2) rotation, (2,) translation and yaw of the LiDAR frame in the ego frame (bird's-eye part)."""
    m = np.asarray(frame.lidar2ego, dtype=np.float64)
    rot = m[:2, :2]
    return rot, m[:2, 3], math.atan2(rot[1, 0], rot[0, 0])


def _boxes_to_ego(boxes: np.ndarray, frame: Frame) -> np.ndarray:
    rot, t, yaw = _lidar_to_ego_2d(frame)
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, :2] = out[:, :2] @ rot.T + t
    out[:, 6] += yaw
    return out


def _draw_boxes(ax, boxes: np.ndarray, *, colors, style: Mapping[str, Any], tick: bool) -> None:
    """Footprints (and a heading tick from the centre to the front edge) in the panel's (y, x) data space."""
    corners = box_corners(boxes)[:, :4, :2]  # (K, 4, 2): front-left, rear-left, rear-right, front-right
    style = {k: v for k, v in style.items() if k != "color"}
    for k in range(len(boxes)):
        ring = np.concatenate([corners[k], corners[k, :1]])
        ax.plot(ring[:, 1], ring[:, 0], color=colors[k], solid_capstyle="butt", **style)
        if tick:
            front = (corners[k, 0] + corners[k, 3]) / 2
            ax.plot([boxes[k, 1], front[1]], [boxes[k, 0], front[0]], color=colors[k], **style)


def draw_bev(ax, frame: Frame, map_classes: Sequence[str] = (), *, score_threshold: float | None = None,
             map_threshold: float | Mapping[str, float] = 0.5, point_size: float = 1.0, rings: bool = True,
             labels: bool = True, title: bool = True) -> None:
    """One sample seen from above, in the ego frame, forward up.

    The panel's data space is (y, x) in metres of the ego frame: the horizontal axis is ego +y, increasing
    to the LEFT (the axis is inverted), the vertical axis ego +x (forward), increasing upwards; it spans
    BEV_YBOUND[:2] by BEV_XBOUND[:2] with equal scales. Everything of the frame (LiDAR frame) is moved into
    the ego frame with the bird's-eye part of `frame.lidar2ego`, so forward is up whatever the LiDAR's
    mounting (nuScenes' LIDAR_TOP has x to the right).

    Drawn: LiDAR points (grey, darker = higher), the predicted map masks (probability >= `map_threshold`,
    one for all classes or one per class name (missing: 0.5), in translucent class colours; masks (C, X, Y)
    cover BEV_XBOUND x BEV_YBOUND of the LiDAR frame at any cell size), GT boxes as thin dashed black
    outlines, predicted boxes in their class colour with a heading tick and a score label, the ego as a
    magenta triangle pointing forward at the ego origin, range rings every 10 m.

    Args:
        score_threshold: also hide predictions below this score (frames of `load_frame` are already cut).
        rings, labels, title: the range rings, the score labels and the panel title (off for pixel tests).
    """
    (x0, x1), (y0, y1) = BEV_XBOUND[:2], BEV_YBOUND[:2]
    ax.set_xlim(y1, y0)  # ego +y (left) on the left
    ax.set_ylim(x0, x1)  # ego +x (forward) up
    ax.set_aspect("equal", adjustable="box")
    ax.set_facecolor("white")
    ax.tick_params(labelsize=7)

    if frame.pred_masks is not None and len(map_classes):
        from matplotlib.transforms import Affine2D

        masks = np.asarray(frame.pred_masks)
        if masks.ndim != 3 or masks.shape[0] != len(map_classes):
            raise ValueError(f"sample {frame.token}: predicted masks of shape {masks.shape} do not match the "
                             f"{len(map_classes)} map classes {list(map_classes)}")
        rgba = np.zeros(masks.shape[1:] + (4,), dtype=np.float32)  # (X, Y, 4): row i = LiDAR x_i, column j = y_j
        for k, name in enumerate(map_classes):  # the last class above threshold wins, as in bev_map_image
            th = map_threshold.get(name, 0.5) if isinstance(map_threshold, Mapping) else map_threshold
            on = masks[k] >= th
            rgba[on, :3] = _rgb(name)
            rgba[on, 3] = MAP_ALPHA
        rot, t, _ = _lidar_to_ego_2d(frame)
        swap = np.array([[0.0, 1.0], [1.0, 0.0]])  # (x, y) <-> the panel's (y, x)
        affine = np.eye(3)
        affine[:2, :2] = swap @ rot @ swap
        affine[:2, 2] = swap @ t
        ax.imshow(rgba, origin="lower", extent=(y0, y1, x0, x1), interpolation="nearest", zorder=1,
                  transform=Affine2D(affine) + ax.transData)

    if frame.points is not None and len(frame.points):
        rot, t, _ = _lidar_to_ego_2d(frame)
        pts = np.asarray(frame.points, dtype=np.float64)
        xy = pts[:, :2] @ rot.T + t
        z_row = np.asarray(frame.lidar2ego, dtype=np.float64)[2]
        z = pts[:, :3] @ z_row[:3] + z_row[3]
        shade = 0.6 - 0.55 * np.clip((z + 0.3) / 2.5, 0.0, 1.0)  # ego z: the ground (~0) mid grey, 2 m black
        ax.scatter(xy[:, 1], xy[:, 0], s=point_size, c=np.repeat(shade[:, None], 3, axis=1), linewidths=0,
                   marker=".", rasterized=True, zorder=2)

    if rings:
        from matplotlib.patches import Circle

        for r in range(10, int(max(x1, y1)) + 1, 10):
            ax.add_patch(Circle((0, 0), r, fill=False, color="#bbbbbb", linewidth=0.6, linestyle=":", zorder=1.5))
            ax.text(-r * 0.7071, r * 0.7071, f"{r} m", fontsize=6, color="#999999", ha="center", va="center",
                    zorder=1.5)

    n_gt = n_pred = 0
    if frame.gt_boxes is not None and len(frame.gt_boxes):
        gt = _boxes_to_ego(frame.gt_boxes, frame)
        n_gt = len(gt)
        _draw_boxes(ax, gt, colors=[GT_STYLE["color"]] * n_gt, style={**GT_STYLE, "zorder": 3}, tick=False)
    if frame.pred_boxes is not None and len(frame.pred_boxes):
        keep = np.ones(len(frame.pred_boxes), dtype=bool)
        scores = frame.pred_scores
        if score_threshold is not None and scores is not None:
            keep = np.asarray(scores) >= score_threshold
        pred = _boxes_to_ego(np.asarray(frame.pred_boxes)[keep], frame)
        names = [n for n, k in zip(frame.pred_names or ["object"] * len(keep), keep) if k]
        n_pred = len(pred)
        _draw_boxes(ax, pred, colors=[_rgb(n) for n in names], style={"linewidth": PRED_LINEWIDTH, "zorder": 4},
                    tick=True)
        if labels and scores is not None:
            for box, s in zip(pred, np.asarray(scores)[keep]):
                if x0 < box[0] < x1 and y0 < box[1] < y1:
                    ax.text(box[1] - 0.5 * max(box[3], box[4]) - 0.5, box[0], f"{s:.2f}", fontsize=5,
                            color="#222222", va="center", ha="left", zorder=5, clip_on=True)

    from matplotlib.patches import Polygon

    ax.add_patch(Polygon([(0.0, 3.0), (1.4, -1.5), (-1.4, -1.5)], closed=True, color=EGO_COLOR, zorder=6))
    if title:
        where = f"{frame.scene}, " if frame.scene else ""
        ax.set_title(f"{where}sample {frame.index} ({frame.token[:8]}): {n_gt} GT, {n_pred} predicted",
                     fontsize=9)
        ax.set_xlabel("ego y (m, left +)", fontsize=8)
        ax.set_ylabel("ego x (m, forward +)", fontsize=8)


def bev_figure(frame: Frame, map_classes: Sequence[str] = (), size_px: int = 400, **kwargs):
    """A figure of `size_px` x `size_px` pixels whose single axes fills it, with `draw_bev` drawn in it.

    Returns (figure, axes); `figure.canvas.buffer_rgba()` after `figure.canvas.draw()` gives the pixels,
    row 0 at the top. Meant for tests and for embedding the panel elsewhere.
    """
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(size_px / 100, size_px / 100), dpi=100)
    Canvas(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    draw_bev(ax, frame, map_classes, **kwargs)
    return fig, ax


def _legend_handles(frames: Sequence[Frame], object_classes: Sequence[str], map_classes: Sequence[str],
                    score_threshold: float | None, map_thresholds: Mapping[str, float]):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], **GT_STYLE, label="GT box"),
               Line2D([], [], color="#444444", linewidth=PRED_LINEWIDTH,
                      label="predicted box (class colour, tick = heading, label = score"
                            + (f" >= {score_threshold:g})" if score_threshold is not None else ")")),
               Line2D([], [], marker="^", color=EGO_COLOR, linestyle="none", markersize=8, label="ego")]
    seen = {n for fr in frames for n in fr.pred_names}
    handles += [Patch(color=_rgb(n), label=n) for n in [*object_classes, *sorted(seen - set(object_classes))]
                if n in seen]
    if any(fr.pred_masks is not None for fr in frames):
        handles += [Patch(color=_rgb(c), alpha=MAP_ALPHA, label=f"map: {c} (p >= {map_thresholds.get(c, 0.5):g})")
                    for c in map_classes]
    return handles


def summary_figure(*, frames: Sequence[Frame] = (), object_classes: Sequence[str] = (),
                   map_classes: Sequence[str] = (), log_jsonl: str | os.PathLike | None = None,
                   metrics: Mapping[str, Any] | str | os.PathLike | None = None,
                   pr_curves: str | os.PathLike | None = None, score_threshold: float | None = None,
                   title: str | None = None, width_in: float = 20.0):
    """The summary as a matplotlib Figure (Agg canvas attached); see `write_summary` for the arguments."""
    Figure, Canvas = _mpl()
    frames = list(frames)[:4]
    m = _metrics_dict(metrics)
    # Layout in inches: heading, the metrics row, titles and labels between, one square per BEV panel,
    # the legend at the bottom.
    n = len(frames)
    head_in, top_in, gap_in, foot_in = 0.7, 3.6, 1.0, (1.1 if n else 0.6)
    panel_in = (width_in * 0.95 - 0.5 * max(n - 1, 0)) / max(n, 1) if n else 0.0
    height_in = head_in + top_in + (gap_in + panel_in if n else 0.0) + foot_in
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    Canvas(fig)
    grid = fig.add_gridspec(2 if n else 1, 1, height_ratios=[top_in, panel_in] if n else [top_in],
                            left=0.04, right=0.99, top=1 - head_in / height_in, bottom=foot_in / height_in,
                            hspace=gap_in / ((top_in + panel_in) / 2) if n else 0.0)
    top = grid[0].subgridspec(1, 4, wspace=0.32, width_ratios=[1.25, 1.0, 1.0, 1.0])

    columns = None
    source = os.fspath(log_jsonl) if log_jsonl is not None else "log.jsonl"
    if log_jsonl is not None and Path(log_jsonl).is_file():
        columns = read_training_log(log_jsonl)
    draw_losses(fig.add_subplot(top[0]), columns, source)
    draw_ap(fig.add_subplot(top[1]), m, object_classes)
    draw_iou(fig.add_subplot(top[2]), m, map_classes)
    draw_pr_curve(fig.add_subplot(top[3]), pr_curves)

    if n:
        bottom = grid[1].subgridspec(1, n, wspace=0.5 / panel_in)
        thresholds = best_map_thresholds(m, map_classes)
        for k, frame in enumerate(frames):
            draw_bev(fig.add_subplot(bottom[k]), frame, map_classes, score_threshold=score_threshold,
                     map_threshold=thresholds)
        handles = _legend_handles(frames, object_classes, map_classes, score_threshold, thresholds)
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)

    parts = []
    if "object/map" in m:
        parts.append(f"mAP {m['object/map']:.3f}, NDS {m.get('object/nds', float('nan')):.3f}")
        if f"object/{PR_CLASS}_ap" in m:
            parts.append(f"{PR_CLASS} AP {m[f'object/{PR_CLASS}_ap']:.3f}")
    if "map/mean/iou@max" in m:
        parts.append(f"map mIoU {m['map/mean/iou@max']:.3f}")
    heading = title or "bevfusion"
    fig.suptitle(heading + (": " + ", ".join(parts) if parts else ""), fontsize=14, fontweight="bold")
    return fig


def write_summary(path: str | os.PathLike, *, frames: Sequence[Frame] = (), object_classes: Sequence[str] = (),
                  map_classes: Sequence[str] = (), log_jsonl: str | os.PathLike | None = None,
                  metrics: Mapping[str, Any] | str | os.PathLike | None = None,
                  pr_curves: str | os.PathLike | None = None, score_threshold: float | None = None,
                  title: str | None = None, dpi: int = 100) -> Path:
    """Render the run summary and write it as a PNG, atomically.

    Args:
        path: the PNG to write (folders are created).
        frames: up to 4 samples for the bird's-eye panels (`summary_frames`); none: no BEV row. Their
            predicted map masks are cut at each class's best-IoU threshold of `metrics` (else 0.5).
        object_classes, map_classes: class order of the AP bars and of the masks' channels.
        log_jsonl: the trainer's `log.jsonl`; None or missing: the loss panel says so.
        metrics: the dict of `evaluate_results` / `tools/test.py --metrics-out` (`object/map`, `object/nds`,
            `object/<class>_ap`, `map/<class>/iou@max`, `map/mean/iou@max`), or that JSON file's path.
        pr_curves: the PR-curve folder of `evaluate_detection(curves_dir=...)`. The car curves are drawn into
            the summary by the devkit from the metrics files there; the devkit's PDFs stay in that folder.
        score_threshold: predictions below it are hidden (and the legend says so).
        title: the heading, followed by the main metrics.
    Returns:
        `path` as a Path.
    """
    fig = summary_figure(frames=frames, object_classes=object_classes, map_classes=map_classes,
                         log_jsonl=log_jsonl, metrics=metrics, pr_curves=pr_curves,
                         score_threshold=score_threshold, title=title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return atomic_write_bytes(path, buf.getvalue())


def summary_frames(dataset, results: str | os.PathLike | Sequence[Mapping[str, Any]], count: int = 3,
                   options: FrameOptions | None = None) -> list[Frame]:
    """`count` samples with results, spread evenly over the dataset's order, loaded with `load_frame`.

    Args:
        results: the records of `tools/test.py` (in memory, tensors allowed) or its `--out` pickle.
        options: what to load (default: 3 sweeps, at most 40 000 points, no images or GT map, the
            recording's score threshold).
    """
    from bevfusion.visualization.frames import load_frame, load_results, select_samples

    by_token = load_results(results, dataset)
    options = options or FrameOptions(sweeps_num=3, max_points=40_000, gt_maps=False, images=False)
    indices, scenes = select_samples(dataset, tokens=list(by_token))
    if not indices or count <= 0:
        return []
    picks = sorted({indices[int(round(p))] for p in np.linspace(0, len(indices) - 1, min(count, len(indices)))})
    base = getattr(dataset, "dataset", dataset)
    return [load_frame(dataset, i, by_token[base.data_infos[i]["token"]], options, scene=scenes.get(i))
            for i in picks]

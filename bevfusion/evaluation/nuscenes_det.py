"""nuScenes detection: predictions → submission JSON → the devkit's `DetectionEval`.

Predictions are per-sample dicts with `boxes_3d` (K, 9) in our internal LiDAR-frame convention
(x, y, z centre, dx, dy, dz, yaw, vx, vy; see bevfusion.structures.boxes), `scores_3d` (K,) and
`labels_3d` (K,) indexing the class names. Formatting follows the official conversion (facts §6.6):
to the ego frame, drop boxes beyond the class's evaluation range, to the global frame, default
attribute by class and speed, at most 500 boxes per sample.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bevfusion.structures.geometry import make_transform, matrix_to_quaternion, quaternion_to_matrix
from bevfusion.utils.io import atomic_write_text

__all__ = ["DEFAULT_ATTRIBUTES", "CLASS_RANGES", "format_results", "write_submission", "evaluate_detection",
           "default_attribute"]

# detection_cvpr_2019 class ranges (metres, ego-frame BEV distance).
CLASS_RANGES = {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50, "pedestrian": 40,
                "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30}
MAX_BOXES_PER_SAMPLE = 500

DEFAULT_ATTRIBUTES = {  # attribute when moving (speed > 0.2 m/s), when not
    "car": ("vehicle.moving", "vehicle.parked"),
    "truck": ("vehicle.moving", "vehicle.parked"),
    "trailer": ("vehicle.moving", "vehicle.parked"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked"),
    "bus": ("vehicle.moving", "vehicle.stopped"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
    "barrier": ("", ""),
    "traffic_cone": ("", ""),
}


def default_attribute(name: str, velocity_xy: Sequence[float]) -> str:
    moving, still = DEFAULT_ATTRIBUTES.get(name, ("", ""))
    return moving if float(np.hypot(*velocity_xy[:2])) > 0.2 else still


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def format_results(predictions: Sequence[Mapping[str, Any]], infos: Sequence[Mapping[str, Any]],
                   class_names: Sequence[str], modality: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Build the submission dict from predictions aligned with `infos` (info-file records).

    Each info gives the sample token and the lidar2ego / ego2global calibration (official keys).
    """
    if len(predictions) != len(infos):
        raise ValueError(f"{len(predictions)} predictions for {len(infos)} samples")
    results: dict[str, list] = {}
    for pred, info in zip(predictions, infos):
        token = info["token"]
        boxes = _to_numpy(pred.get("boxes_3d", np.zeros((0, 9)))).astype(np.float64).reshape(-1, 9)
        scores = _to_numpy(pred.get("scores_3d", np.zeros(0))).astype(np.float64).reshape(-1)
        labels = _to_numpy(pred.get("labels_3d", np.zeros(0))).astype(np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"sample {token}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"sample {token}: label outside 0..{len(class_names) - 1}")
        lidar2ego = make_transform(info["lidar2ego_rotation"], info["lidar2ego_translation"])
        ego2global = make_transform(info["ego2global_rotation"], info["ego2global_translation"])
        records = []
        for i in np.argsort(-scores, kind="stable"):
            name = class_names[labels[i]]
            x, y, z, dx, dy, dz, yaw, vx, vy = boxes[i]
            rot = make_transform(quaternion_to_matrix([np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]), [x, y, z])
            ego = lidar2ego @ rot
            if np.hypot(ego[0, 3], ego[1, 3]) > CLASS_RANGES.get(name, np.inf):
                continue
            glob = ego2global @ ego
            velocity = (ego2global[:3, :3] @ lidar2ego[:3, :3] @ np.array([vx, vy, 0.0]))[:2]
            records.append({
                "sample_token": token,
                "translation": glob[:3, 3].tolist(),
                "size": [float(dy), float(dx), float(dz)],  # nuScenes (w, l, h)
                "rotation": matrix_to_quaternion(glob[:3, :3]).tolist(),
                "velocity": velocity.tolist(),
                "detection_name": name,
                "detection_score": float(scores[i]),
                "attribute_name": default_attribute(name, velocity),
            })
            if len(records) == MAX_BOXES_PER_SAMPLE:
                break
        results[token] = records
    meta = dict(modality or {"use_camera": True, "use_lidar": True, "use_radar": False, "use_map": False,
                             "use_external": False})
    return {"meta": meta, "results": results}


def write_submission(submission: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the submission JSON atomically."""
    return atomic_write_text(path, json.dumps(submission))


def evaluate_detection(result_path: str | os.PathLike, dataroot: str | os.PathLike, version: str,
                       eval_set: str, output_dir: str | os.PathLike, verbose: bool = False,
                       nusc=None, curves_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the devkit's DetectionEval (detection_cvpr_2019) and return its metrics summary.

    With `curves_dir`, the devkit also renders its PR and TP curves (`render_curves`, no example
    samples), and `curves_dir` receives them as PDFs (`summary.pdf`, `<class>_pr.pdf`, `<class>_tp.pdf`,
    `dist_pr_<threshold>.pdf`) with the `metrics_summary.json` / `metrics_details.json` they were drawn
    from (`bevfusion.visualization.summary` draws the car curves from those), each written atomically.

    Returns the devkit's `metrics_summary` dict: `mean_ap`, `nd_score`, `tp_errors`,
    `label_aps` (per class and distance threshold), `mean_dist_aps`, `label_tp_errors`, ...
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.utils.splits import create_splits_scenes

    from bevfusion.datasets.devkit import open_nuscenes
    from bevfusion.datasets.errors import load_json

    nusc = nusc or open_nuscenes(version, dataroot, verbose=verbose)
    # The devkit insists on predictions for every sample of the split. When fewer were run (a
    # subsampled val set), pad the submission and then score only the samples that were run.
    submission = load_json(result_path)
    run = set(submission["results"])
    scenes = set(create_splits_scenes()[eval_set])
    split_tokens = {s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes}
    subset = run != split_tokens
    if subset:
        extra = run - split_tokens
        if extra:
            raise ValueError(f"{len(extra)} predicted samples are not in the {eval_set} split, e.g. {sorted(extra)[0]}")
        submission["results"].update({t: [] for t in split_tokens - run})
        result_path = Path(output_dir) / "results_padded.json"
        write_submission(submission, result_path)
    evaluator = DetectionEval(nusc, config=config_factory("detection_cvpr_2019"),
                              result_path=os.fspath(result_path), eval_set=eval_set,
                              output_dir=os.fspath(output_dir), verbose=verbose)
    if subset:
        from bevfusion.utils.logging import get_logger

        get_logger("evaluation").warning("detection metrics cover %d of the %d %s samples (the ones run)",
                                         len(run), len(split_tokens), eval_set)
        for name in ("gt_boxes", "pred_boxes"):
            full, kept = getattr(evaluator, name), EvalBoxes()
            for token in run:
                kept.add_boxes(token, full[token])
            setattr(evaluator, name, kept)
        evaluator.sample_tokens = evaluator.gt_boxes.sample_tokens
    summary = evaluator.main(plot_examples=0, render_curves=curves_dir is not None)
    if curves_dir is not None:
        _copy_curves(Path(evaluator.plot_dir), Path(output_dir), Path(curves_dir))
    return summary


def _copy_curves(plot_dir: Path, output_dir: Path, curves_dir: Path) -> None:
    """The devkit's plots and the metrics files behind them, into `curves_dir` (atomically, file by file)."""
    from bevfusion.utils.io import atomic_write_bytes

    files = sorted(plot_dir.glob("*.pdf")) + [output_dir / "metrics_summary.json", output_dir / "metrics_details.json"]
    for path in files:
        atomic_write_bytes(curves_dir / path.name, path.read_bytes(), fsync=False)


def summary_table(metrics: Mapping[str, Any]) -> str:
    """mAP, NDS and per-class AP / TP errors as a plain-text table."""
    lines = [f"mAP: {metrics['mean_ap']:.4f}   NDS: {metrics['nd_score']:.4f}",
             f"{'class':<22}{'AP':>8}{'ATE':>8}{'ASE':>8}{'AOE':>8}{'AVE':>8}{'AAE':>8}"]
    for name, ap in metrics["mean_dist_aps"].items():
        tp = metrics["label_tp_errors"][name]
        errs = "".join(f"{tp[k]:>8.3f}" for k in ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err"))
        lines.append(f"{name:<22}{ap:>8.4f}{errs}")
    return "\n".join(lines)

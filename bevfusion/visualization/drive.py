"""A drive from a dataset (and a results file or a checkpoint) to a rerun recording or a live viewer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from bevfusion.utils.logging import get_logger, progress
from bevfusion.visualization.frames import (FrameOptions, MapRasteriser, load_frame, load_results,
                                            select_samples)
from bevfusion.visualization.recording import LogOptions, stream_live, write_rrd

__all__ = ["visualize_drive", "predict_samples"]

log = get_logger("visualization")


def predict_samples(model_cfg: Mapping[str, Any], checkpoint: str | os.PathLike, dataset, indices: Sequence[int],
                    device: str = "cpu", workers: int = 0) -> list[dict[str, Any]]:
    """Run a checkpoint over the samples `indices` of `dataset` (its own pipeline) and return the records
    in the `tools/test.py --out` form (numpy arrays)."""
    import torch

    from bevfusion.datasets.loader import build_dataloader
    from bevfusion.evaluation.runner import run_inference
    from bevfusion.models import build_model
    from bevfusion.models.convert import load_converted, read_checkpoint

    model = build_model(model_cfg, init_weights=False)  # the checkpoint replaces every weight
    ckpt = read_checkpoint(checkpoint)
    report = load_converted(model, ckpt.get("state_dict") or ckpt.get("model"), strict=True)
    log.info("loaded %s (%s)", checkpoint, report)
    model.to(device)
    loader = build_dataloader(torch.utils.data.Subset(dataset, list(indices)), samples_per_gpu=1,
                              workers_per_gpu=workers, shuffle=False)
    records = run_inference(model, loader, device)
    return [{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in records]


def visualize_drive(dataset, *, results: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
                    out: str | os.PathLike | None = None, mode: str = "save", scenes: Sequence[str] | None = None,
                    max_samples: int | None = None, frame_options: FrameOptions | None = None,
                    log_options: LogOptions | None = None, predict=None) -> dict[str, Any]:
    """Record a drive: the samples of `dataset` (NuScenesDataset, or a wrapper with `.dataset`).

    Args:
        results: a results file of `tools/test.py --out` (or its records); only its samples are shown.
            Malformed results, or results of no sample of the dataset, raise before anything is written.
        out: the .rrd to write (mode "save"); written atomically.
        mode: "save", "spawn" (native viewer) or "serve" (gRPC + web viewer; keep the process alive).
        scenes: scene names or tokens to show.
        max_samples: show at most this many samples (the first in time).
        predict: optional callable(indices) → records, run on the chosen samples (checkpoint mode).
    Returns:
        {"path": Path or None, "samples": n, "warnings": n, "stream": the live stream or None}.
    """
    base = getattr(dataset, "dataset", dataset)
    frame_options = frame_options or FrameOptions()
    if mode == "save" and out is None:
        raise ValueError("mode 'save' needs an output path")
    indexed = load_results(results, base) if results is not None else None
    indices, scene_names = select_samples(base, scenes, tokens=list(indexed) if indexed is not None else None,
                                          max_samples=max_samples)
    if not indices:
        raise ValueError(f"no samples to show from {base.ann_file}")
    if predict is not None:
        indexed = load_results(predict(indices), base)
    rasterise = MapRasteriser(base.dataset_root, base.map_classes) if frame_options.gt_maps else None
    camera_names = list(base.get_data_info(indices[0])["camera_names"])
    warnings = 0

    def frames():
        nonlocal warnings
        for i in progress(indices, total=len(indices), desc="visualize"):
            token = base.data_infos[i]["token"]
            frame = load_frame(base, i, indexed.get(token) if indexed is not None else None, frame_options,
                               scene=scene_names.get(i), rasterise_map=rasterise)
            warnings += len(frame.warnings)
            yield frame

    summary: dict[str, Any] = {"path": None, "stream": None}
    if mode == "save":
        summary["path"] = write_rrd(out, frames(), base.map_classes, camera_names, log_options,
                                    recording_name=Path(out).stem)
    elif mode in ("spawn", "serve"):
        summary["stream"] = stream_live(frames(), base.map_classes, camera_names, mode, log_options)
    else:
        raise ValueError(f"mode must be 'save', 'spawn' or 'serve', not {mode!r}")
    summary.update(samples=len(indices), warnings=warnings)
    return summary

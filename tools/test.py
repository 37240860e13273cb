#!/usr/bin/env python3
"""Evaluate a checkpoint: nuScenes detection metrics (mAP, NDS, per-class AP and TP errors) through the
devkit, BEV map IoU, the submission JSON, and/or the raw results.

    tools/test.py CONFIG CKPT --eval bbox map
    torchrun --nproc-per-node 8 tools/test.py CONFIG CKPT --eval bbox      # results gathered on rank 0
    tools/test.py CONFIG CKPT --format-only --jsonfile-prefix submission/  # test split: JSON only
    tools/test.py CONFIG CKPT --eval bbox --drop-cameras all               # robustness: LiDAR only
    tools/test.py CONFIG CKPT --eval bbox --missing-sensors drop           # run on with missing files
    tools/test.py CONFIG CKPT --eval bbox map --summary                    # + summary.png beside the checkpoint

Official checkpoints load directly (sparse-conv weights are converted on the fly).

Sensor dropout: --drop-cameras / --drop-lidar / --max-sweeps leave sensors out on purpose and
--missing-sensors drop runs without files that do not exist (default: error). What was left out is
counted per sample, printed, and written under "dropout" in --metrics-out.

--summary writes one picture of the run (bevfusion.visualization.summary): the training losses of the
`log.jsonl` beside the checkpoint, per-class AP and map IoU, the devkit's car PR curves and a bird's-eye
view of a few samples (LiDAR, GT and predicted boxes, predicted map masks); with --eval bbox the devkit's
PR / TP curves (PDF) go to `pr_curves/` beside it.

Outputs are never written over the checkpoint or the config; an existing file that is not of the kind
written here (a checkpoint given as --out, say) is replaced only with --force.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from bevfusion.utils.cli import UsageError, config_parser, int_at_least, parse_config_args, tool_main
from bevfusion.utils.logging import get_logger

log = get_logger("test")

# devkit eval sets and the dataset version each belongs to (nuscenes.eval.common.loaders.load_gt)
_SPLIT_VERSIONS = {"mini_train": "v1.0-mini", "mini_val": "v1.0-mini", "test": "v1.0-test"}


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _build_parser():
    parser = config_parser(__doc__)
    parser.add_argument("checkpoint", help="our checkpoint or an official one")
    parser.add_argument("--eval", nargs="*", default=[], choices=["bbox", "map"], help="metrics to compute")
    parser.add_argument("--out", help="write the raw per-sample results (pickle of numpy arrays)")
    parser.add_argument("--format-only", action="store_true", help="only write the submission JSON")
    parser.add_argument("--jsonfile-prefix", help="folder for results_nusc.json (default: next to --out)")
    parser.add_argument("--metrics-out", help="also write every metric of --eval to this JSON file")
    parser.add_argument("--eval-set", help="devkit eval_set (default: mini_val for v1.0-mini, else val)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="which data section to run (default: data.test)")
    parser.add_argument("--workers", type=int_at_least(0), default=None,
                        help="data-loader workers (default: config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--summary", nargs="?", const="", default=None, metavar="PNG",
                        help="write the summary picture (default path: summary.png in the folder of --out, else "
                             "of the checkpoint); needs --eval")
    parser.add_argument("--force", action="store_true",
                        help="replace existing output files that are not results of this tool")
    drop = parser.add_argument_group("sensor dropout")
    drop.add_argument("--missing-sensors", choices=["error", "drop"], default=None,
                      help="a camera, LiDAR or sweep file that does not exist: error (default) or drop "
                           "(run without it; counted and reported)")
    drop.add_argument("--drop-cameras", metavar="all|CAM_A,CAM_B",
                      help="leave out all cameras, or the named ones (black images, camera_mask false)")
    drop.add_argument("--drop-lidar", action="store_true", help="leave out the LiDAR (empty point clouds)")
    drop.add_argument("--max-sweeps", type=int_at_least(0), metavar="K",
                      help="load at most the K newest LiDAR sweeps per sample")
    return parser


def _innermost(section: Mapping[str, Any]) -> Mapping[str, Any]:
    while isinstance(section, Mapping) and section.get("type") == "CBGSDataset" and "dataset" in section:
        section = section["dataset"]
    return section


def _dropout_overrides(args, section: Mapping[str, Any]) -> dict[str, Any]:
    """`missing_sensors` / `drop_sensors` for the dataset: the config's, with the command line's on top."""
    inner = _innermost(section)
    out: dict[str, Any] = {}
    if args.missing_sensors is not None:
        out["missing_sensors"] = args.missing_sensors
    base = inner.get("drop_sensors") if isinstance(inner, Mapping) else None
    drop = dict(base or {})
    if args.drop_cameras is not None:
        if args.drop_cameras.strip() == "all":
            drop["cameras"] = "all"
        else:
            names = [n.strip() for n in args.drop_cameras.split(",")]
            if not names or any(not n for n in names):
                raise UsageError(f"--drop-cameras {args.drop_cameras!r}: expected 'all' or camera names separated "
                                 "by commas (CAM_FRONT,CAM_BACK)")
            drop["cameras"] = names
    if args.drop_lidar:
        drop["lidar"] = True
    if args.max_sweeps is not None:
        drop["max_sweeps"] = args.max_sweeps
    if drop and drop != dict(base or {}):
        out["drop_sensors"] = drop
    return out


def check_device(option: str, name: str) -> torch.device:
    """`name` as a torch.device that exists here (UsageError naming `option` otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{option} {name!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {name}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_request(args, cfg) -> None:
    """Everything about the command line that can fail, checked before any data or model is loaded."""
    check_device("--device", args.device)
    if args.split not in cfg.get("data", {}):
        raise UsageError(f"--split {args.split}: the config has no data.{args.split} section")
    heads = (cfg.get("model") or {}).get("heads") or {}
    for metric, head in (("bbox", "object"), ("map", "map")):
        if metric in args.eval and not heads.get(head):
            raise UsageError(f"--eval {metric}: the model has no {head} head (model.heads.{head} is empty)")
    if args.format_only and not heads.get("object"):
        raise UsageError("--format-only: the model has no object head (model.heads.object is empty)")
    if args.eval_set is not None and "bbox" in args.eval:
        from nuscenes.utils.splits import create_splits_scenes

        known = sorted(create_splits_scenes())
        if args.eval_set not in known:
            raise UsageError(f"--eval-set {args.eval_set!r}: not a nuScenes eval set (expected one of "
                             f"{', '.join(known)})")


def _check_outputs(args) -> str | None:
    """Refuse outputs over the inputs or over files of another kind; returns the submission folder."""
    from bevfusion.utils.io import check_writable_output, is_metrics_json, is_results_pickle, is_submission_json

    inputs = [args.checkpoint, args.config]
    if args.out:
        check_writable_output(args.out, option="--out", kind="results pickle", inputs=inputs, force=args.force,
                              accept=is_results_pickle)
        inputs.append(args.out)
    if args.metrics_out:
        check_writable_output(args.metrics_out, option="--metrics-out", kind="metrics JSON", inputs=inputs,
                              force=args.force, accept=is_metrics_json)
        inputs.append(args.metrics_out)
    prefix = args.jsonfile_prefix or (os.path.join(os.path.dirname(os.path.abspath(args.out)), "results")
                                      if args.out else None)
    folder = prefix or ("." if args.format_only else None)  # --format-only alone: the working directory
    if folder and (args.format_only or "bbox" in args.eval):
        option = ("--jsonfile-prefix" if args.jsonfile_prefix else "--out (its results/ folder)" if args.out
                  else "--format-only (results_nusc.json in the working directory)")
        check_writable_output(folder, option=option, kind="submission folder", inputs=inputs, folder=True)
        check_writable_output(os.path.join(folder, "results_nusc.json"), option=option, kind="submission JSON",
                              inputs=inputs, force=args.force, accept=is_submission_json)
    if args.summary is not None:
        from bevfusion.visualization.summary import is_summary_png

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--summary needs matplotlib (pip install matplotlib)") from None
        if not args.summary:
            args.summary = os.path.join(os.path.dirname(os.path.abspath(args.out or args.checkpoint)), "summary.png")
        check_writable_output(args.summary, option="--summary", kind="summary PNG", inputs=inputs, force=args.force,
                              accept=is_summary_png)
        inputs.append(args.summary)
        if "bbox" in args.eval:
            check_writable_output(_curves_dir(args), option="--summary (its pr_curves/ folder)",
                                  kind="PR-curve folder", inputs=inputs, folder=True)
    return prefix


def _curves_dir(args) -> str | None:
    """The devkit's PR-curve folder: `pr_curves/` beside the summary picture (only with --summary and bbox)."""
    if args.summary is None or "bbox" not in args.eval:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(args.summary)), "pr_curves")


def _write_summary(args, records, dataset, metrics: Mapping[str, float]) -> None:
    from bevfusion.visualization.frames import FrameOptions
    from bevfusion.visualization.summary import summary_frames, write_summary

    base = getattr(dataset, "dataset", dataset)
    train_log = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "log.jsonl")
    options = FrameOptions(sweeps_num=3, max_points=40_000, gt_maps=False, images=False)
    frames = summary_frames(dataset, records, count=3, options=options)
    title = f"{os.path.splitext(os.path.basename(args.config))[0]} ({os.path.basename(args.checkpoint)})"
    path = write_summary(args.summary, frames=frames, object_classes=base.object_classes,
                         map_classes=base.map_classes, log_jsonl=train_log if os.path.isfile(train_log) else None,
                         metrics=metrics, pr_curves=_curves_dir(args), score_threshold=options.score_threshold,
                         title=title)
    print(f"summary: {path}")
    if _curves_dir(args):
        print(f"PR curves: {_curves_dir(args)}")


def _check_eval_set_version(eval_set: str | None, base) -> None:
    if eval_set is None or base.version is None:
        return
    expected = _SPLIT_VERSIONS.get(eval_set, "v1.0-trainval")
    if base.version != expected:
        raise UsageError(f"--eval-set {eval_set}: a {expected} split, but {base.ann_file} holds {base.version} "
                         f"samples")


def _read_state(path: str) -> dict[str, torch.Tensor]:
    from bevfusion.engine.checkpoint import check_finite
    from bevfusion.models.convert import read_checkpoint

    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict") or ckpt.get("model")
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: no weights (an empty 'state_dict')")
    check_finite(state, path)
    return state


class DropoutRecorder:
    """Iterates a data loader unchanged and keeps each sample's `metas["dropped"]` record by token."""

    def __init__(self, loader):
        self.loader = loader
        self.records: dict[str, Mapping[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            for meta in batch.get("metas") or []:
                if isinstance(meta, Mapping) and isinstance(meta.get("dropped"), Mapping):
                    self.records[str(meta.get("token"))] = meta["dropped"]
            yield batch

    def gathered(self) -> dict[str, Mapping[str, Any]]:
        """Every rank's records (one per sample token)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dict(self.records)
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self.records)
        merged: dict[str, Mapping[str, Any]] = {}
        for part in parts:
            merged.update(part or {})
        return merged


def dropout_report(records: Mapping[str, Mapping[str, Any]], dataset) -> dict[str, Any]:
    """Aggregate the per-sample dropout records of a run (bevfusion.datasets.dropout)."""
    from bevfusion.datasets.dropout import sum_dropout_counts

    counts = sum_dropout_counts({"dropped": r} for r in records.values())
    cameras = Counter(c for r in records.values() for c in r.get("cameras") or [])
    return {
        "requested": {"missing_sensors": getattr(dataset, "missing_sensors", None),
                      **{k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in (getattr(dataset, "drop_sensors", None) or {}).items()}},
        "samples": len(records),
        "samples_with_dropped_cameras": sum(1 for r in records.values() if r.get("cameras")),
        "cameras_dropped": dict(sorted(cameras.items())),
        "samples_without_lidar": sum(1 for r in records.values() if r.get("lidar")),
        "sweeps_dropped": int(sum(int(r.get("sweeps") or 0) for r in records.values())),
        "missing_files": {"camera": counts["missing_camera_files"], "lidar": counts["missing_lidar_files"],
                          "sweep": counts["missing_sweep_files"]},
        "counts": counts,
    }


def _dropout_active(report: Mapping[str, Any], requested: bool) -> bool:
    return requested or any(report["counts"].values())


def _print_dropout(report: Mapping[str, Any]) -> None:
    cams = ", ".join(f"{k} {v}" for k, v in report["cameras_dropped"].items()) or "none"
    missing = report["missing_files"]
    print(f"dropout: {report['samples']} samples; cameras left out: {cams}; "
          f"samples without LiDAR: {report['samples_without_lidar']}; sweeps not loaded: {report['sweeps_dropped']}; "
          f"missing files: {missing['camera']} camera, {missing['lidar']} LiDAR, {missing['sweep']} sweep")


def _check_predictions(records) -> None:
    """Non-finite predictions (a diverged model) would fail deep in the devkit: name the first sample."""
    for r in records:
        for key in ("boxes_3d", "scores_3d"):
            value = r.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() \
                    and not bool(torch.isfinite(value).all()):
                raise ValueError(f"sample {r['token']}: the model predicted non-finite {key} "
                                 f"({int((~torch.isfinite(value)).sum())} values); the checkpoint is unusable")


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, cfg = parse_config_args(parser, argv)
    if not (args.eval or args.out or args.format_only):
        parser.error("nothing to do: give --eval, --out and/or --format-only")
    if args.metrics_out and not args.eval:
        parser.error("--metrics-out needs --eval")
    if args.summary is not None and not args.eval:
        parser.error("--summary needs --eval (bbox and/or map)")
    _check_request(args, cfg)
    prefix = _check_outputs(args)
    overrides = _dropout_overrides(args, cfg.data[args.split])

    from bevfusion.datasets.builder import build_dataset
    from bevfusion.datasets.loader import build_dataloader
    from bevfusion.evaluation.runner import evaluate_results, gather_results, run_inference
    from bevfusion.models import build_model
    from bevfusion.models.convert import load_converted
    from bevfusion.utils.io import dump_pickle

    rank, world = _init_distributed()
    device = torch.device(args.device)
    state = _read_state(args.checkpoint)
    dataset = build_dataset(cfg.data[args.split], f"data.{args.split}", filter_empty_gt=False, **overrides)
    base = getattr(dataset, "dataset", dataset)
    if "bbox" in args.eval:
        _check_eval_set_version(args.eval_set, base)
    workers = cfg.data.get("workers_per_gpu", 0) if args.workers is None else args.workers
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=workers, shuffle=False, rank=rank,
                              world_size=world)
    model = build_model(cfg.model, init_weights=False)  # the checkpoint replaces every weight
    try:
        report = load_converted(model, state, strict=True)
    except KeyError as exc:
        raise KeyError(f"{args.checkpoint}: {exc.args[0]}") from None
    except ValueError as exc:
        raise ValueError(f"{args.checkpoint}: {exc}") from None
    log.info("loaded %s (%s)", args.checkpoint, report)
    model.to(device)
    amp = torch.float16 if cfg.get("fp16") and device.type == "cuda" else None
    log.info("inference on %s%s, %d samples", device, " with fp16 autocast" if amp else "", len(dataset))
    recorder = DropoutRecorder(loader)
    records = gather_results(run_inference(model, recorder, device, amp), size=len(dataset))
    dropped = recorder.gathered()
    if rank != 0:
        return 0
    dropout = dropout_report(dropped, base)
    requested = (bool(overrides) or getattr(base, "missing_sensors", "error") != "error"
                 or any(v not in (None, False, ()) for v in (getattr(base, "drop_sensors", None) or {}).values()))
    if args.out:
        dump_pickle([{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in records],
                    args.out)
        log.info("results written to %s", args.out)
    if args.format_only:
        from bevfusion.evaluation.nuscenes_det import format_results, write_submission

        _check_predictions(records)
        infos = {i["token"]: i for i in base.data_infos}
        sub = format_results(records, [infos[r["token"]] for r in records], base.object_classes, base.modality)
        path = write_submission(sub, os.path.join(prefix or ".", "results_nusc.json"))
        log.info("submission written to %s", path)
    metrics: dict[str, Any] = {}
    if args.eval:
        if "bbox" in args.eval:
            _check_predictions(records)
        metrics = evaluate_results(records, dataset, args.eval, eval_set=args.eval_set, jsonfile_prefix=prefix,
                                   curves_dir=_curves_dir(args))
        for key, value in metrics.items():
            if "@" not in key or key.endswith("@max"):
                print(f"{key}: {value:.4f}")
    if _dropout_active(dropout, requested):
        _print_dropout(dropout)
    if args.metrics_out:
        from bevfusion.utils.io import atomic_write_text

        out = {k: float(v) for k, v in metrics.items()}
        if _dropout_active(dropout, requested):
            out["dropout"] = dropout
        atomic_write_text(args.metrics_out, json.dumps(out, indent=1))
        log.info("metrics written to %s", args.metrics_out)
    if args.summary is not None:
        _write_summary(args, records, dataset, metrics)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())

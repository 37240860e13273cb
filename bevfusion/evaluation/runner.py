"""Inference over a data loader and the official metrics: used by tools/test.py and in-training eval."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from bevfusion.evaluation.map_seg import MapIoU
from bevfusion.utils.logging import get_logger, progress

__all__ = ["run_inference", "gather_results", "evaluate_results", "move_batch"]

log = get_logger("evaluation")


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (and lists of tensors) to `device`; everything else unchanged."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out


@torch.no_grad()
def run_inference(model: torch.nn.Module, loader, device: torch.device | str = "cpu",
                  amp_dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Predictions for every sample of `loader`, each with its `token`, on CPU, in loader order.

    With `amp_dtype` (torch.float16 / torch.bfloat16) the model runs under autocast on CUDA.
    Ground-truth masks (when the batch has them) are kept beside the predicted ones for the map metric.
    """
    device = torch.device(device)
    model.eval()
    records: list[dict[str, Any]] = []
    for batch in progress(loader, total=len(loader), desc="inference"):
        tokens = [m.get("token") for m in batch["metas"]]
        batch = move_batch(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None and device.type == "cuda"):
            outputs = model(batch)
        for k, out in enumerate(outputs):
            rec = {"token": tokens[k], **{key: v.float().cpu() if v.is_floating_point() else v.cpu()
                                         for key, v in out.items()}}
            if "masks_bev" in out and "gt_masks_bev" in batch:
                rec["gt_masks_bev"] = batch["gt_masks_bev"][k].cpu()
            records.append(rec)
    return records


def gather_results(records: list[dict[str, Any]], size: int | None = None) -> list[dict[str, Any]]:
    """All ranks' records on every rank, deduplicated by token and in the dataset's order.

    A DistributedSampler pads the last ranks with repeated samples, so duplicates are dropped.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    # DistributedSampler deals samples round-robin: interleave the ranks to restore the order.
    merged, seen = [], set()
    for i in range(max(len(p) for p in parts)):
        for p in parts:
            if i < len(p) and p[i]["token"] not in seen:
                seen.add(p[i]["token"])
                merged.append(p[i])
    return merged[:size] if size is not None else merged


def evaluate_results(records: Sequence[Mapping[str, Any]], dataset, metrics: Sequence[str] = ("bbox", "map"),
                     out_dir: str | os.PathLike | None = None, eval_set: str | None = None,
                     jsonfile_prefix: str | os.PathLike | None = None,
                     curves_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """nuScenes detection metrics (`bbox`) and/or map IoU (`map`) for records of `dataset`.

    `dataset` is a NuScenesDataset (or a wrapper exposing one as `.dataset`) that supplies the infos,
    classes, modality, version and root. The submission JSON is written to
    `<jsonfile_prefix>/results_nusc.json` (default: a folder in `out_dir` or a temp dir). With `curves_dir`
    the devkit's PR / TP curves go there (`evaluate_detection`).
    """
    base = getattr(dataset, "dataset", dataset)
    by_token = {info["token"]: info for info in base.data_infos}
    unknown = [r["token"] for r in records if r["token"] not in by_token]
    if unknown:
        raise KeyError(f"results for samples not in {base.ann_file}: {unknown[:5]}")
    out: dict[str, float] = {}
    if "bbox" in metrics:
        from bevfusion.evaluation.nuscenes_det import evaluate_detection, format_results, summary_table, \
            write_submission

        infos = [by_token[r["token"]] for r in records]
        submission = format_results(records, infos, base.object_classes, base.modality)
        folder = Path(jsonfile_prefix or (Path(out_dir) / "results" if out_dir else tempfile.mkdtemp()))
        result_path = write_submission(submission, folder / "results_nusc.json")
        log.info("submission written to %s", result_path)
        version = base.version or "v1.0-trainval"
        eval_set = eval_set or {"v1.0-mini": "mini_val", "v1.0-trainval": "val"}.get(version, "val")
        summary = evaluate_detection(result_path, base.dataset_root, version, eval_set, folder / "eval",
                                     curves_dir=curves_dir)
        log.info("detection results\n%s", summary_table(summary))
        out["object/map"] = float(summary["mean_ap"])
        out["object/nds"] = float(summary["nd_score"])
        for name, ap in summary["mean_dist_aps"].items():
            out[f"object/{name}_ap"] = float(ap)
    if "map" in metrics:
        with_masks = [r for r in records if "masks_bev" in r and "gt_masks_bev" in r]
        if not with_masks:
            raise ValueError("map metric requested but no record has masks_bev and gt_masks_bev")
        metric = MapIoU(base.map_classes)
        for r in with_masks:
            metric.update(r["masks_bev"], r["gt_masks_bev"])
        out.update(metric.compute())
        log.info("map mIoU %.4f (%s)", out["map/mean/iou@max"],
                 ", ".join(f"{c} {out[f'map/{c}/iou@max']:.3f}" for c in base.map_classes))
    return out

#!/usr/bin/env python3
"""Evaluate a checkpoint: nuScenes detection metrics (mAP, NDS, per-class AP and TP errors) through the
devkit, BEV map IoU, the submission JSON, and/or the raw results.

    tools/test.py CONFIG CKPT --eval bbox map
    torchrun --nproc-per-node 8 tools/test.py CONFIG CKPT --eval bbox      # results gathered on rank 0
    tools/test.py CONFIG CKPT --format-only --jsonfile-prefix submission/  # test split: JSON only

Official checkpoints load directly (sparse-conv weights are converted on the fly).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from bevfusion.utils.cli import config_parser, parse_config_args
from bevfusion.utils.logging import get_logger

log = get_logger("test")


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers (default: config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, cfg = parse_config_args(parser, argv)
    if not (args.eval or args.out or args.format_only):
        parser.error("nothing to do: give --eval, --out and/or --format-only")
    if args.metrics_out and not args.eval:
        parser.error("--metrics-out needs --eval")

    from bevfusion.datasets.builder import build_dataset
    from bevfusion.datasets.loader import build_dataloader
    from bevfusion.evaluation.runner import evaluate_results, gather_results, run_inference
    from bevfusion.models import build_model
    from bevfusion.models.convert import load_converted, read_checkpoint
    from bevfusion.utils.io import dump_pickle

    rank, world = _init_distributed()
    device = torch.device(args.device)
    dataset = build_dataset(cfg.data[args.split], f"data.{args.split}", filter_empty_gt=False)
    workers = cfg.data.get("workers_per_gpu", 0) if args.workers is None else args.workers
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=workers, shuffle=False, rank=rank,
                              world_size=world)
    model = build_model(cfg.model)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        report = load_converted(model, ckpt.get("state_dict") or ckpt.get("model"), strict=True)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    log.info("loaded %s (%s)", args.checkpoint, report)
    model.to(device)
    amp = torch.float16 if cfg.get("fp16") and device.type == "cuda" else None
    log.info("inference on %s%s, %d samples", device, " with fp16 autocast" if amp else "", len(dataset))
    records = gather_results(run_inference(model, loader, device, amp), size=len(dataset))
    if rank != 0:
        return 0
    if args.out:
        dump_pickle([{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in records],
                    args.out)
        log.info("results written to %s", args.out)
    prefix = args.jsonfile_prefix or (os.path.join(os.path.dirname(os.path.abspath(args.out)), "results")
                                      if args.out else None)
    if args.format_only:
        from bevfusion.evaluation.nuscenes_det import format_results, write_submission

        base = getattr(dataset, "dataset", dataset)
        infos = {i["token"]: i for i in base.data_infos}
        sub = format_results(records, [infos[r["token"]] for r in records], base.object_classes, base.modality)
        path = write_submission(sub, os.path.join(prefix or ".", "results_nusc.json"))
        log.info("submission written to %s", path)
    if args.eval:
        metrics = evaluate_results(records, dataset, args.eval, eval_set=args.eval_set, jsonfile_prefix=prefix)
        for key, value in metrics.items():
            if "@" not in key or key.endswith("@max"):
                print(f"{key}: {value:.4f}")
        if args.metrics_out:
            from bevfusion.utils.io import atomic_write_text

            atomic_write_text(args.metrics_out, json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))
            log.info("metrics written to %s", args.metrics_out)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())

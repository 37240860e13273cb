#!/usr/bin/env python3
"""Visualize a drive with rerun: LiDAR, the six cameras, GT and predicted boxes, BEV maps, the ego path.

    tools/visualize.py CONFIG --results results.pkl --out drive.rrd     # results of tools/test.py --out
    tools/visualize.py CONFIG --checkpoint model.pth --scenes scene-0103 --spawn
    tools/visualize.py CONFIG --split train --max-samples 40 --serve    # ground truth only
    rerun drive.rrd                                                      # open a saved recording

Without --results or --checkpoint only the ground truth is shown. The recording is never written over
the config, the results or the checkpoint; an existing file that is not a rerun recording is replaced
only with --force.
"""
from __future__ import annotations

import os
import sys
import time

from bevfusion.utils.cli import UsageError, config_parser, float_in, int_at_least, parse_config_args, tool_main
from bevfusion.utils.logging import get_logger

log = get_logger("visualize")


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="run this checkpoint on the shown samples")
    source.add_argument("--results", help="per-sample results written by tools/test.py --out")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"],
                        help="which data section to show (default: data.val)")
    parser.add_argument("--scenes", nargs="+", help="scene names or tokens to show (default: all)")
    parser.add_argument("--max-samples", type=int_at_least(1), help="show at most this many samples")
    sink = parser.add_mutually_exclusive_group(required=True)
    sink.add_argument("--out", help="write a .rrd recording (atomically)")
    sink.add_argument("--spawn", action="store_true", help="stream to a native viewer")
    sink.add_argument("--serve", action="store_true", help="serve to a web viewer until interrupted")
    parser.add_argument("--score-threshold", type=float_in(0, 1), default=0.3,
                        help="hide predictions below this score")
    parser.add_argument("--map-threshold", type=float_in(0, 1), default=0.5,
                        help="predicted map probability threshold")
    parser.add_argument("--sweeps", type=int_at_least(0), default=9, help="LiDAR sweeps added to each keyframe")
    parser.add_argument("--max-points", type=int_at_least(1), help="subsample each cloud to this many points")
    parser.add_argument("--view-range", type=float_in(0, 10000), default=30.0,
                        help="the 3D view shows what lies within this many metres of the LiDAR, which is what it "
                             "frames (default 30; 0 shows everything)")
    parser.add_argument("--color-by", default="height", choices=["height", "intensity"], help="point colours")
    parser.add_argument("--no-images", action="store_true", help="leave the camera images out")
    parser.add_argument("--no-gt-map", action="store_true", help="do not rasterise GT maps from the map files")
    parser.add_argument("--device", default=None, help="device for --checkpoint (default: cuda if available)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file that is not a recording")
    args, cfg = parse_config_args(parser, argv)
    from bevfusion.utils.io import check_writable_output, is_rerun_recording

    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r}: not a device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    for option, path in (("--results", args.results), ("--checkpoint", args.checkpoint)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{option} {path}: file not found")
    if args.out:
        check_writable_output(args.out, option="--out", kind="rerun recording", force=args.force,
                              inputs=[args.config, args.results, args.checkpoint], accept=is_rerun_recording)

    from bevfusion.datasets.builder import build_dataset
    from bevfusion.visualization.drive import predict_samples, visualize_drive
    from bevfusion.visualization.frames import FrameOptions
    from bevfusion.visualization.recording import LogOptions

    if args.split not in cfg.data:
        raise UsageError(f"--split {args.split}: the config has no data.{args.split} section")
    dataset = build_dataset(cfg.data[args.split], f"data.{args.split}", filter_empty_gt=False)
    predict = None
    if args.checkpoint:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

        def predict(indices):
            return predict_samples(cfg.model, args.checkpoint, getattr(dataset, "dataset", dataset), indices, device)

    frame_options = FrameOptions(sweeps_num=args.sweeps, max_points=args.max_points,
                                 score_threshold=args.score_threshold, gt_maps=not args.no_gt_map,
                                 images=not args.no_images)
    log_options = LogOptions(color_by=args.color_by, map_threshold=args.map_threshold,
                             view_range=args.view_range or None)
    mode = "spawn" if args.spawn else "serve" if args.serve else "save"
    summary = visualize_drive(dataset, results=args.results, out=args.out, mode=mode, scenes=args.scenes,
                              max_samples=args.max_samples, frame_options=frame_options,
                              log_options=log_options, predict=predict)
    done = f"{summary['samples']} samples ({summary['warnings']} warnings)"
    if mode == "save":
        log.info("wrote %s: %s", summary["path"], done)
    else:
        log.info("streamed %s", done)
    if mode == "serve":
        log.info("serving; press Ctrl-C to stop")
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

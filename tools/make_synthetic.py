#!/usr/bin/env python3
"""Write a SYNTHETIC drive in the nuScenes on-disk format (v1.0-mini layout up to 10 scenes).

Example:  tools/make_synthetic.py --out data/synthetic --seed 0 [--scenes 10 --samples-per-scene 20
          --image-size 1600 900]

The output is built beside --out and renamed into place when complete. If --out already holds a
synthetic drive made with the same settings, nothing is done; otherwise pass --overwrite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bevfusion.utils.logging import get_logger

log = get_logger("make_synthetic")


def main(argv: list[str] | None = None) -> int:
    from bevfusion.data.synthetic import SyntheticConfig, generate

    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (the nuScenes dataroot)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same data")
    parser.add_argument("--scenes", type=int, default=defaults.num_scenes,
                        help=f"number of scenes (default {defaults.num_scenes}; more than 10 use v1.0-trainval)")
    parser.add_argument("--samples-per-scene", type=int, default=defaults.samples_per_scene,
                        help=f"keyframes (2 Hz) per scene, >= 2 (default {defaults.samples_per_scene})")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=list(defaults.image_size),
                        help="camera image size; intrinsics are scaled from 1600x900 (default 1600 900)")
    parser.add_argument("--lidar-azimuth-steps", type=int, default=defaults.lidar_azimuth_steps,
                        help=f"LiDAR columns per revolution (default {defaults.lidar_azimuth_steps})")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    for name in ("scenes", "samples_per_scene", "lidar_azimuth_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if min(args.image_size) < 16:
        parser.error(f"--image-size must be at least 16 16, got {args.image_size[0]} {args.image_size[1]}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")

    settings = dict(seed=args.seed, num_scenes=args.scenes, samples_per_scene=args.samples_per_scene,
                    image_size=tuple(args.image_size), lidar_azimuth_steps=args.lidar_azimuth_steps)
    marker = args.out / "synthetic.json"
    if args.out.exists() and not args.overwrite:
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())["config"]
            except (ValueError, KeyError):
                done = None
            wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
            if done is not None and all(done.get(k) == v for k, v in wanted.items()):
                log.info("%s already holds a synthetic drive with these settings; nothing to do "
                         "(--overwrite regenerates it)", args.out)
                return 0
            log.error("%s holds a synthetic drive made with other settings; pass --overwrite to replace it",
                      args.out)
        else:
            log.error("%s already exists and is not a synthetic drive; choose another --out", args.out)
        return 2
    try:
        generate(args.out, overwrite=args.overwrite, workers=args.workers,
                 show_progress=False if args.no_progress else None, **settings)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

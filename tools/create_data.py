#!/usr/bin/env python3
"""Write nuScenes info files (and the ground-truth database) in the official format.

Example (the synthetic drive):  tools/create_data.py nuscenes --root-path data/synthetic \
    --version v1.0-mini --out-dir data/synthetic
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bevfusion.utils.logging import get_logger

log = get_logger("create_data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["nuscenes"], help="dataset kind")
    parser.add_argument("--root-path", required=True, type=Path, help="dataset folder (nuScenes layout)")
    parser.add_argument("--version", default="v1.0-trainval",
                        help="v1.0-trainval, v1.0-test or v1.0-mini (default: v1.0-trainval)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the pickles go (default: root path)")
    parser.add_argument("--max-sweeps", type=int, default=10, help="LiDAR sweeps kept per sample (default 10)")
    parser.add_argument("--extra-tag", default="nuscenes", help="file name prefix (default: nuscenes)")
    parser.add_argument("--no-database", action="store_true", help="skip the ground-truth database")
    args = parser.parse_args(argv)
    if args.max_sweeps < 0:
        parser.error(f"--max-sweeps must be >= 0, got {args.max_sweeps}")
    if not args.root_path.is_dir():
        parser.error(f"--root-path {args.root_path} is not a folder")
    if not (args.root_path / args.version).is_dir():
        parser.error(f"{args.root_path / args.version} does not exist: is --version right?")

    from bevfusion.datasets.converters.nuscenes import create_groundtruth_database, create_nuscenes_infos

    out = args.out_dir or args.root_path
    try:
        written = create_nuscenes_infos(args.root_path, args.version, out, args.max_sweeps, args.extra_tag)
        if "train" in written and not args.no_database:
            create_groundtruth_database(args.root_path, written["train"], out, args.extra_tag,
                                        num_sweeps=args.max_sweeps)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

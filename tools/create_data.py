#!/usr/bin/env python3
"""Write nuScenes info files (and the ground-truth database) in the official format.

Example (the synthetic drive):  tools/create_data.py nuscenes --root-path data/synthetic \
    --version v1.0-mini --out-dir data/synthetic

Writes <tag>_infos_<split>.pkl, <tag>_dbinfos_train.pkl and <tag>_gt_database/ in --out-dir. Existing
info files are replaced; any other existing file of those names only with --force.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bevfusion.utils.cli import ToolParser, UsageError, file_tag, int_at_least, tool_main
from bevfusion.utils.logging import get_logger

log = get_logger("create_data")

VERSIONS = ("v1.0-trainval", "v1.0-test", "v1.0-mini")


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("dataset", choices=["nuscenes"], help="dataset kind")
    parser.add_argument("--root-path", required=True, type=Path, help="dataset folder (nuScenes layout)")
    parser.add_argument("--version", default="v1.0-trainval", choices=VERSIONS,
                        help="v1.0-trainval, v1.0-test or v1.0-mini (default: v1.0-trainval)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the pickles go (default: root path)")
    parser.add_argument("--max-sweeps", type=int_at_least(0), default=10,
                        help="LiDAR sweeps kept per sample (default 10)")
    parser.add_argument("--extra-tag", type=file_tag, default="nuscenes",
                        help="file name prefix (default: nuscenes); no path separators")
    parser.add_argument("--no-database", action="store_true", help="skip the ground-truth database")
    parser.add_argument("--force", action="store_true",
                        help="replace existing output files that are not info files of this tool")
    args = parser.parse_args(argv)
    if not args.root_path.is_dir():
        raise UsageError(f"--root-path {args.root_path}: not a folder")
    if not (args.root_path / args.version).is_dir():
        raise UsageError(f"--version {args.version}: {args.root_path / args.version} does not exist "
                         "(is --version right?)")

    from bevfusion.datasets.converters.nuscenes import create_groundtruth_database, create_nuscenes_infos, \
        split_scenes
    from bevfusion.utils.io import check_writable_output, is_info_pickle, is_plain_pickle

    out = args.out_dir or args.root_path
    check_writable_output(out, option="--out-dir", kind="output folder", folder=True)
    splits = list(split_scenes(args.version))
    for split in splits:
        check_writable_output(out / f"{args.extra_tag}_infos_{split}.pkl", option="--out-dir/--extra-tag",
                              kind="info file", force=args.force, accept=is_info_pickle)
    database = "train" in splits and not args.no_database
    if database:
        check_writable_output(out / f"{args.extra_tag}_dbinfos_train.pkl", option="--out-dir/--extra-tag",
                              kind="database info file", force=args.force, accept=is_plain_pickle)
        check_writable_output(out / f"{args.extra_tag}_gt_database", option="--out-dir/--extra-tag",
                              kind="database folder", folder=True)
    written = create_nuscenes_infos(args.root_path, args.version, out, args.max_sweeps, args.extra_tag)
    if database and "train" in written:
        create_groundtruth_database(args.root_path, written["train"], out, args.extra_tag,
                                    num_sweeps=args.max_sweeps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

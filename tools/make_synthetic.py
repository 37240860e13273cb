#!/usr/bin/env python3
"""Write a SYNTHETIC drive in the nuScenes on-disk format (v1.0-mini layout up to 10 scenes).

Example:  tools/make_synthetic.py --out data/synthetic --seed 0 [--scenes 10 --samples-per-scene 20
          --image-size 1600 900]

The output is built beside --out and renamed into place when complete. If --out already holds a
synthetic drive made with the same settings, nothing is done; otherwise pass --overwrite. The
unfinished folder of a killed run is removed by the next run; only folders this tool recorded as its own
(an owner file beside them naming a process of this machine that is gone) are ever removed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from bevfusion.utils.cli import ToolParser, UsageError, int_at_least, tool_main
from bevfusion.utils.logging import get_logger

log = get_logger("make_synthetic")

_OPTIONS = {"num_scenes": "--scenes", "samples_per_scene": "--samples-per-scene",
            "lidar_azimuth_steps": "--lidar-azimuth-steps", "image_size": "--image-size"}


def _owner_file(parent: Path, name: str, pid: int) -> Path:
    """The file that marks `.NAME.partial-PID` (and `.NAME.old-PID`) as this tool's, written before the
    generator starts and removed when it ends."""
    return parent / f".{name}.partial-{pid}.owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove the unfinished output of killed runs for `out`: `.NAME.partial-PID` / `.NAME.old-PID`
    folders whose owner file names this host and a process that no longer runs. Folders without an
    owner file are not ours to judge: they are left alone (and reported). Returns the removed paths."""
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"\.{re.escape(name)}\.(partial|old)-(\d+)")
    for path in sorted(parent.iterdir()):
        m = pattern.fullmatch(path.name)
        if not m or not path.is_dir():
            continue
        pid = int(m.group(2))
        owner = _owner_file(parent, name, pid)
        try:
            record = json.loads(owner.read_text())
        except (OSError, ValueError):
            log.warning("%s looks like an unfinished synthetic drive but has no owner file %s; left alone "
                        "(remove it by hand if it is not in use)", path, owner.name)
            continue
        if record.get("host") != socket.gethostname() or record.get("pid") != pid or _alive(pid):
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:  # e.g. a worker process of the killed run still writing: try again next time
            log.warning("could not remove %s, left by a killed run (pid %d): %s", path, pid, exc)
            continue
        removed.append(path)
        log.info("removed %s, left by a killed run (pid %d)", path, pid)
    for owner in parent.glob(f".{name}.partial-*.owner"):
        m = re.fullmatch(rf"\.{re.escape(name)}\.partial-(\d+)\.owner", owner.name)
        if m and not any((parent / f".{name}.{kind}-{m.group(1)}").exists() for kind in ("partial", "old")):
            try:
                record = json.loads(owner.read_text())
            except (OSError, ValueError):
                continue
            if record.get("host") == socket.gethostname() and not _alive(int(m.group(1))):
                owner.unlink(missing_ok=True)
    return removed


@tool_main
def main(argv: list[str] | None = None) -> int:
    from bevfusion.data.synthetic import SyntheticConfig, generate

    defaults = SyntheticConfig()
    parser = ToolParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (the nuScenes dataroot)")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="random seed (default 0); same seed, same data")
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
    try:
        SyntheticConfig(**settings).validate()
    except ValueError as exc:
        message = str(exc)
        option = next((opt for key, opt in _OPTIONS.items() if message.startswith(key)), None)
        raise UsageError(f"{option}: {message}" if option else message) from None
    out = args.out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is a file, not a folder")
    clean_stale_partials(out)
    marker = out / "synthetic.json"
    if out.exists() and not args.overwrite:
        if marker.is_file():
            try:
                done = json.loads(marker.read_text())["config"]
            except (ValueError, KeyError, TypeError):
                done = None
            wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
            if done is not None and all(done.get(k) == v for k, v in wanted.items()):
                log.info("%s already holds a synthetic drive with these settings; nothing to do "
                         "(--overwrite regenerates it)", args.out)
                return 0
            raise UsageError(f"--out {args.out}: holds a synthetic drive made with other settings; pass "
                             "--overwrite to replace it")
        raise UsageError(f"--out {args.out}: already exists and is not a synthetic drive; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner_file(out.parent, out.name, os.getpid())
    owner.write_text(json.dumps({"tool": "make_synthetic", "host": socket.gethostname(), "pid": os.getpid(),
                                 "out": str(out)}))
    try:
        generate(out, overwrite=args.overwrite, workers=args.workers,
                 show_progress=False if args.no_progress else None, **settings)
    except FileExistsError as exc:  # not a synthetic drive: never replaced
        raise UsageError(f"--out {args.out}: {exc}") from None
    finally:
        owner.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

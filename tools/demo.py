#!/usr/bin/env python3
"""Run the whole chain on the built-in synthetic drive: generate, prepare, train, evaluate, visualize.

Each step is one of the tools in this folder, run as its own process, so the demo does exactly what a
user would type. A step whose output already exists is skipped (use --force to redo everything).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bevfusion.utils.cli import ToolParser, UsageError, tool_main
from bevfusion.utils.logging import get_logger

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
log = get_logger("demo")


@dataclass
class Step:
    name: str
    tool: str
    args: list[str]
    done_marker: Path | None  # the step is skipped when this exists (unless --force)


def build_steps(data: Path, work: Path, config: Path, version: str, overrides: Sequence[str] = ()) -> list[Step]:
    ckpt = work / "latest.pth"
    results = work / "results.pkl"
    # the config reads the drive from here; `overrides` (--set) go to every config-driven step
    root = ["--set", f"dataset_root={data.as_posix().rstrip('/')}/", *overrides]
    return [
        Step("generate the synthetic drive", "make_synthetic.py",
             ["--out", str(data), "--seed", "0"], data / version),
        Step("create info files", "create_data.py",
             ["nuscenes", "--root-path", str(data), "--version", version, "--out-dir", str(data)],
             data / "nuscenes_infos_val.pkl"),
        # no evaluation inside training: the next step evaluates the final checkpoint
        Step("train", "train.py", [str(config), "--work-dir", str(work), "--no-validate", *root], ckpt),
        Step("evaluate", "test.py", [str(config), str(ckpt), "--eval", "bbox", "map", "--out", str(results),
                                     "--metrics-out", str(work / "metrics.json"),
                                     "--summary", str(work / "summary.png"), *root], None),
        Step("visualize", "visualize.py",
             [str(config), "--results", str(results), "--out", str(work / "drive.rrd"), *root], None),
    ]


def final_report(work: Path) -> str:
    """The demo's closing lines: the metrics of the synthetic val split and where everything is."""
    lines = []
    metrics_file = work / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        nan = float("nan")
        lines.append(f"synthetic val: mAP {m.get('object/map', nan):.4f}, NDS {m.get('object/nds', nan):.4f}, "
                     f"car AP {m.get('object/car_ap', nan):.4f}, map mIoU {m.get('map/mean/iou@max', nan):.4f}")
    rrd = work / "drive.rrd"
    for label, path in (("all metrics", metrics_file), ("summary", work / "summary.png"),
                        ("PR curves", work / "pr_curves"), ("checkpoint", work / "latest.pth"),
                        ("results", work / "results.pkl"), ("recording", rrd)):
        if path.exists():
            lines.append(f"  {label + ':':<13} {path}")
    if rrd.exists():
        lines.append(f"  open the recording with: {Path(sys.executable).parent / 'rerun'} {rrd}")
    return "\n".join(lines)


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic",
                        help="where the synthetic drive is written (default: data/synthetic)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "work_dirs" / "demo",
                        help="training outputs, results and the recording (default: work_dirs/demo)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "nuscenes" / "synthetic" / "fusion.yaml",
                        help="the model config trained by the demo")
    parser.add_argument("--version", default="v1.0-mini", help="dataset version written by the generator")
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for the train, evaluate and visualize steps (e.g. max_epochs=4)")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        raise UsageError(f"--config {args.config}: file not found")
    for option, path in (("--data", args.data), ("--work-dir", args.work_dir)):
        if path.exists() and not path.is_dir():
            raise UsageError(f"{option} {path}: exists and is a file, not a folder")

    t0 = time.time()
    steps = build_steps(args.data, args.work_dir, args.config, args.version, args.overrides)
    if args.force:
        steps[0].args.append("--overwrite")  # regenerate even a drive made with the same settings
    for i, step in enumerate(steps, 1):
        if step.done_marker is not None and step.done_marker.exists() and not args.force:
            log.info("[%d/%d] %s: output exists (%s), skipped", i, len(steps), step.name, step.done_marker)
            continue
        cmd = [sys.executable, str(TOOLS / step.tool), *step.args]
        log.info("[%d/%d] %s: %s", i, len(steps), step.name, shlex.join(cmd))
        start = time.time()
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0:
            log.error("step '%s' failed with exit code %d", step.name, proc.returncode)
            return proc.returncode
        log.info("[%d/%d] %s: done in %.0f s", i, len(steps), step.name, time.time() - start)
    log.info("demo finished in %.0f s", time.time() - t0)
    print(final_report(args.work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

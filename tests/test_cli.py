"""The shared tool argument style and `--help` of every tool."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bevfusion.utils.cli import split_dotted_options

REPO = Path(__file__).resolve().parents[1]
LIDAR = REPO / "tests/fixtures/configs/nuscenes/det/transfusion/lidar/voxelnet_0p075.yaml"


def test_split_dotted_options():
    rest, overrides = split_dotted_options([
        "cfg.yaml", "--model.encoders.camera.backbone.init_cfg.checkpoint", "pretrained/swint.pth",
        "--data.samples_per_gpu=2", "--set", "a=1", "b.c=[1, 2]", "--work-dir", "w", "max_epochs=3",
        "+new.key=1", "--set=d=x"])
    assert rest == ["cfg.yaml", "--work-dir", "w"]
    assert overrides == ["model.encoders.camera.backbone.init_cfg.checkpoint=pretrained/swint.pth",
                         "data.samples_per_gpu=2", "a=1", "b.c=[1, 2]", "max_epochs=3", "+new.key=1",
                         "d=x"]


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_print_config_applies_all_override_styles():
    proc = _run("tools/print_config.py", str(LIDAR), "--set", "max_epochs=2", "--optimizer.lr", "3e-4",
                "voxel_size=[0.2,0.2,8]")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["runner"]["max_epochs"] == 2
    assert cfg["optimizer"]["lr"] == pytest.approx(3e-4)
    assert cfg["model"]["heads"]["object"]["bbox_coder"]["voxel_size"] == [0.2, 0.2]


def test_print_config_error_names_the_key():
    proc = _run("tools/print_config.py", str(LIDAR), "--set", "optimizer.lrr=1")
    assert proc.returncode == 2
    assert "optimizer.lrr" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py")))
def test_every_tool_has_help(tool):
    proc = _run(f"tools/{tool}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout

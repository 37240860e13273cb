"""`tools/train.py` and `tools/test.py` as a user runs them, on the device under test (CUDA; BEVFUSION_GPU_TEST_DEVICE
=cpu dry-runs them on the CPU), with the synthetic demo config on the session's tiny synthetic drive, cut to two
training samples (one iteration of two) and two validation samples.

On CUDA the config's defaults apply: fp16 autocast with a dynamic GradScaler in training, fp16 autocast in
inference. The sparse encoder uses one fixed Triton dataflow (`impl=triton`, `dataflow=igemm`): the default
("auto") autotunes each layer on first use, which would spend the short GPU check on kernel compilation.

Converting the drive to info files and loading its map masks needs nuscenes-devkit and shapely; without them the
tests skip, saying which import failed.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import gpu_case as gc

pytestmark = pytest.mark.gpu

TIMEOUT = 300  # seconds per tool run (a cold CUDA start compiles the Triton kernels)


def _require_devkit() -> None:
    missing = []
    for module in ("nuscenes", "nuscenes.map_expansion.map_api", "shapely"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a devkit dependency failing at import time
            missing.append(f"{module} ({type(exc).__name__}: {exc})")
    if missing:
        pytest.skip("the tools tests need nuscenes-devkit and shapely to convert the synthetic drive and load its "
                    "map; not importable: " + "; ".join(missing))


@pytest.fixture(scope="module")
def drive(request, tmp_path_factory):
    """The device, the synthetic drive and info files with two samples per split (with GT boxes)."""
    device = gc.device_under_test()
    _require_devkit()
    root, _, written, _, _ = request.getfixturevalue("converted")
    from bevfusion.utils.io import dump_pickle, load_pickle

    out = tmp_path_factory.mktemp("gpu_tools")
    subset = {}
    for split in ("train", "val"):
        data = load_pickle(written[split])
        infos = [info for info in data["infos"] if len(info["gt_boxes"])][:2]
        assert len(infos) == 2, f"{written[split]}: fewer than two samples with boxes"
        subset[split] = out / f"nuscenes_infos_{split}_2.pkl"
        dump_pickle({"infos": infos, "metadata": data["metadata"]}, subset[split])
    return SimpleNamespace(device=device, root=root, infos=subset, out=out)


def _env() -> dict:
    env = {**os.environ, "BEVFUSION_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(gc.REPO), env.get("PYTHONPATH", "")])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(gc.REPO / "tools" / tool), *args], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=gc.REPO)
    assert proc.returncode == 0, f"tools/{tool} exited with {proc.returncode}:\n{proc.stderr[-6000:]}"
    return proc


def _overrides(drive) -> list[str]:
    return [f"dataset_root={drive.root}/", "data.workers_per_gpu=0"] + [
        f"+model.encoders.lidar.backbone.{key}={value}" for key, value in gc.sparse_impl_for(drive.device).items()]


@pytest.fixture(scope="module")
def trained(drive):
    """tools/train.py for one iteration (2 samples, 2 per batch, 1 epoch) on the device under test."""
    work = drive.out / "work"
    proc = _run("train.py", str(gc.CONFIG), "--work-dir", str(work), "--device", drive.device.type, "--no-validate",
                "--set", *_overrides(drive), f"data.train.ann_file={drive.infos['train']}",
                "data.samples_per_gpu=2", "max_epochs=1", "log_config.interval=1")
    return SimpleNamespace(work=work, proc=proc)


def test_train_tool_one_iteration(drive, trained):
    work = trained.work
    assert (work / "epoch_1.pth").is_file() and (work / "latest.pth").is_file(), sorted(os.listdir(work))
    log = (work / "train.log").read_text()
    cuda = drive.device.type == "cuda"
    assert f"device {drive.device.type}" in log, log[-3000:]
    # the config's `fp16` section: fp16 autocast and a GradScaler on CUDA, full precision on the CPU
    assert ("amp fp16" if cuda else "amp off") in log, log[-3000:]
    assert "Epoch [1/1][1/1]" in log and "training done: 1 epochs, 1 iterations" in log, log[-3000:]
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["mode"] == "train"]
    assert len(train) == 1 and train[0]["global_iter"] == 1
    rec = train[0]
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert any(k.startswith("loss/object/") for k in rec) and any(k.startswith("loss/map/") for k in rec)
    if cuda:
        assert rec["memory"] > 0 and rec["loss_scale"] > 0
    from bevfusion.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(work / "epoch_1.pth")
    assert ckpt["meta"]["iter"] == 1
    assert (ckpt["scaler"] is not None) == cuda
    for key, value in ckpt["state_dict"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_test_tool_on_the_trained_checkpoint(drive, trained):
    out = drive.out / "results.pkl"
    metrics_file = drive.out / "metrics.json"
    proc = _run("test.py", str(gc.CONFIG), str(trained.work / "epoch_1.pth"), "--device", drive.device.type,
                "--eval", "map", "--out", str(out), "--metrics-out", str(metrics_file),
                "--set", *_overrides(drive), f"data.test.ann_file={drive.infos['val']}")
    cuda = drive.device.type == "cuda"
    assert f"inference on {drive.device.type}" in proc.stderr, proc.stderr[-3000:]
    assert ("with fp16 autocast" in proc.stderr) == cuda, proc.stderr[-3000:]
    from bevfusion.utils.io import load_pickle

    records = load_pickle(out)
    assert len(records) == 2
    n_classes = len(gc.load_case_config().map_classes)
    for r in records:
        assert r["boxes_3d"].ndim == 2 and r["boxes_3d"].shape[1] == 9 and len(r["boxes_3d"]) > 0
        assert len(r["scores_3d"]) == len(r["labels_3d"]) == len(r["boxes_3d"])
        for key in ("boxes_3d", "scores_3d", "masks_bev"):
            assert torch.isfinite(torch.as_tensor(r[key])).all(), key
        assert r["masks_bev"].shape == r["gt_masks_bev"].shape == (n_classes, 100, 100)
        assert 0 <= float(r["masks_bev"].min()) and float(r["masks_bev"].max()) <= 1
    metrics = json.loads(metrics_file.read_text())
    assert 0 <= metrics["map/mean/iou@max"] <= 1
    assert f"map/mean/iou@max: {metrics['map/mean/iou@max']:.4f}" in proc.stdout

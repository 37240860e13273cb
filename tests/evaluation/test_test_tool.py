"""`tools/test.py` end to end on the session's small synthetic drive: results pickle, submission,
metrics printed and written with --metrics-out, and map IoU recomputed here from the pickle."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes")

from bevfusion.config import load_config  # noqa: E402
from bevfusion.models import build_model  # noqa: E402
from bevfusion.utils.io import load_pickle  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "nuscenes" / "synthetic" / "fusion.yaml"
THRESHOLDS = [0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65]  # the official map-IoU thresholds


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_test_tool_writes_results_submission_and_metrics(converted, tmp_path, capsys):
    root, _, written, _, _ = converted
    overrides = [f"dataset_root={root}/", f"data.test.ann_file={written['val']}", "data.workers_per_gpu=0"]
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": build_model(load_config(CONFIG, overrides).model).state_dict()}, ckpt)
    out, metrics_file = tmp_path / "results.pkl", tmp_path / "metrics.json"
    rc = _tool("test").main([str(CONFIG), str(ckpt), "--eval", "bbox", "map", "--out", str(out),
                             "--metrics-out", str(metrics_file), "--summary", "--set", *overrides])
    assert rc == 0
    # --summary: summary.png beside --out, the devkit's PR curves (and the metrics behind them) beside it
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("car_pr.pdf", "summary.pdf", "metrics_details.json", "metrics_summary.json"):
        assert (tmp_path / "pr_curves" / name).is_file(), name
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines()
                   if line.startswith(("object/", "map/")))
    metrics = json.loads(metrics_file.read_text())
    assert {"object/map", "object/nds", "object/car_ap", "map/mean/iou@max"} <= set(metrics)
    for key, text in printed.items():
        assert float(text) == pytest.approx(metrics[key], abs=5e-5), key
    sub = json.loads((tmp_path / "results" / "results_nusc.json").read_text())
    records = load_pickle(out)
    assert sorted(sub["results"]) == sorted(r["token"] for r in records) and len(records) == 4

    # map IoU from the pickled probabilities and labels: per class and threshold, intersections and
    # unions summed over the samples; the best threshold per class; the mean over classes
    classes = load_config(CONFIG, overrides).map_classes
    pred = np.stack([r["masks_bev"] for r in records]).astype(np.float64)
    gt = np.stack([r["gt_masks_bev"] for r in records]).astype(bool)
    assert pred.shape == gt.shape == (4, len(classes), 100, 100)
    best = []
    for c, name in enumerate(classes):
        ious = []
        for t in THRESHOLDS:
            p = pred[:, c] >= t
            union = (p | gt[:, c]).sum()
            ious.append((p & gt[:, c]).sum() / union if union else 0.0)
            assert metrics[f"map/{name}/iou@{t:.2f}"] == pytest.approx(ious[-1], abs=1e-6), (name, t)
        best.append(max(ious))
        assert metrics[f"map/{name}/iou@max"] == pytest.approx(best[-1], abs=1e-6), name
    assert metrics["map/mean/iou@max"] == pytest.approx(np.mean(best), abs=1e-6)


def test_metrics_out_needs_eval(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tool("test").main([str(CONFIG), str(tmp_path / "x.pth"), "--out", str(tmp_path / "r.pkl"),
                            "--metrics-out", str(tmp_path / "m.json")])
    assert "--metrics-out needs --eval" in capsys.readouterr().err

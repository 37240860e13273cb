"""Submission formatting against the devkit's Box transforms and its prediction loader."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nuscenes")
from nuscenes.eval.common.loaders import load_prediction  # noqa: E402
from nuscenes.eval.detection.data_classes import DetectionBox  # noqa: E402
from nuscenes.utils.data_classes import Box  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

from bevfusion.datasets.nuscenes import OBJECT_CLASSES  # noqa: E402
from bevfusion.evaluation.nuscenes_det import format_results, write_submission  # noqa: E402

INFO = {"token": "tok0", "lidar2ego_translation": [0.94, 0.0, 1.84],
        "lidar2ego_rotation": list(Quaternion(axis=[0, 0, 1], angle=np.pi / 2).elements),
        "ego2global_translation": [600.0, 1640.0, 0.0],
        "ego2global_rotation": list(Quaternion(axis=[0, 0, 1], angle=0.7).elements)}


def test_boxes_match_the_devkit_transform_chain():
    boxes = np.array([[10.0, 5.0, -1.0, 4.5, 1.9, 1.6, 0.3, 2.0, 0.5],   # car, moving
                      [-3.0, 20.0, -0.5, 0.8, 0.7, 1.8, -2.0, 0.0, 0.0],  # pedestrian, standing
                      [45.0, 0.0, -1.0, 0.4, 0.4, 1.0, 0.0, 0.0, 0.0]])   # cone beyond its 30 m range
    pred = {"boxes_3d": boxes, "scores_3d": np.array([0.5, 0.9, 0.8]), "labels_3d": np.array([0, 8, 9])}
    sub = format_results([pred], [INFO], OBJECT_CLASSES)
    recs = sub["results"]["tok0"]
    assert [r["detection_name"] for r in recs] == ["pedestrian", "car"]  # by score, cone dropped
    for rec, b in zip(recs, boxes[[1, 0]]):
        ref = Box(b[:3], [b[4], b[3], b[5]], Quaternion(axis=[0, 0, 1], angle=b[6]), velocity=(b[7], b[8], 0.0))
        ref.rotate(Quaternion(INFO["lidar2ego_rotation"]))
        ref.translate(np.array(INFO["lidar2ego_translation"]))
        ref.rotate(Quaternion(INFO["ego2global_rotation"]))
        ref.translate(np.array(INFO["ego2global_translation"]))
        np.testing.assert_allclose(rec["translation"], ref.center, atol=1e-9)
        np.testing.assert_allclose(rec["size"], ref.wlh, atol=1e-12)
        q = Quaternion(rec["rotation"])
        assert abs(abs(np.dot(q.elements, ref.orientation.elements)) - 1) < 1e-9
        np.testing.assert_allclose(rec["velocity"], ref.velocity[:2], atol=1e-9)
    assert recs[0]["attribute_name"] == "pedestrian.standing" and recs[1]["attribute_name"] == "vehicle.moving"


def test_submission_loads_in_the_devkit(tmp_path):
    rng = np.random.default_rng(0)
    n = 600  # more than the 500 the format allows
    boxes = np.c_[rng.uniform(-20, 20, (n, 2)), rng.uniform(-2, 0, n), rng.uniform(0.5, 5, (n, 3)),
                  rng.uniform(-3, 3, n), rng.normal(size=(n, 2))]
    pred = {"boxes_3d": boxes, "scores_3d": rng.uniform(0, 1, n), "labels_3d": rng.integers(0, 10, n)}
    sub = format_results([pred], [INFO], OBJECT_CLASSES)
    assert len(sub["results"]["tok0"]) == 500
    path = write_submission(sub, tmp_path / "results_nusc.json")
    boxes_loaded, meta = load_prediction(str(path), 500, DetectionBox, verbose=False)
    assert boxes_loaded.sample_tokens == ["tok0"] and len(boxes_loaded["tok0"]) == 500
    assert meta == json.loads(path.read_text())["meta"]
    with pytest.raises(ValueError, match="2 predictions for 1 samples"):
        format_results([pred, pred], [INFO], OBJECT_CLASSES)


@pytest.mark.parametrize("subset", [False, True])
def test_ground_truth_through_our_chain_scores_perfectly(converted, tmp_path, subset):
    """Info file → dataset (internal boxes) → submission → devkit DetectionEval: mAP and NDS ~ 1."""
    from bevfusion.datasets.nuscenes import NuScenesDataset
    from bevfusion.evaluation.nuscenes_det import evaluate_detection

    root, _, written, _, nusc = converted
    ds = NuScenesDataset(root, written["val"], pipeline=[], test_mode=True)
    indices = list(range(len(ds)))[: (2 if subset else None)]
    preds, infos = [], []
    for i in indices:
        ann = ds.get_ann_info(i)
        keep = ann["gt_labels_3d"] >= 0
        preds.append({"boxes_3d": ann["gt_bboxes_3d"][keep], "scores_3d": np.ones(keep.sum()),
                      "labels_3d": ann["gt_labels_3d"][keep]})
        infos.append(ds.data_infos[i])
    path = write_submission(format_results(preds, infos, OBJECT_CLASSES), tmp_path / "results_nusc.json")
    metrics = evaluate_detection(path, root, "v1.0-mini", "mini_val", tmp_path / "eval", nusc=nusc)
    if not subset:
        assert metrics["mean_ap"] > 0.99 and metrics["nd_score"] > 0.97
    else:
        # Classes with no ground truth in range in the scored samples get AP 0 in the devkit's mean;
        # every other class must be perfect.
        aps = metrics["mean_dist_aps"]
        assert all(ap > 0.99 or ap == 0 for ap in aps.values())
        perfect = sum(ap > 0.99 for ap in aps.values())
        assert perfect >= 3 and metrics["mean_ap"] == pytest.approx(perfect / 10, abs=0.01)

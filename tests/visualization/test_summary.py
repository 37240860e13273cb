"""The summary picture: written as a PNG, panels without input say so, and the bird's-eye panel puts
boxes and map masks where the geometry says.

Expected pixel positions are computed here by hand from the panel's documented extent (BEV_XBOUND /
BEV_YBOUND of the ego frame, forward up, left on the left) and the figure size, not from the drawing code.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from bevfusion.visualization.colors import class_color  # noqa: E402
from bevfusion.visualization.frames import BEV_XBOUND, BEV_YBOUND, Frame  # noqa: E402
from bevfusion.visualization.summary import (EGO_COLOR, MAP_ALPHA, PNG_SIGNATURE, bev_figure,  # noqa: E402
                                             best_map_thresholds, read_training_log, summary_figure,
                                             write_summary)

SIZE = 400  # pixels of the square test panel
MAP = ["drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "divider"]
OBJ = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle", "pedestrian",
       "traffic_cone"]
# nuScenes' LIDAR_TOP: x to the ego's right, y forward (a -90 deg rotation about z)
NUSCENES_RIG = np.array([[0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def make_frame(gt=(), pred=(), scores=None, names=None, masks=None, points=None, lidar2ego=None, index=0):
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 9)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 9)
    return Frame(index=index, token=f"token{index:04d}", timestamp_us=0, scene="scene-test",
                 lidar2ego=np.eye(4) if lidar2ego is None else lidar2ego, ego2global=np.eye(4), points=points,
                 cameras=[], gt_boxes=gt, gt_names=["car"] * len(gt), pred_boxes=pred,
                 pred_scores=np.ones(len(pred)) if scores is None else np.asarray(scores, dtype=np.float64),
                 pred_names=names or ["car"] * len(pred), pred_masks=masks)


def box(x, y, dx=4.0, dy=2.0, yaw=0.0):
    return [x, y, -1.0, dx, dy, 1.5, yaw, 0.0, 0.0]


def render(frame, **kwargs) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 pixels of the bare panel (no rings, labels or title), row 0 at the top."""
    fig, _ = bev_figure(frame, MAP, size_px=SIZE, rings=False, labels=False, title=False, **kwargs)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


def to_pixel(x, y):
    """Ego (x, y) → (row, col) in the SIZE x SIZE panel: x up over BEV_XBOUND, y to the left over BEV_YBOUND."""
    (x0, x1), (y0, y1) = BEV_XBOUND[:2], BEV_YBOUND[:2]
    return (x1 - x) / (x1 - x0) * SIZE, (y1 - y) / (y1 - y0) * SIZE


def changed(a, b, tol=60):
    return np.abs(a.astype(np.int32) - b.astype(np.int32)).max(axis=2) > tol


@pytest.fixture(scope="module")
def empty():
    return render(make_frame())


def ego_centre(pixels):
    rgb = np.array([int(EGO_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    rows, cols = np.nonzero(np.abs(pixels.astype(np.int32) - rgb).max(axis=2) < 30)
    assert len(rows) > 10, "no ego marker drawn"
    return rows.mean(), cols.mean()


def footprint(pixels, empty, tol=60):
    rows, cols = np.nonzero(changed(pixels, empty, tol))
    assert len(rows), "nothing drawn"
    return rows, cols


# ---------------------------------------------------------------------------------------------------
# the bird's-eye panel


def test_gt_box_outline_lands_on_the_computed_pixels(empty):
    pixels = render(make_frame(gt=[box(20.0, 10.0)]))  # 4 m x 2 m at x=20 (ahead), y=10 (left), yaw 0
    rows, cols = footprint(pixels, empty)
    top, left = to_pixel(22.0, 11.0)
    bottom, right = to_pixel(18.0, 9.0)
    assert (top, bottom, left, right) == pytest.approx((112, 128, 156, 164))  # the hand computation itself
    assert rows.min() == pytest.approx(top, abs=2) and rows.max() == pytest.approx(bottom, abs=2)
    assert cols.min() == pytest.approx(left, abs=2) and cols.max() == pytest.approx(right, abs=2)
    # an outline: each edge has ink, the inside (a GT box has no heading tick) is empty
    mask = changed(pixels, empty)
    r0, r1, c0, c1 = (int(round(v)) for v in (top, bottom, left, right))
    for edge in (mask[r0 - 1:r0 + 2, c0:c1 + 1], mask[r1 - 1:r1 + 2, c0:c1 + 1],
                 mask[r0:r1 + 1, c0 - 1:c0 + 2], mask[r0:r1 + 1, c1 - 1:c1 + 2]):
        assert edge.any(axis=0 if edge.shape[0] == 3 else 1).mean() > 0.4  # dashed: ink along much of it
    assert not mask[r0 + 3:r1 - 2, c0 + 3:c1 - 2].any()
    # GT is drawn in a neutral dark grey/black
    ink = pixels[mask]
    darkest = ink[ink.sum(axis=1).argmin()]
    assert darkest.max() < 90 and np.ptp(darkest) < 20


@pytest.mark.parametrize("rig", ["identity", "nuscenes"])
def test_yaw_turns_the_footprint(empty, rig):
    if rig == "identity":
        frame = make_frame(gt=[box(20.0, 10.0, yaw=math.pi / 2)])
    else:  # LiDAR yaw 0 is along its +x, the ego's right: the same footprint as ego yaw pi/2 at ego (20, 10)
        frame = make_frame(gt=[box(-10.0, 20.0, yaw=0.0)], lidar2ego=NUSCENES_RIG)
    rows, cols = footprint(render(frame), empty)
    top, left = to_pixel(21.0, 12.0)  # length now along y
    bottom, right = to_pixel(19.0, 8.0)
    assert rows.min() == pytest.approx(top, abs=2) and rows.max() == pytest.approx(bottom, abs=2)
    assert cols.min() == pytest.approx(left, abs=2) and cols.max() == pytest.approx(right, abs=2)


@pytest.mark.parametrize("rig", ["identity", "nuscenes"])
def test_forward_is_up_and_left_is_left(empty, rig):
    ego_r, ego_c = ego_centre(empty)
    assert (ego_r, ego_c) == pytest.approx(to_pixel(0.0, 0.0), abs=8)
    if rig == "identity":
        l2e, ahead, left = None, (30.0, 0.0), (0.0, 30.0)
    else:  # the LiDAR's +y is forward and its -x is the ego's left
        l2e, ahead, left = NUSCENES_RIG, (0.0, 30.0), (-30.0, 0.0)
    rows, cols = footprint(render(make_frame(gt=[box(*ahead, 2.0, 2.0)], lidar2ego=l2e)), empty)
    assert rows.mean() == pytest.approx(to_pixel(30.0, 0.0)[0], abs=2) and rows.mean() < ego_r - 100
    assert cols.mean() == pytest.approx(ego_c, abs=3)
    rows, cols = footprint(render(make_frame(gt=[box(*left, 2.0, 2.0)], lidar2ego=l2e)), empty)
    assert cols.mean() == pytest.approx(to_pixel(0.0, 30.0)[1], abs=2) and cols.mean() < ego_c - 100
    assert rows.mean() == pytest.approx(ego_r, abs=3)


@pytest.mark.parametrize("yaw, forward", [(0.0, True), (math.pi, False)])
def test_prediction_in_class_colour_with_heading_tick(empty, yaw, forward):
    pixels = render(make_frame(pred=[box(20.0, -10.0, yaw=yaw)], names=["pedestrian"]))
    mask = changed(pixels, empty)
    top, col = to_pixel(22.0, -10.0)
    centre = to_pixel(20.0, -10.0)[0]
    bottom = to_pixel(18.0, -10.0)[0]
    c = int(round(col))
    # inside the footprint only the tick: from the centre to the front edge along the box's axis
    front_half = mask[int(top) + 3:int(centre) - 1, c - 2:c + 3].any(axis=1).mean()
    rear_half = mask[int(centre) + 2:int(bottom) - 2, c - 2:c + 3].any(axis=1).mean()
    assert (front_half, rear_half) == ((1.0, 0.0) if forward else (0.0, 1.0))
    want = np.array(class_color("pedestrian"))
    assert (np.abs(pixels[mask].astype(np.int32) - want).max(axis=1) < 25).sum() > 20


def test_score_threshold_hides_low_predictions(empty):
    frame = make_frame(pred=[box(20.0, -10.0), box(-20.0, 10.0)], scores=[0.9, 0.1])
    rows, _ = footprint(render(frame, score_threshold=0.3), empty)
    assert rows.max() < SIZE / 2  # only the box ahead (score 0.9) is drawn


@pytest.mark.parametrize("rig", ["identity", "nuscenes"])
def test_predicted_map_mask_is_tinted_where_the_grid_says(empty, rig):
    # masks (C, X, Y) over BEV_XBOUND x BEV_YBOUND of the LiDAR frame at 1 m cells (the synthetic config's)
    masks = np.zeros((len(MAP), 100, 100), dtype=np.float32)
    walkway = MAP.index("walkway")
    if rig == "identity":  # LiDAR = ego: x in [20, 30), y in [-40, -30)
        masks[walkway, 70:80, 10:20] = 0.9
        l2e = None
    else:  # LiDAR x in [-40, -30) is the ego's y in (30, 40], LiDAR y in [20, 30) the ego's x
        masks[walkway, 10:20, 70:80] = 0.9
        l2e = NUSCENES_RIG
    masks[MAP.index("divider")] = 0.2  # below the threshold everywhere
    pixels = render(make_frame(masks=masks, lidar2ego=l2e))
    ego_y = (-40.0, -30.0) if rig == "identity" else (30.0, 40.0)
    r0, c0 = to_pixel(30.0, ego_y[1])
    r1, c1 = to_pixel(20.0, ego_y[0])
    expected = np.round(255 * (1 - MAP_ALPHA) + np.array(class_color("walkway")) * MAP_ALPHA)
    inside = pixels[int(r0) + 2:int(r1) - 2, int(c0) + 2:int(c1) - 2].reshape(-1, 3)
    assert np.abs(inside.astype(np.int32) - expected).max() <= 3
    mask = changed(pixels, empty, tol=10)
    rows, cols = np.nonzero(mask)
    assert rows.min() == pytest.approx(r0, abs=1.5) and rows.max() == pytest.approx(r1, abs=1.5)
    assert cols.min() == pytest.approx(c0, abs=1.5) and cols.max() == pytest.approx(c1, abs=1.5)


def test_points_are_drawn_in_the_ego_frame(empty):
    pts = np.array([[0.0, 30.0, -1.5, 10.0]] * 5)  # LiDAR forward on the nuScenes rig
    rows, cols = footprint(render(make_frame(points=pts, lidar2ego=NUSCENES_RIG), point_size=30), empty, tol=20)
    assert (rows.mean(), cols.mean()) == pytest.approx(to_pixel(30.0, 0.0), abs=2)


# ---------------------------------------------------------------------------------------------------
# the whole picture


def fake_log(path, n=50):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(1, n + 1):
            loss = 3.0 * math.exp(-i / 20) + 0.1 * rng.uniform()
            rec = {"mode": "train", "epoch": 1, "iter": i, "global_iter": i, "lr": 1e-3,
                   "loss/object/loss_heatmap": 0.6 * loss, "loss/object/layer_-1_loss_cls": 0.4 * loss,
                   **{f"loss/map/{c}/focal": 0.1 * loss for c in MAP}, "stats/object/matched_ious": 0.2,
                   "loss": 1.6 * loss, "grad_norm": 2.0}
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"mode": "val", "epoch": 1, "iter": n, "object/map": 0.1}) + "\n")
        f.write(json.dumps({"mode": "train", "global_iter": 10, "loss": 99.0}) + "\n")  # a resumed run's repeat
        f.write('{"mode": "train", "global_it')  # killed mid-write


def fake_metrics():
    rng = np.random.default_rng(1)
    out = {"object/map": 0.3, "object/nds": 0.4, **{f"object/{c}_ap": float(rng.uniform()) for c in OBJ},
           **{f"map/{c}/iou@max": float(rng.uniform()) for c in MAP}, "map/mean/iou@max": 0.5}
    out["dropout"] = {"samples": 4}  # --metrics-out may carry the dropout report: not a number, ignored
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_training_log_columns(tmp_path):
    fake_log(tmp_path / "log.jsonl")
    cols = read_training_log(tmp_path / "log.jsonl")
    assert cols["iter"].tolist() == list(range(1, 51))
    assert cols["loss"][9] == 99.0  # the later record of iteration 10 wins
    assert set(cols) == {"iter", "loss", "loss/object/loss_heatmap", "loss/object/layer_-1_loss_cls",
                         *[f"loss/map/{c}/focal" for c in MAP]}
    assert np.isnan(cols["loss/object/loss_heatmap"][9])  # that record had no terms
    assert cols["loss/object/loss_heatmap"][0] == pytest.approx(0.6 / 1.6 * cols["loss"][0])


def test_best_map_thresholds():
    thresholds = [0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65]
    rng = np.random.default_rng(2)
    metrics, want = {}, {}
    for name in MAP[:4]:
        ious = rng.uniform(0, 1, len(thresholds))
        metrics.update({f"map/{name}/iou@{t:.2f}": float(v) for t, v in zip(thresholds, ious)})
        metrics[f"map/{name}/iou@max"] = float(ious.max())
        want[name] = thresholds[int(np.argmax(ious))]
    assert best_map_thresholds(metrics, MAP) == want  # classes without metrics are left out


def test_write_summary_png(tmp_path):
    fake_log(tmp_path / "log.jsonl")
    frames = [make_frame(gt=[box(20.0, 10.0)], pred=[box(20.5, 10.0)], scores=[0.8], index=i,
                         points=np.random.default_rng(i).uniform(-40, 40, (500, 4)),
                         masks=np.random.default_rng(i).uniform(0, 1, (len(MAP), 100, 100)).astype(np.float32),
                         lidar2ego=NUSCENES_RIG) for i in range(2)]
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps(fake_metrics()))
    out = write_summary(tmp_path / "sub" / "summary.png", frames=frames, object_classes=OBJ, map_classes=MAP,
                        log_jsonl=tmp_path / "log.jsonl", metrics=metrics_file, score_threshold=0.3, title="test",
                        dpi=50)
    assert out == tmp_path / "sub" / "summary.png"
    w, h = png_size(out)
    assert w == 1000 and 400 < h < 1000  # 20 in wide at 50 dpi, one row of metrics and one of BEV panels
    assert out.stat().st_size > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["summary.png"]  # no temp file left behind


def test_missing_inputs_become_notes(tmp_path):
    fig = summary_figure(object_classes=OBJ, map_classes=MAP, log_jsonl=tmp_path / "missing.jsonl",
                         pr_curves=tmp_path)
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    for text in ("no training log", "no detection metrics", "no map metrics", "no PR curves"):
        assert text in notes
    assert len(fig.axes) == 4  # no BEV row without frames
    # a picture is written all the same
    out = write_summary(tmp_path / "empty.png", dpi=30)
    assert png_size(out)[0] == 600


def test_summary_frames_of_the_synthetic_drive(viz_infos, tmp_path):
    from bevfusion.datasets.nuscenes import NuScenesDataset
    from bevfusion.visualization.summary import summary_frames

    root, written = viz_infos
    dataset = NuScenesDataset(root, written["val"])
    records = [{"token": info["token"], "boxes_3d": dataset.get_ann_info(i)["gt_bboxes_3d"],
                "scores_3d": np.linspace(0, 1, len(dataset.get_ann_info(i)["gt_bboxes_3d"])),
                "labels_3d": np.zeros(len(dataset.get_ann_info(i)["gt_bboxes_3d"]), dtype=np.int64)}
               for i, info in enumerate(dataset.data_infos)]
    n = len(dataset)
    frames = summary_frames(dataset, records, count=3)
    assert [f.index for f in frames] == sorted({int(round(p)) for p in np.linspace(0, n - 1, 3)})
    for f in frames:
        gt = dataset.get_ann_info(f.index)["gt_bboxes_3d"]
        np.testing.assert_allclose(f.gt_boxes[:, :7], gt[:, :7])
        assert (f.pred_scores >= 0.3).all() and len(f.pred_boxes) < len(gt)  # the recording's threshold
        assert f.points is not None and len(f.points) <= 40_000
    out = write_summary(tmp_path / "s.png", frames=frames, object_classes=dataset.object_classes,
                        map_classes=dataset.map_classes, dpi=40)
    assert png_size(out)[0] == 800

"""Drive recordings of the synthetic drive, read back with rerun's dataframe API.

The expected values come from the dataset and our own geometry (box corners, K·[R|t]), not from the
recording code; the recording is written in rerun's strict mode, so any logging error raises.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rr = pytest.importorskip("rerun")
pytest.importorskip("rerun.dataframe")

from bevfusion.datasets.nuscenes import NuScenesDataset  # noqa: E402
from bevfusion.datasets.transforms.loading import load_multisweep_points, resolve_data_path  # noqa: E402
from bevfusion.structures.boxes import box_corners  # noqa: E402
from bevfusion.utils.io import dump_pickle  # noqa: E402
from bevfusion.visualization import FrameOptions, LogOptions, visualize_drive  # noqa: E402
from bevfusion.visualization.colors import class_color  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "nuscenes" / "synthetic" / "fusion.yaml"
THRESHOLD = 0.3
MAX_POINTS = 4000
SWEEPS = 2
N_SAMPLES = 3
# The 3D view shows only what lies near the ego (LogOptions.view_range, tested in test_recording_view.py);
# the tests that count every point and box of a sample switch that off.
EVERYTHING = LogOptions(view_range=None)


pytestmark = pytest.mark.usefixtures("strict_rerun")  # tests/visualization/conftest.py


@pytest.fixture(scope="module")
def dataset(viz_infos):
    root, written = viz_infos
    return NuScenesDataset(root, written["val"])


def fake_results(dataset, seed=0):
    """Predictions = GT boxes nudged by 0.2 m, random scores (some below THRESHOLD), random map probabilities."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(len(dataset)):
        ann = dataset.get_ann_info(i)
        boxes = ann["gt_bboxes_3d"].copy()
        boxes[:, 0] += 0.2
        scores = rng.uniform(0, 1, len(boxes)).astype(np.float32)
        records.append({"token": dataset.data_infos[i]["token"], "boxes_3d": boxes.astype(np.float32),
                        "scores_3d": scores, "labels_3d": np.clip(ann["gt_labels_3d"], 0, None),
                        "masks_bev": rng.uniform(0, 1, (6, 200, 200)).astype(np.float32)})
    return records


def _options(**kw):
    return FrameOptions(sweeps_num=SWEEPS, max_points=MAX_POINTS, score_threshold=THRESHOLD, **kw)


def read_table(path, index="sample"):
    recording = rr.dataframe.load_recording(str(path))
    table = recording.view(index=index, contents="/**").select().read_all()
    return recording, table


def column(table, entity, component):
    name = f"/{entity}:{component}"
    assert name in table.column_names, f"{name} missing; have {sorted(table.column_names)}"
    return table.column(name).to_pylist()


def mat3(cell):
    """A logged Mat3x3 (rerun stores it column-major) as a numpy 3x3."""
    return np.asarray(cell[0], dtype=np.float64).reshape(3, 3).T


@pytest.fixture(scope="module")
def recorded(dataset, tmp_path_factory):
    """A recording of the first N_SAMPLES samples with fake predictions; GT maps rasterised from the map."""
    before = rr.error_utils.strict_mode()
    rr.set_strict_mode(True)
    try:
        out = tmp_path_factory.mktemp("viz") / "drive.rrd"
        results = fake_results(dataset)
        summary = visualize_drive(dataset, results=results, out=out, max_samples=N_SAMPLES,
                                  frame_options=_options(), log_options=EVERYTHING)
    finally:
        rr.set_strict_mode(before)
    return out, results, summary


def test_recording_has_the_drive(recorded, dataset):
    out, results, summary = recorded
    assert summary["path"] == out and out.is_file() and summary["samples"] == N_SAMPLES
    recording, table = read_table(out)
    assert table.column("sample").to_pylist() == list(range(N_SAMPLES))
    entities = {c.entity_path for c in recording.schema().component_columns()}
    expected = {"/world", "/world/ego", "/world/ego/lidar", "/world/ego/lidar/points", "/world/ego_trajectory",
                "/world/ego/lidar/gt/boxes", "/world/ego/lidar/gt/velocity", "/world/ego/lidar/pred/boxes",
                "/world/ego/lidar/pred/velocity", "/bev/gt/map", "/bev/pred/map", "/bev/gt/boxes", "/bev/pred/boxes"}
    for cam in dataset.get_data_info(0)["camera_names"]:
        expected |= {f"/world/ego/lidar/{cam}", f"/world/ego/lidar/{cam}/image"}
    assert expected <= entities, sorted(expected - entities)

    # one row per sample on the timestamp timeline too, at the samples' own times
    _, by_time = read_table(out, index="timestamp")
    stamps = [np.datetime64(t, "ns").astype(np.int64) for t in by_time.column("timestamp").to_pylist()]
    assert stamps == [int(dataset.data_infos[i]["timestamp"]) * 1000 for i in range(N_SAMPLES)]

    points = column(table, "world/ego/lidar/points", "Position3D")
    gt_boxes = column(table, "world/ego/lidar/gt/boxes", "PoseTranslation3D")
    gt_half = column(table, "world/ego/lidar/gt/boxes", "HalfSize3D")
    pred_boxes = column(table, "world/ego/lidar/pred/boxes", "PoseTranslation3D")
    pred_labels = column(table, "world/ego/lidar/pred/boxes", "Text")
    arrows = column(table, "world/ego/lidar/pred/velocity", "Vector3D")
    for i in range(N_SAMPLES):
        cloud = load_multisweep_points(dataset.data_infos[i], dataset.dataset_root, sweeps_num=SWEEPS)
        assert len(points[i]) == min(MAX_POINTS, len(cloud))
        ann = dataset.get_ann_info(i)
        assert len(gt_boxes[i]) == len(ann["gt_bboxes_3d"]) > 0
        np.testing.assert_allclose(gt_boxes[i], ann["gt_bboxes_3d"][:, :3], atol=1e-4)
        np.testing.assert_allclose(np.asarray(gt_half[i]) * 2, ann["gt_bboxes_3d"][:, 3:6], atol=1e-4)
        keep = results[i]["scores_3d"] >= THRESHOLD
        assert 0 < keep.sum() < len(keep)  # the threshold really drops some
        assert len(pred_boxes[i]) == len(arrows[i]) == keep.sum()
        names = [dataset.object_classes[j] for j in results[i]["labels_3d"][keep]]
        assert pred_labels[i] == [f"{n} {s:.2f}" for n, s in zip(names, results[i]["scores_3d"][keep])]
        np.testing.assert_allclose(np.asarray(arrows[i])[:, :2], results[i]["boxes_3d"][keep, 7:9], atol=1e-5)


def test_poses_and_cameras_match_the_calibration(recorded, dataset):
    out, _, _ = recorded
    _, table = read_table(out)
    for i in range(N_SAMPLES):
        data = dataset.get_data_info(i)
        for entity, T in (("world/ego", data["ego2global"]), ("world/ego/lidar", data["lidar2ego"])):
            np.testing.assert_allclose(mat3(column(table, entity, "TransformMat3x3")[i]), T[:3, :3], atol=1e-6)
            np.testing.assert_allclose(column(table, entity, "Translation3D")[i][0], T[:3, 3], rtol=1e-6, atol=1e-3)
        for k, cam in enumerate(data["camera_names"]):
            entity = f"world/ego/lidar/{cam}"
            T = data["camera2lidar"][k]
            np.testing.assert_allclose(mat3(column(table, entity, "TransformMat3x3")[i]), T[:3, :3], atol=1e-6)
            np.testing.assert_allclose(column(table, entity, "Translation3D")[i][0], T[:3, 3], atol=1e-5)
            np.testing.assert_allclose(mat3(column(table, entity, "PinholeProjection")[i]),
                                       data["camera_intrinsics"][k, :3, :3], rtol=1e-6)
            assert column(table, entity, "Resolution")[i][0] == [400.0, 225.0]
            blob = column(table, f"{entity}/image", "Blob")[i][0]
            path = resolve_data_path(data["image_paths"][k], dataset.dataset_root)
            assert bytes(blob) == Path(path).read_bytes()  # the JPEG as stored
    # the ego trajectory grows by one pose per sample of a scene and restarts with the next scene
    # (val samples 0, 1 are scene-0103, sample 2 is scene-0916)
    strips = [np.asarray(s[0]) for s in column(table, "world/ego_trajectory", "LineStrip3D")]
    positions = [dataset.get_data_info(i)["ego2global"][:3, 3] for i in range(N_SAMPLES)]
    np.testing.assert_allclose(strips[0], [positions[0], positions[0]], atol=1e-3)
    np.testing.assert_allclose(strips[1], [positions[0], positions[1]], atol=1e-3)
    np.testing.assert_allclose(strips[2], [positions[2], positions[2]], atol=1e-3)


def test_scene_selection(dataset, tmp_path):
    from bevfusion.visualization.frames import sample_scenes, select_samples

    table = sample_scenes(dataset.dataset_root, dataset.version)
    names = [table[info["token"]][1] for info in dataset.data_infos]
    assert names == ["scene-0103", "scene-0103", "scene-0916", "scene-0916"]
    scene_token = table[dataset.data_infos[2]["token"]][0]
    assert select_samples(dataset, ["scene-0916"])[0] == [2, 3]
    assert select_samples(dataset, [scene_token], max_samples=1)[0] == [2]
    with pytest.raises(ValueError, match="scene-9999"):
        select_samples(dataset, ["scene-9999"])
    with pytest.raises(ValueError, match="no sample of"):
        select_samples(dataset, ["scene-0061"])  # a train scene

    out = tmp_path / "scene.rrd"
    summary = visualize_drive(dataset, out=out, scenes=["scene-0916"], frame_options=_options(gt_maps=False))
    assert summary["samples"] == 2
    _, by_time = read_table(out, index="timestamp")
    stamps = [np.datetime64(t, "ns").astype(np.int64) for t in by_time.column("timestamp").to_pylist()]
    assert stamps == [int(dataset.data_infos[i]["timestamp"]) * 1000 for i in (2, 3)]
    # without predictions the pred entities are never logged; the GT boxes are
    assert column(by_time, "world/ego/lidar/gt/boxes", "PoseTranslation3D")[1]


def reference_bev_image(masks, lidar2ego, classes, threshold):
    """The BEV panel image, pixel by pixel: the pixel centre's position ahead of / left of the LiDAR
    (0.5 m pixels, forward up, left on the left) → the LiDAR-frame cell under it → the colour of the
    last class at or above `threshold` there (dark grey when none). Valid for a LiDAR mounted at a
    whole quarter turn (the synthetic drive's, like nuScenes', is turned by -90°)."""
    R = np.round(np.asarray(lidar2ego)[:2, :2])  # ego axes from LiDAR axes
    rows, cols = np.meshgrid(np.arange(200), np.arange(200), indexing="ij")
    ahead, left = 50 - (rows + 0.5) * 0.5, 50 - (cols + 0.5) * 0.5
    xy = np.stack([ahead, left], axis=-1) @ R  # R^T (ahead, left): the same point in LiDAR axes
    i = np.floor((xy[..., 0] + 50) / 0.5).astype(int)
    j = np.floor((xy[..., 1] + 50) / 0.5).astype(int)
    image = np.full((200, 200, 3), 40, np.uint8)
    for k, name in enumerate(classes):
        image[masks[k][i, j] >= threshold] = class_color(name)
    return image


def test_bev_maps(recorded, dataset):
    out, results, _ = recorded
    _, table = read_table(out)
    fmt = column(table, "bev/pred/map", "ImageFormat")[0][0]
    assert (fmt["width"], fmt["height"]) == (200, 200)
    lidar2ego = dataset.get_data_info(0)["lidar2ego"]
    pred = np.frombuffer(bytes(column(table, "bev/pred/map", "ImageBuffer")[0][0]), np.uint8).reshape(200, 200, 3)
    np.testing.assert_array_equal(pred, reference_bev_image(results[0]["masks_bev"], lidar2ego, dataset.map_classes,
                                                            0.5))
    # GT maps were rasterised from the synthetic map expansion: some drivable area around the ego
    gt = np.frombuffer(bytes(column(table, "bev/gt/map", "ImageBuffer")[0][0]), np.uint8).reshape(200, 200, 3)
    assert (gt != 40).any()
    # BEV box outlines stay on the map; a box whose footprint lies inside it has its centre (the strip's
    # last vertex) at its pixel, forward up
    strips = column(table, "bev/gt/boxes", "LineStrip2D")[0]
    points = np.concatenate([np.asarray(s) for s in strips])
    assert points.min() >= 0 and points.max() <= 200
    boxes = dataset.get_ann_info(0)["gt_bboxes_3d"]
    ahead_left = boxes[:, :2] @ np.round(lidar2ego[:2, :2]).T
    inside = np.all(np.abs(ahead_left) + np.hypot(boxes[:, 3], boxes[:, 4])[:, None] / 2 < 50, axis=1)
    assert inside.sum() >= 5
    ends = np.array([s[-1] for s in strips])
    for a, l in ahead_left[inside]:
        assert np.min(np.hypot(*(ends - [(50 - l) / 0.5, (50 - a) / 0.5]).T)) < 1e-3


def test_coarser_map_masks_show_on_the_same_grid():
    """A 1 m map head's (C, 100, 100) masks are shown on the 0.5 m image, each cell as 2 x 2 pixels,
    so that the box outlines (drawn in 0.5 m pixels) stay where they belong."""
    from bevfusion.visualization.recording import on_bev_grid

    rng = np.random.default_rng(3)
    coarse = rng.uniform(0, 1, (6, 100, 100)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(on_bev_grid(coarse), fine)
    assert on_bev_grid(fine) is fine
    odd = rng.uniform(0, 1, (2, 8, 5))  # any cell count: nearest cell by centre
    out = on_bev_grid(odd)
    assert out.shape == (2, 200, 200)
    np.testing.assert_array_equal(out[:, 24, 39], odd[:, 0, 0])  # pixel centres 12.25 m, 19.75 m in
    np.testing.assert_array_equal(out[:, 25, 40], odd[:, 1, 1])


def test_rrd_verify_accepts_the_file(recorded):
    out, _, _ = recorded
    exe = shutil.which("rerun") or str(Path(sys.executable).with_name("rerun"))
    command = [exe] if os.path.exists(exe) else [sys.executable, "-m", "rerun"]  # the SDK's bundled CLI
    proc = subprocess.run(command + ["rrd", "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified without error" in proc.stdout + proc.stderr


def _project_with_our_math(lidar2image, points):
    """Pixels of LiDAR-frame points through the dataset's lidar2image (K·[R|t] as 4x4)."""
    hom = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ lidar2image.T
    return hom[:, :2] / hom[:, 2:3], hom[:, 2]


def test_box_projection_agrees_with_the_logged_pinhole(recorded, dataset):
    """A GT box corner projected by our camera math and through the logged transform + pinhole agree."""
    out, _, _ = recorded
    _, table = read_table(out)
    checked = 0
    for i in range(N_SAMPLES):
        data = dataset.get_data_info(i)
        corners = box_corners(dataset.get_ann_info(i)["gt_bboxes_3d"]).reshape(-1, 3)
        for k, cam in enumerate(data["camera_names"]):
            ours, depth = _project_with_our_math(data["lidar2image"][k], corners)
            entity = f"world/ego/lidar/{cam}"
            R = mat3(column(table, entity, "TransformMat3x3")[i])  # camera → LiDAR (parent from child)
            t = np.asarray(column(table, entity, "Translation3D")[i][0], dtype=np.float64)
            K = mat3(column(table, entity, "PinholeProjection")[i])
            w, h = column(table, entity, "Resolution")[i][0]
            in_camera = (corners - t) @ R  # R^T (p - t), row-vector form
            pix = in_camera @ K.T
            theirs = pix[:, :2] / pix[:, 2:3]
            visible = (depth > 1.0) & (ours[:, 0] >= 0) & (ours[:, 0] < w) & (ours[:, 1] >= 0) & (ours[:, 1] < h)
            np.testing.assert_allclose(in_camera[:, 2], depth, atol=1e-3)
            np.testing.assert_allclose(theirs[visible], ours[visible], atol=0.05)
            checked += int(visible.sum())
    assert checked > 20  # boxes really are in view


def test_unknown_samples_only_is_an_error_and_writes_nothing(dataset, tmp_path):
    results = fake_results(dataset)[:2]
    for r in results:
        r["token"] = "not-a-sample-" + r["token"]
    path = tmp_path / "results.pkl"
    dump_pickle(results, path)
    out = tmp_path / "drive.rrd"
    with pytest.raises(ValueError, match="none of its 2 samples"):
        visualize_drive(dataset, results=path, out=out, frame_options=_options(gt_maps=False))
    assert list(tmp_path.iterdir()) == [path]


def test_some_unknown_samples_warn(dataset, tmp_path, caplog):
    results = fake_results(dataset)[:2]
    results.append({**results[0], "token": "ghost"})
    out = tmp_path / "drive.rrd"
    with caplog.at_level(logging.WARNING, logger="bevfusion"):
        summary = visualize_drive(dataset, results=results, out=out, frame_options=_options(gt_maps=False))
    assert summary["samples"] == 2 and out.is_file()
    assert any("1 of 3 records are for samples not in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad, match", [
    ({"boxes_3d": np.zeros((3, 5))}, r"boxes_3d has shape \(3, 5\)"),
    ({"scores_3d": np.zeros(1)}, "but 1 scores"),
    ({"masks_bev": np.zeros((2, 200, 200))}, r"masks_bev has shape \(2, 200, 200\)"),
])
def test_malformed_results_are_refused_before_writing(dataset, tmp_path, bad, match):
    results = fake_results(dataset)[:2]
    results[1] = {**results[1], **bad}
    out = tmp_path / "drive.rrd"
    with pytest.raises(ValueError, match=f"sample {results[1]['token']}: .*{match}"):
        visualize_drive(dataset, results=results, out=out, frame_options=_options(gt_maps=False))
    assert not any(tmp_path.iterdir())


def test_missing_image_is_a_warning_and_the_camera_stays(viz_infos, tmp_path, caplog):
    root, written = viz_infos
    ds = NuScenesDataset(root, written["val"])
    ds.data_infos[1]["cams"]["CAM_BACK"]["data_path"] = "/nowhere/samples/CAM_BACK/missing.jpg"
    out = tmp_path / "drive.rrd"
    with caplog.at_level(logging.WARNING, logger="bevfusion"):
        summary = visualize_drive(ds, out=out, max_samples=2, frame_options=_options(gt_maps=False))
    assert summary["warnings"] == 1
    assert any("CAM_BACK" in r.getMessage() and "missing.jpg" in r.getMessage() for r in caplog.records)
    _, table = read_table(out)
    blobs = column(table, "world/ego/lidar/CAM_BACK/image", "Blob")
    assert blobs[0] and not blobs[1]  # cleared at sample 1, not the stale image of sample 0
    assert column(table, "world/ego/lidar/CAM_BACK", "PinholeProjection")[1] is not None
    assert any("missing.jpg" in str(m) for m in column(table, "logs", "Text") if m)


def test_failure_half_way_leaves_no_file(dataset, tmp_path, monkeypatch):
    from bevfusion.visualization import recording

    out = tmp_path / "drive.rrd"
    out.write_bytes(b"previous recording")
    calls = []
    original = recording.DriveLogger.log

    def failing(self, frame):
        calls.append(frame.token)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        original(self, frame)

    monkeypatch.setattr(recording.DriveLogger, "log", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        visualize_drive(dataset, out=out, frame_options=_options(gt_maps=False))
    assert out.read_bytes() == b"previous recording"
    assert [p.name for p in tmp_path.iterdir()] == ["drive.rrd"]  # no temp file left behind


def test_blueprint_lays_out_3d_bev_and_cameras():
    from bevfusion.visualization.recording import make_blueprint

    cams = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
    views = []

    def walk(node):
        contents = getattr(node, "contents", None)
        if isinstance(contents, (list, tuple)) and not hasattr(node, "origin"):
            for child in contents:
                walk(child)
        else:
            views.append(node)

    walk(make_blueprint(cams).root_container)
    origins = {str(v.origin): v for v in views}
    assert set(origins) == {"world/ego", "bev/gt", "bev/pred"} | {f"world/ego/lidar/{c}" for c in cams}
    assert type(origins["world/ego"]).__name__ == "Spatial3DView"
    # the cameras show their own subtree: the image and the box edges drawn on it, not 3D boxes
    front = origins["world/ego/lidar/CAM_FRONT"]
    assert front.contents == "$origin/**"


def test_cli_writes_a_recording_and_reports_bad_results(viz_infos, dataset, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize_tool", REPO / "tools" / "visualize.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root, written = viz_infos
    results = tmp_path / "results.pkl"
    dump_pickle(fake_results(dataset)[:1], results)
    common = [str(CONFIG), "--set", f"dataset_root={root}/", f"data.val.ann_file={written['val']}",
              "--sweeps", "1", "--max-points", "1000", "--no-gt-map", "--score-threshold", "0.5", "--view-range", "0"]
    out = tmp_path / "drive.rrd"
    assert tool.main(common + ["--results", str(results), "--out", str(out)]) == 0
    _, table = read_table(out)
    assert table.num_rows == 1
    assert len(column(table, "world/ego/lidar/points", "Position3D")[0]) == 1000

    bad = tmp_path / "bad.pkl"
    dump_pickle([{"token": "ghost", "boxes_3d": np.zeros((0, 9))}], bad)
    out2 = tmp_path / "bad.rrd"
    assert tool.main(common + ["--results", str(bad), "--out", str(out2)]) == 1
    assert not out2.exists()


def test_missing_lidar_files_are_warnings(viz_infos, tmp_path, caplog):
    root, written = viz_infos
    ds = NuScenesDataset(root, written["val"])
    assert ds.data_infos[0]["sweeps"]
    ds.data_infos[0]["sweeps"][0]["data_path"] = "/nowhere/sweeps/LIDAR_TOP/gone.pcd.bin"
    ds.data_infos[1]["lidar_path"] = "/nowhere/samples/LIDAR_TOP/gone.pcd.bin"
    out = tmp_path / "drive.rrd"
    opts = FrameOptions(sweeps_num=SWEEPS, max_points=None, gt_maps=False, images=False)
    with caplog.at_level(logging.WARNING, logger="bevfusion"):
        summary = visualize_drive(ds, out=out, max_samples=2, frame_options=opts, log_options=EVERYTHING)
    assert summary["warnings"] == 2
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "showing the keyframe only" in messages and "no LiDAR points" in messages
    _, table = read_table(out)
    points = column(table, "world/ego/lidar/points", "Position3D")
    keyframe = load_multisweep_points({**ds.data_infos[0], "sweeps": []}, root, sweeps_num=0)
    assert len(points[0]) == len(keyframe) and not points[1]
    # images=False: calibrations only
    assert "/world/ego/lidar/CAM_FRONT/image:Blob" not in table.column_names
    assert column(table, "world/ego/lidar/CAM_FRONT", "PinholeProjection")[1]


def test_predict_callable_runs_on_the_chosen_samples(dataset, tmp_path):
    """Checkpoint mode: the prediction hook gets the selected indices and its records are shown."""
    seen = []

    def predict(indices):
        seen.append(list(indices))
        return [r for r in fake_results(dataset) if r["token"] in {dataset.data_infos[i]["token"] for i in indices}]

    out = tmp_path / "drive.rrd"
    visualize_drive(dataset, out=out, scenes=["scene-0916"], predict=predict,
                    frame_options=_options(gt_maps=False, images=False), log_options=EVERYTHING)
    assert seen == [[2, 3]]
    _, table = read_table(out)
    expected = [int((fake_results(dataset)[i]["scores_3d"] >= THRESHOLD).sum()) for i in (2, 3)]
    assert [len(b) for b in column(table, "world/ego/lidar/pred/boxes", "PoseTranslation3D")] == expected


def test_a_frame_without_boxes_clears_the_previous_boxes(dataset, tmp_path):
    results = fake_results(dataset)[:2]
    results[1]["scores_3d"][:] = 0.0  # nothing survives the threshold in sample 1
    out = tmp_path / "drive.rrd"
    visualize_drive(dataset, results=results, out=out, frame_options=_options(gt_maps=False, images=False),
                    log_options=EVERYTHING)
    _, table = read_table(out)
    pred = column(table, "world/ego/lidar/pred/boxes", "PoseTranslation3D")
    bev = column(table, "bev/pred/boxes", "LineStrip2D")
    # (BEV outlines are clipped to the map, so a box can give several strips or none)
    assert len(pred[0]) == (results[0]["scores_3d"] >= THRESHOLD).sum() > 0 and len(bev[0]) > 0
    assert not pred[1] and not bev[1]
    assert not column(table, "world/ego/lidar/pred/velocity", "Vector3D")[1]


def test_unreadable_map_location_is_a_warning(viz_infos, tmp_path, caplog):
    root, written = viz_infos
    ds = NuScenesDataset(root, written["val"])
    ds.data_infos[0]["location"] = "atlantis"
    out = tmp_path / "drive.rrd"
    opts = FrameOptions(sweeps_num=0, max_points=100, images=False, gt_maps=True)
    with caplog.at_level(logging.WARNING, logger="bevfusion"):
        visualize_drive(ds, out=out, max_samples=2, frame_options=opts)
    assert any("'atlantis'" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    _, table = read_table(out)
    maps = column(table, "bev/gt/map", "ImageBuffer")
    assert not maps[0] and maps[1]  # the other sample's location still has its map


@pytest.mark.slow
def test_cli_checkpoint_mode_runs_the_model(viz_infos, tmp_path):
    """--checkpoint: a randomly initialised synthetic fusion model runs on the shown sample."""
    import importlib.util

    import torch

    from bevfusion.config import load_config
    from bevfusion.models import build_model

    root, written = viz_infos
    overrides = [f"dataset_root={root}/", f"data.val.ann_file={written['val']}"]
    torch.manual_seed(0)
    ckpt = tmp_path / "random.pth"
    torch.save({"state_dict": build_model(load_config(CONFIG, overrides).model).state_dict()}, ckpt)
    spec = importlib.util.spec_from_file_location("visualize_tool", REPO / "tools" / "visualize.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "drive.rrd"
    argv = [str(CONFIG), "--set", *overrides, "--checkpoint", str(ckpt), "--max-samples", "1", "--sweeps", "1",
            "--max-points", "500", "--no-images", "--score-threshold", "0", "--device", "cpu", "--out", str(out)]
    assert tool.main(argv) == 0
    _, table = read_table(out)
    assert table.num_rows == 1
    assert len(column(table, "world/ego/lidar/pred/boxes", "PoseTranslation3D")[0]) > 0
    assert column(table, "bev/pred/map", "ImageBuffer")[0]

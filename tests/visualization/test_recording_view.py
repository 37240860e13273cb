"""What the drive recording looks like: BEV panels forward-up, clipping to the images and the map, GT and
predictions styled apart, the 3D view kept near the ego, the blueprint's layout.

Geometry is checked against naive references (dense sampling along each edge, the cell under each
pixel) and against positions given in the ego frame, never against the recording code's own helpers.
Recordings are written in rerun's strict mode and read back with its dataframe API.
"""
from __future__ import annotations

import numpy as np
import pytest

rr = pytest.importorskip("rerun")
pytest.importorskip("rerun.dataframe")

from bevfusion.datasets.nuscenes import MAP_CLASSES, NuScenesDataset  # noqa: E402
from bevfusion.structures.boxes import box_corners  # noqa: E402
from bevfusion.visualization.colors import GT_COLOR, bev_map_image, class_color  # noqa: E402
from bevfusion.visualization.frames import BevCanvas, CameraView, Frame, FrameOptions  # noqa: E402
from bevfusion.visualization.recording import (LogOptions, camera_box_strips, clip_polylines,  # noqa: E402
                                               clip_segments, make_blueprint, write_rrd)

# nuScenes' LIDAR_TOP calibration (scene-0061): x to the ego's right, y forward, yawed by about -89.9°
NUSC_LIDAR_Q = (0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817)  # w x y z
NUSC_LIDAR_T = (0.943713, 0.0, 1.84023)


pytestmark = pytest.mark.usefixtures("strict_rerun")  # tests/visualization/conftest.py


def quat_matrix(w, x, y, z):
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def pose(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def yaw_pose(deg, t=NUSC_LIDAR_T):
    a = np.deg2rad(deg)
    return pose([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]], t)


LIDAR_MOUNTS = {
    "nuscenes": pose(quat_matrix(*NUSC_LIDAR_Q), NUSC_LIDAR_T),
    "synthetic": yaw_pose(-90),
    "x-forward": yaw_pose(0),
    "x-left": yaw_pose(90),
    "x-back": yaw_pose(180),
}


def packed(rgb):
    """A colour as rerun stores it: one u32 0xRRGGBBAA."""
    r, g, b = rgb
    return (r << 24) | (g << 16) | (b << 8) | 255


def read_table(path):
    recording = rr.dataframe.load_recording(str(path))
    return recording.view(index="sample", contents="/**").select().read_all()


def column(table, entity, component):
    name = f"/{entity}:{component}"
    assert name in table.column_names, f"{name} missing; have {sorted(table.column_names)}"
    return table.column(name).to_pylist()


def ego_box_to_lidar(lidar2ego, x, y, z, dx, dy, dz, yaw_ego):
    """A box given in the ego frame → the internal LiDAR-frame box (9 columns, no velocity)."""
    centre = np.linalg.inv(lidar2ego) @ [x, y, z, 1.0]
    mount_yaw = np.arctan2(lidar2ego[1, 0], lidar2ego[0, 0])
    return np.array([*centre[:3], dx, dy, dz, yaw_ego - mount_yaw, 0.0, 0.0])


def frame_with(lidar2ego, gt_boxes=None, gt_names=(), pred_boxes=None, pred_names=(), pred_scores=None,
               gt_masks=None, pred_masks=None, cameras=(), points=None, ego2global=None, t_us=0, scene="s"):
    return Frame(index=0, token="sample-token", timestamp_us=t_us, scene=scene, lidar2ego=np.asarray(lidar2ego),
                 ego2global=np.eye(4) if ego2global is None else ego2global, points=points, cameras=list(cameras),
                 gt_boxes=gt_boxes, gt_names=list(gt_names), pred_boxes=pred_boxes, pred_names=list(pred_names),
                 pred_scores=pred_scores, gt_masks=gt_masks, pred_masks=pred_masks)


def point_to_segments(points, strips):
    """Distance from each point (P, 2) to the nearest segment of the polylines `strips`."""
    segs = [(np.asarray(s[:-1], float), np.asarray(s[1:], float)) for s in strips]
    a = np.concatenate([s[0] for s in segs])
    b = np.concatenate([s[1] for s in segs])
    d = b - a
    rel = points[:, None, :] - a[None]
    t = np.clip((rel * d[None]).sum(-1) / np.maximum((d * d).sum(-1), 1e-12)[None], 0, 1)
    return np.min(np.linalg.norm(rel - t[..., None] * d[None], axis=-1), axis=1)


def strip_length(strips):
    return sum(np.linalg.norm(np.diff(np.asarray(s, float), axis=0), axis=1).sum() for s in strips)


# ---------------------------------------------------------------------------------------------------
# clipping


def test_clip_segments_against_sampling():
    rng = np.random.default_rng(0)
    p0 = rng.uniform(-60, 260, (400, 2))
    p1 = rng.uniform(-60, 260, (400, 2))
    p1[:20] = p0[:20] + rng.uniform(-1, 1, (20, 2)) * 1e-3  # tiny segments
    p1[20:30, 0] = p0[20:30, 0]  # vertical ones
    lo, hi = (0.0, 0.0), (200.0, 150.0)
    keep, t0, t1 = clip_segments(p0, p1, lo, hi)
    t = np.linspace(0, 1, 20001)
    for i in range(len(p0)):
        pts = p0[i] + t[:, None] * (p1[i] - p0[i])
        inside = np.all((pts >= lo) & (pts <= hi), axis=1)
        if inside.sum() < 2:  # nothing (or a touch) inside: dropped, or kept only if really inside
            assert not keep[i] or (t1[i] - t0[i]) < 2e-4
            continue
        assert keep[i]
        assert abs(t0[i] - t[inside][0]) <= 1e-4 and abs(t1[i] - t[inside][-1]) <= 1e-4


def test_clip_segments_edge_cases():
    lo, hi = (0.0, 0.0), (10.0, 10.0)
    keep, t0, t1 = clip_segments(np.array([[0.0, 2], [-1, 12], [2, 2], [-5, 5], [12, 2], [-5, 5]]),
                                 np.array([[0.0, 8], [11, 12], [2, 2], [15, 5], [12, 2], [5, 15]]), lo, hi)
    # along the boundary, outside, a point inside, across, a point outside, touching a corner
    assert keep.tolist() == [True, False, True, True, False, False]
    np.testing.assert_allclose([t0[0], t1[0], t0[3], t1[3]], [0, 1, 0.25, 0.75])
    # an open side (±inf): the near-plane cut of the camera edges
    keep, t0, t1 = clip_segments(np.array([[0.0, 0, -1]]), np.array([[0.0, 0, 3]]), (-np.inf, -np.inf, 0.1),
                                 (np.inf, np.inf, np.inf))
    assert keep[0] and t0[0] == pytest.approx(0.275) and t1[0] == 1


def test_clip_polylines_splits_and_keeps_whole_strips():
    inside = np.array([[10.0, 10], [50, 10], [50, 50]])
    strips, source = clip_polylines([inside], (100, 100))
    assert len(strips) == 1 and source.tolist() == [0]
    np.testing.assert_array_equal(strips[0], inside)  # untouched, vertex for vertex
    # leaves through the right edge and comes back: two pieces, cut at x = 100
    out_and_back = np.array([[90.0, 10], [120, 10], [120, 30], [90, 30]])
    strips, source = clip_polylines([np.zeros((3, 2)) - 5, out_and_back], (100, 100))
    assert source.tolist() == [1, 1]
    np.testing.assert_allclose(strips[0], [[90, 10], [100, 10]])
    np.testing.assert_allclose(strips[1], [[100, 30], [90, 30]])


def front_camera(size=(1600, 900)):
    """A camera at the LiDAR origin looking along LiDAR +y (the ego's forward), image x to the right."""
    K = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    R = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # camera x right, y down, z forward → LiDAR
    return CameraView("CAM_FRONT", K, pose(R, (0, 0.5, -0.3)), size, None)


def sampled_view(boxes, camera, near, n=4000):
    """Naive reference: points along every box edge, kept when at least `near` in front of the camera
    and inside the image; returned in pixels, per box, with the length of the visible image curve."""
    E = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
    lidar2cam = np.linalg.inv(camera.camera2lidar)
    w, h = camera.size
    out = []
    for corners in box_corners(boxes):
        pts, length = [], 0.0
        for i, j in E:
            p = corners[i] + np.linspace(0, 1, n)[:, None] * (corners[j] - corners[i])
            c = p @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
            z = np.where(c[:, 2] > 0, c[:, 2], 1.0)
            uv = (c @ camera.intrinsics.T)[:, :2] / z[:, None]
            ok = (c[:, 2] >= near) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
            pts.append(uv[ok])
            both = ok[1:] & ok[:-1]
            length += np.linalg.norm(np.diff(uv, axis=0), axis=1)[both].sum()
        out.append((np.concatenate(pts), length))
    return out


def test_camera_box_strips_against_sampled_edges():
    camera = front_camera()
    boxes = np.array([
        [0.0, 15.0, -0.8, 1.9, 4.5, 1.6, 0.3],  # ahead, wholly in the image
        [-6.0, 6.0, -0.8, 2.5, 10.0, 3.0, 0.0],  # a bus alongside: leaves the image on the left
        [1.0, 1.5, -0.8, 2.0, 4.5, 1.6, 0.0],  # reaches behind the camera: cut at the near plane
        [0.0, -10.0, -0.8, 1.9, 4.5, 1.6, 0.0],  # behind: nothing
        [40.0, 5.0, -0.8, 1.9, 4.5, 1.6, 0.0],  # far off to the side: nothing
    ])
    near = 0.1
    strips, source = camera_box_strips(boxes, camera, near)
    reference = sampled_view(boxes, camera, near)
    assert sorted(set(source.tolist())) == [0, 1, 2]
    w, h = camera.size
    for k, (ref, length) in enumerate(reference):
        mine = [s for s, j in zip(strips, source) if j == k]
        if not len(ref):
            assert not mine
            continue
        pts = np.concatenate(mine)
        assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= w and pts[:, 1].min() >= 0 and pts[:, 1].max() <= h
        assert point_to_segments(ref, mine).max() < 0.05  # every visible sample lies on a drawn edge
        assert strip_length(mine) == pytest.approx(length, rel=0.01, abs=2.0)  # and nothing else is drawn
    # the box wholly in view: its 12 edges as 4 strips through the projected corners
    first = [s for s, j in zip(strips, source) if j == 0]
    assert [len(s) for s in first] == [10, 2, 2, 2]
    c = box_corners(boxes[:1])[0] @ np.linalg.inv(camera.camera2lidar)[:3, :3].T \
        + np.linalg.inv(camera.camera2lidar)[:3, 3]
    uv = (c @ camera.intrinsics.T)[:, :2] / c[:, 2:3]
    np.testing.assert_allclose(first[0], uv[[0, 1, 2, 3, 0, 4, 5, 6, 7, 4]], atol=1e-9)


def test_camera_edges_in_the_recording_match_the_dataset_projection(viz_infos, tmp_path):
    """The synthetic drive's GT box edges on its camera images, against points sampled along each edge
    and projected with the dataset's own lidar2image (K·[R|t])."""
    root, written = viz_infos
    ds = NuScenesDataset(root, written["val"])
    from bevfusion.visualization import visualize_drive

    out = tmp_path / "drive.rrd"
    visualize_drive(ds, out=out, max_samples=1, frame_options=FrameOptions(sweeps_num=0, max_points=100,
                                                                           gt_maps=False))
    table = read_table(out)
    data = ds.get_data_info(0)
    boxes = ds.get_ann_info(0)["gt_bboxes_3d"]
    checked = 0
    for k, cam in enumerate(data["camera_names"]):
        w, h = column(table, f"world/ego/lidar/{cam}", "Resolution")[0][0]
        corners = box_corners(boxes)  # (K, 8, 3)
        E = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
        t = np.linspace(0, 1, 300)[:, None]
        pts = np.concatenate([corners[:, i, None] + t * (corners[:, j, None] - corners[:, i, None]) for i, j in E],
                             axis=1).reshape(-1, 3)
        hom = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ data["lidar2image"][k].T
        depth = hom[:, 2]
        uv = hom[:, :2] / np.where(depth > 0, depth, 1.0)[:, None]
        ok = (depth >= 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
        strips = column(table, f"world/ego/lidar/{cam}/gt/boxes", "LineStrip2D")[0] or []
        if not ok.any():
            assert not strips
            continue
        drawn = np.concatenate([np.asarray(s) for s in strips])
        assert drawn[:, 0].min() >= 0 and drawn[:, 0].max() <= w and drawn[:, 1].min() >= 0 and drawn[:, 1].max() <= h
        assert point_to_segments(uv[ok], strips).max() < 0.05
        checked += int(ok.sum())
    assert checked > 1000


# ---------------------------------------------------------------------------------------------------
# BEV panels: forward up, left on the left


@pytest.mark.parametrize("mount", list(LIDAR_MOUNTS))
def test_canvas_pixels_and_masks_agree_and_face_forward(mount):
    """For every LiDAR mount: a point's pixel is where the ego frame says (ahead → up, left → left), and
    a mask cell holding that point is drawn at that pixel."""
    lidar2ego = LIDAR_MOUNTS[mount]
    canvas = BevCanvas.for_lidar(lidar2ego)
    assert canvas.size == (200, 200)
    rng = np.random.default_rng(1)
    xy = rng.uniform(-49, 49, (50, 2))
    ahead_left = xy @ lidar2ego[:2, :2].T  # ego axes, from the LiDAR origin
    expected = np.stack([(50 - ahead_left[:, 1]) / 0.5, (50 - ahead_left[:, 0]) / 0.5], axis=1)
    tol = 0.5 if mount == "nuscenes" else 1e-9  # nuScenes' mount is 0.1° off a quarter turn
    np.testing.assert_allclose(canvas.pixels(xy), expected, atol=tol)
    for p, pix in zip(xy, canvas.pixels(xy)):
        if np.any(np.abs(pix - np.round(pix)) < 0.2):
            continue  # too close to a pixel edge for the mount's residual yaw
        masks = np.zeros((len(MAP_CLASSES), 200, 200), np.float32)
        i, j = np.floor((p + 50) / 0.5).astype(int)
        masks[0, i, j] = 1
        image = bev_map_image(canvas.masks(masks), MAP_CLASSES)
        lit = np.argwhere(np.any(image != 40, axis=-1))
        assert lit.tolist() == [[int(pix[1]), int(pix[0])]]  # (row, col)


@pytest.mark.parametrize("mount", list(LIDAR_MOUNTS))
def test_bev_box_lands_where_the_ego_frame_says(mount, tmp_path):
    """A car 20.3 m ahead and 10.2 m left of the ego, along the ego's heading, logged as GT with a map cell
    under its centre: read back, it sits in the upper-left quadrant at its pixel, long side vertical,
    nose up, on top of the map cell; the ego marker points up from the ego's pixel."""
    lidar2ego = LIDAR_MOUNTS[mount]
    t = lidar2ego[:3, 3]
    box = ego_box_to_lidar(lidar2ego, 20.3, 10.2, 0.9, 4.5, 1.9, 1.6, 0.0)
    masks = np.zeros((len(MAP_CLASSES), 200, 200), np.float32)
    i, j = np.floor((box[:2] + 50) / 0.5).astype(int)  # the cell under the centre (cell i: x in [-50 + 0.5 i, ...))
    masks[MAP_CLASSES.index("ped_crossing"), i, j] = 1
    out = write_rrd(tmp_path / "bev.rrd", [frame_with(lidar2ego, gt_boxes=box[None], gt_names=["car"],
                                                      gt_masks=masks)], MAP_CLASSES, [])
    table = read_table(out)
    fmt = column(table, "bev/gt/map", "ImageFormat")[0][0]
    assert (fmt["width"], fmt["height"]) == (200, 200)
    strips = column(table, "bev/gt/boxes", "LineStrip2D")[0]
    assert len(strips) == 1
    strip = np.asarray(strips[0])
    tol = 0.3 if mount == "nuscenes" else 1e-4
    u, v = (50 - (10.2 - t[1])) / 0.5, (50 - (20.3 - t[0])) / 0.5  # 0.5 m pixels from the LiDAR at (100, 100)
    np.testing.assert_allclose(strip[-1], [u, v], atol=tol)  # the last vertex is the centre
    assert u < 100 and v < 100  # ahead and to the left: upper-left quadrant
    extent = strip[:-1].max(axis=0) - strip[:-1].min(axis=0)
    np.testing.assert_allclose(extent, [1.9 / 0.5, 4.5 / 0.5], atol=2 * tol + 0.05)  # long side vertical
    assert strip[0][1] == pytest.approx(v - 4.5, abs=tol)  # the heading tick starts at the nose, above
    image = np.frombuffer(bytes(column(table, "bev/gt/map", "ImageBuffer")[0][0]), np.uint8).reshape(200, 200, 3)
    lit = np.argwhere(np.any(image != 40, axis=-1))
    assert lit.tolist() == [[int(v), int(u)]]
    assert tuple(image[int(v), int(u)]) == class_color("ped_crossing")

    marker = np.asarray(column(table, "bev/gt/ego", "LineStrip2D")[0][0])
    assert len(marker) == 4 and np.allclose(marker[0], marker[-1])  # a closed triangle
    tip, base = marker[0], marker[1:3]
    ego_u, ego_v = (50 + t[1]) / 0.5, (50 + t[0]) / 0.5  # the ego origin, t behind/right of the LiDAR
    assert abs(ego_u - 100) < 1 and abs(ego_v - 100) < 3  # near the centre
    assert tip[1] < ego_v < base[:, 1].min()  # pointing up
    assert tip[0] == pytest.approx(ego_u, abs=0.3) and base[:, 0].mean() == pytest.approx(ego_u, abs=0.3)
    assert column(table, "bev/pred/ego", "LineStrip2D")[0]  # on both panels


def test_bev_outlines_are_clipped_to_the_map(tmp_path):
    lidar2ego = LIDAR_MOUNTS["synthetic"]
    t = lidar2ego[:3, 3]
    ahead = [  # (ahead, left, length, width, yaw) in the ego frame
        (50.0 + t[0], 3.0, 6.0, 2.0, 0.3),  # straddles the top edge
        (5.0 + t[0], -49.5, 4.0, 2.0, 1.2),  # straddles the right edge
        (80.0, 0.0, 4.0, 2.0, 0.0),  # off the map
        (10.0 + t[0], 0.0, 4.0, 2.0, 0.0),  # inside
    ]
    boxes = np.stack([ego_box_to_lidar(lidar2ego, a, l, 0.8, L, W, 1.5, y) for a, l, L, W, y in ahead])
    out = write_rrd(tmp_path / "clip.rrd", [frame_with(lidar2ego, pred_boxes=boxes, pred_names=["car"] * 4,
                                                       pred_scores=np.full(4, 0.9))], MAP_CLASSES, [])
    strips = [np.asarray(s) for s in column(read_table(out), "bev/pred/boxes", "LineStrip2D")[0]]
    pts = np.concatenate(strips)
    assert pts.min() >= 0 and pts.max() <= 200
    # reference: the footprint outlines (ego frame → pixels), sampled and kept where they are on the map
    ref = []
    for a, l, L, W, y in ahead:
        c, s = np.cos(y), np.sin(y)
        corners = np.array([[a, l]]) + np.array([[L / 2, W / 2], [-L / 2, W / 2], [-L / 2, -W / 2], [L / 2, -W / 2]]) \
            @ np.array([[c, s], [-s, c]])
        loop = np.concatenate([corners, corners[:1]])
        for p, q in zip(loop[:-1], loop[1:]):
            samples = p + np.linspace(0, 1, 2000)[:, None] * (q - p)
            pix = np.stack([(50 - (samples[:, 1] - t[1])) / 0.5, (50 - (samples[:, 0] - t[0])) / 0.5], axis=1)
            ref.append(pix[np.all((pix >= 0) & (pix <= 200), axis=1)])
    ref = np.concatenate(ref)
    assert point_to_segments(ref, strips).max() < 1e-3
    # nothing is drawn of the box off the map: every drawn point lies on a footprint or a heading tick
    # of the three others, whose ticks end at their centres
    centres = [np.array([(50 - (l - t[1])) / 0.5, (50 - (a - t[0])) / 0.5]) for a, l, *_ in ahead]
    ends = [s[-1] for s in strips]
    assert any(np.allclose(e, centres[3], atol=1e-4) for e in ends)
    assert not any(np.allclose(e, centres[2], atol=5) for e in ends)


# ---------------------------------------------------------------------------------------------------
# GT and predictions look different everywhere


@pytest.fixture(scope="module")
def styled(viz_infos, tmp_path_factory):
    """The first synthetic sample with predictions = GT boxes shifted 0.3 m, scores 0.5-1."""
    root, written = viz_infos
    ds = NuScenesDataset(root, written["val"])
    ann = ds.get_ann_info(0)
    boxes = ann["gt_bboxes_3d"].copy()
    boxes[:, 0] += 0.3
    scores = np.linspace(0.5, 1.0, len(boxes))
    results = [{"token": ds.data_infos[0]["token"], "boxes_3d": boxes, "scores_3d": scores,
                "labels_3d": np.clip(ann["gt_labels_3d"], 0, None),
                "masks_bev": np.zeros((len(ds.map_classes), 200, 200), np.float32)}]
    from bevfusion.visualization import visualize_drive

    before = rr.error_utils.strict_mode()
    rr.set_strict_mode(True)
    try:
        out = tmp_path_factory.mktemp("styled") / "drive.rrd"
        visualize_drive(ds, results=results, out=out, frame_options=FrameOptions(sweeps_num=0, max_points=500,
                                                                                 gt_maps=False))
    finally:
        rr.set_strict_mode(before)
    names = [ds.object_classes[j] for j in results[0]["labels_3d"]]
    return read_table(out), names, scores


def test_gt_is_thin_and_neutral_predictions_thick_in_class_colours(styled):
    table, names, scores = styled
    gt_entities = ["world/ego/lidar/gt/boxes", "bev/gt/boxes", "world/ego/lidar/CAM_FRONT/gt/boxes"]
    pred_entities = ["world/ego/lidar/pred/boxes", "bev/pred/boxes", "world/ego/lidar/CAM_FRONT/pred/boxes"]
    class_colors = {packed(class_color(n)) for n in names}
    for gt, pred in zip(gt_entities, pred_entities):
        assert set(column(table, gt, "Color")[0]) == {packed(GT_COLOR)}, gt
        pred_colors = set(column(table, pred, "Color")[0])
        assert pred_colors <= class_colors and len(pred_colors) > 1, pred
        (gt_radius,), (pred_radius,) = column(table, gt, "Radius")[0], column(table, pred, "Radius")[0]
        assert gt_radius < 0 and pred_radius < 0  # UI points: the same width at any zoom
        assert abs(pred_radius) >= 2 * abs(gt_radius)
    # predictions carry "class score" labels, shown; GT labels only on hover
    assert column(table, "world/ego/lidar/pred/boxes", "ShowLabels")[0] == [True]
    assert column(table, "world/ego/lidar/gt/boxes", "ShowLabels")[0] == [False]
    shown = column(table, "world/ego/lidar/pred/boxes", "Text")[0]
    assert all(label in {f"{n} {s:.2f}" for n, s in zip(names, scores)} for label in shown)
    cam_labels = column(table, "world/ego/lidar/CAM_FRONT/pred/labels", "Text")[0]
    assert cam_labels and set(cam_labels) <= {f"{n} {s:.2f}" for n, s in zip(names, scores)}
    assert column(table, "world/ego/lidar/CAM_FRONT/pred/labels", "ShowLabels")[0] == [True]
    # one label per predicted box drawn on the image, at the top of what is drawn of it
    pred_strips = column(table, "world/ego/lidar/CAM_FRONT/pred/boxes", "LineStrip2D")[0]
    label_at = np.asarray(column(table, "world/ego/lidar/CAM_FRONT/pred/labels", "Position2D")[0])
    drawn = np.concatenate([np.asarray(s) for s in pred_strips])
    assert point_to_segments(label_at, pred_strips).max() < 1e-3
    assert label_at[:, 1].min() == pytest.approx(drawn[:, 1].min(), abs=1e-3)
    # the BEV map is dimmed under the outlines
    assert 0 < column(table, "bev/pred/map", "Opacity")[0][0] < 1


# ---------------------------------------------------------------------------------------------------
# The 3D view: near the ego, following it


def test_3d_view_shows_what_is_near_the_ego(tmp_path):
    lidar2ego = LIDAR_MOUNTS["synthetic"]
    rng = np.random.default_rng(2)
    points = np.concatenate([rng.uniform(-70, 70, (3000, 2)), rng.uniform(-2, 5, (3000, 1)),
                             rng.uniform(0, 255, (3000, 1))], axis=1).astype(np.float32)
    boxes = np.zeros((4, 9))
    boxes[:, :2] = [[5, 5], [0, 29], [25, -25], [-60, 3]]  # the last two beyond 30 m
    boxes[:, 3:6] = [4.5, 1.9, 1.6]
    frames = []
    for n in range(5):  # driving 12 m per sample along global x, one scene
        ego2global = np.eye(4)
        ego2global[0, 3] = 12.0 * n
        frames.append(frame_with(lidar2ego, gt_boxes=boxes, gt_names=["car"] * 4, points=points,
                                 ego2global=ego2global, t_us=n * 500_000))
    out = write_rrd(tmp_path / "near.rrd", frames, MAP_CLASSES, [], LogOptions(view_range=30.0))
    table = read_table(out)
    logged = np.asarray(column(table, "world/ego/lidar/points", "Position3D")[0])
    near = np.hypot(points[:, 0], points[:, 1]) <= 30
    np.testing.assert_allclose(logged, points[near, :3], atol=1e-6)
    np.testing.assert_allclose(column(table, "world/ego/lidar/gt/boxes", "PoseTranslation3D")[0],
                               boxes[:2, :3], atol=1e-6)
    assert len(column(table, "world/ego/lidar/gt/velocity", "Vector3D")[0]) == 2
    # the BEV shows every box on the map (three: the fourth is 60 m behind)
    ends = np.array([s[-1] for s in column(table, "bev/gt/boxes", "LineStrip2D")[0]])
    assert len(ends) == 3
    # the ego path: the poses of the last 30 m
    path = np.asarray(column(table, "world/ego_trajectory", "LineStrip3D")[4][0])
    np.testing.assert_allclose(path[:, 0], [24.0, 36.0, 48.0])
    # view_range=None: everything
    out = write_rrd(tmp_path / "all.rrd", frames[:1], MAP_CLASSES, [], LogOptions(view_range=None))
    table = read_table(out)
    assert len(column(table, "world/ego/lidar/points", "Position3D")[0]) == len(points)
    assert len(column(table, "world/ego/lidar/gt/boxes", "PoseTranslation3D")[0]) == 4


def test_blueprint_frames_the_drive():
    cams = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
    sizes = {c: (1600, 900) for c in cams}
    bp = make_blueprint(cams, sizes, (200, 200))
    for panel in (bp.blueprint_panel, bp.selection_panel, bp.time_panel):
        assert str(panel.state).lower() == "collapsed"

    root = bp.root_container
    top, grid = root.contents
    assert type(root).__name__ == "Vertical" and type(grid).__name__ == "Grid"
    shares = np.asarray(root.row_shares, float)
    assert shares[1] / shares.sum() >= 0.5  # camera cells get half the height
    view3d, bev_gt, bev_pred = top.contents
    assert type(view3d).__name__ == "Spatial3DView"
    # the view's origin is the ego (it follows the ego), and the ego path (a sibling) is included
    assert str(view3d.origin) == "world/ego" and view3d.contents[0] == "/world/**"
    assert set(view3d.contents[1:]) == {f"- /world/ego/lidar/{c}/pred/labels" for c in cams}
    assert (bev_gt.name, bev_pred.name) == ("BEV GT", "BEV pred")
    assert "/bev/gt/boxes" in bev_pred.contents

    def bounds(view):
        return view.properties["VisualBounds2D"].range.as_arrow_array().to_pylist()

    assert bounds(bev_gt) == bounds(bev_pred) == [{"x_range": [0.0, 200.0], "y_range": [0.0, 200.0]}]
    assert [v.name for v in grid.contents] == ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT",
                                               "CAM_BACK", "CAM_BACK_RIGHT"]
    for view in grid.contents:
        assert view.contents == "$origin/**"
        assert bounds(view) == [{"x_range": [0.0, 1600.0], "y_range": [0.0, 900.0]}]
    assert grid.grid_columns == 3


def test_recording_carries_the_blueprint_with_image_sizes(viz_infos, tmp_path):
    """write_rrd builds the blueprint from the first frame: the camera views are bounded by its image sizes."""
    from bevfusion.visualization import recording

    root, written = viz_infos
    ds = NuScenesDataset(root, written["val"])
    seen = []
    original = recording.make_blueprint

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    from bevfusion.visualization import visualize_drive

    mp = pytest.MonkeyPatch()
    mp.setattr(recording, "make_blueprint", spy)
    try:
        visualize_drive(ds, out=tmp_path / "d.rrd", max_samples=1,
                        frame_options=FrameOptions(sweeps_num=0, max_points=10, gt_maps=False))
    finally:
        mp.undo()
    (args, _), = seen
    assert args[1] == {c: (400, 225) for c in ds.get_data_info(0)["camera_names"]}
    assert args[2] == (200, 200)

"""ObjectPaste / DataBaseSampler on a tiny ground-truth database written here."""
import numpy as np
import pytest
from shapely.geometry import Polygon

from bevfusion.structures.boxes import box_corners, internal_to_official, points_in_boxes_np
from bevfusion.utils.io import dump_pickle
from bevfusion.datasets.transforms.object_paste import DataBaseSampler, ObjectPaste, bev_boxes_overlap

CLASSES = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
           "pedestrian", "traffic_cone"]
SIZES = {"car": (4.5, 1.9, 1.6), "pedestrian": (0.7, 0.7, 1.8), "barrier": (0.5, 2.5, 1.0)}
GROUPS = {"car": 4, "pedestrian": 3, "barrier": 3}


def _random_boxes(rng, m, name, spread):
    b = np.zeros((m, 9))
    b[:, :2] = rng.uniform(-spread, spread, (m, 2))
    b[:, 2] = rng.uniform(-1.5, 0.5, m)
    b[:, 3:6] = np.array(SIZES[name]) * rng.uniform(0.8, 1.2, (m, 1))
    b[:, 6] = rng.uniform(-np.pi, np.pi, m)
    b[:, 7:9] = rng.normal(0, 2, (m, 2))
    return b


def _points_in_box(rng, box, n):
    local = rng.uniform(-0.45, 0.45, (n, 3)) * box[3:6]
    c, s = np.cos(box[6]), np.sin(box[6])
    rel = np.stack([local[:, 0] * c - local[:, 1] * s, local[:, 0] * s + local[:, 1] * c, local[:, 2]], 1)
    pts = np.zeros((n, 5), np.float32)
    pts[:, :3] = rel  # relative to the box centre, LiDAR axes
    pts[:, 3] = rng.uniform(0, 100, n)
    pts[:, 4] = rng.choice([0.0, 0.05, 0.1], n)
    return pts


@pytest.fixture(scope="module")
def db_root(tmp_path_factory):
    """A database crowded into ±12 m so that candidates collide often."""
    root = tmp_path_factory.mktemp("nuscenes")
    (root / "nuscenes_gt_database").mkdir()
    rng = np.random.default_rng(0)
    db = {}
    for name in SIZES:
        boxes = _random_boxes(rng, 25, name, 12.0)
        records = []
        for i, box in enumerate(boxes):
            n = int(rng.integers(1, 40))
            difficulty = -1 if i % 7 == 3 else 0
            pts = _points_in_box(rng, box, n)
            rel = f"nuscenes_gt_database/s{i}_{name}_{i}.bin"
            pts.tofile(root / rel)
            records.append({"name": name, "path": rel, "image_idx": f"s{i}", "gt_idx": i,
                            "box3d_lidar": internal_to_official(box[None])[0].astype(np.float32),
                            "num_points_in_gt": n, "difficulty": difficulty, "group_id": len(records)})
        db[name] = records
    dump_pickle(db, root / "nuscenes_dbinfos_train.pkl")
    return root, db


def _sampler_cfg(root):
    return {
        "dataset_root": str(root),
        "info_path": str(root / "nuscenes_dbinfos_train.pkl"),
        "rate": 1.0,
        "prepare": {"filter_by_difficulty": [-1], "filter_by_min_points": {n: 5 for n in SIZES}},
        "classes": CLASSES,
        "sample_groups": GROUPS,
        "points_loader": {"type": "LoadPointsFromFile", "coord_type": "LIDAR", "load_dim": 5, "use_dim": 5,
                          "reduce_beams": 32},
    }


def _scene(seed):
    rng = np.random.default_rng(seed)
    gt = np.concatenate([_random_boxes(rng, 2, "car", 14), _random_boxes(rng, 1, "pedestrian", 14)])
    labels = np.array([0, 0, 8], dtype=np.int64)
    pts = np.zeros((5000, 5), np.float32)
    pts[:, :3] = rng.uniform([-20, -20, -3], [20, 20, 2], (5000, 3))
    return {"points": pts, "gt_bboxes_3d": gt, "gt_labels_3d": labels,
            "gt_names": np.array(["car", "car", "pedestrian"]), "rng": np.random.default_rng(seed + 1)}


def _polygon(box):
    return Polygon(box_corners(box[None])[0, :4, :2])


def test_bev_overlap_matches_shapely():
    rng = np.random.default_rng(1)
    a = _random_boxes(rng, 60, "car", 6)
    b = _random_boxes(rng, 70, "barrier", 6)
    got = bev_boxes_overlap(a, b)
    pa, pb = [_polygon(x) for x in a], [_polygon(x) for x in b]
    area = np.array([[p.intersection(q).area for q in pb] for p in pa])
    clear = (area > 1e-6) | (area == 0)  # skip pairs that only graze each other
    np.testing.assert_array_equal(got[clear], area[clear] > 1e-6)
    assert got.any() and not got.all()
    # touching along an edge does not count; empty inputs are fine
    box = np.array([[0.0, 0, 0, 2, 2, 1, 0, 0, 0]])
    assert not bev_boxes_overlap(box, box + [2.0, 0, 0, 0, 0, 0, 0, 0, 0]).any()
    assert bev_boxes_overlap(box, box + [1.9, 0, 0, 0, 0, 0, 0.3, 0, 0]).all()
    assert bev_boxes_overlap(np.zeros((0, 9)), box).shape == (0, 1)


@pytest.mark.parametrize("seed", range(12))
def test_paste_no_overlap_and_only_object_points_inside(db_root, seed):
    root, db = db_root
    paste = ObjectPaste(db_sampler=_sampler_cfg(root), stop_epoch=20)
    paste.set_epoch(0)
    r = _scene(seed)
    gt0, labels0, pts0 = r["gt_bboxes_3d"].copy(), r["gt_labels_3d"].copy(), r["points"].copy()
    out = paste(r)
    boxes, labels, names = out["gt_bboxes_3d"], out["gt_labels_3d"], out["gt_names"]
    n0 = len(gt0)
    np.testing.assert_array_equal(boxes[:n0], gt0)
    np.testing.assert_array_equal(labels[:n0], labels0)
    new, new_labels = boxes[n0:], labels[n0:]
    assert len(new) > 0
    assert [CLASSES[i] for i in new_labels] == list(names[n0:])
    # per-class counts never exceed the group maximum
    for name, max_num in GROUPS.items():
        assert (labels == CLASSES.index(name)).sum() <= max(max_num, (labels0 == CLASSES.index(name)).sum())
    # no pasted box overlaps an existing box or another pasted box (independent shapely test)
    polys = [_polygon(b) for b in boxes]
    for i in range(n0, len(boxes)):
        for j in range(len(boxes)):
            if j != i:
                assert polys[i].intersection(polys[j]).area < 1e-6, (i, j)
    # each pasted box holds exactly its database object's points; filtered records are never used
    by_centre = {}
    for name in SIZES:
        for rec in db[name]:
            by_centre[tuple(np.round(rec["box3d_lidar"][:2].astype(np.float64), 3))] = rec
    inside = points_in_boxes_np(out["points"][:, :3], new)
    for k, box in enumerate(new):
        rec = by_centre[tuple(np.round(box[:2], 3))]
        assert rec["difficulty"] != -1 and rec["num_points_in_gt"] >= 5
        obj = np.fromfile(root / rec["path"], dtype=np.float32).reshape(-1, 5)
        obj[:, :3] += box[:3].astype(np.float32)
        got = out["points"][inside[:, k]]
        assert len(got) == len(obj)
        np.testing.assert_allclose(got[np.lexsort(got.T)], obj[np.lexsort(obj.T)], atol=1e-5)
    # scene points outside the pasted boxes are all kept
    keep = ~points_in_boxes_np(pts0[:, :3], new).any(1)
    rest = out["points"][~inside.any(1)]
    assert len(rest) == keep.sum()


def test_collisions_are_rejected_sometimes(db_root):
    """The crowded database must produce rejected candidates (else the overlap test is untested)."""
    root, _ = db_root
    sampler = DataBaseSampler(**{k: v for k, v in _sampler_cfg(root).items()})
    short = 0
    for seed in range(15):
        r = _scene(seed)
        res = sampler.sample_all(r["gt_bboxes_3d"], r["gt_labels_3d"], np.random.default_rng(seed))
        requested = sum(GROUPS.values()) - 3
        short += res is None or len(res["gt_bboxes_3d"]) < requested
    assert short > 0


def test_stop_epoch_and_default_never_pastes(db_root):
    root, _ = db_root
    paste = ObjectPaste(db_sampler=_sampler_cfg(root), stop_epoch=2)
    for epoch, pasted in ((0, True), (1, True), (2, False), (5, False)):
        paste.set_epoch(epoch)
        r = _scene(3)
        n = len(paste(r)["gt_bboxes_3d"])
        assert (n > 3) == pasted, epoch
    # the official default: stop_epoch -1 and the epoch starting at -1 (no set_epoch) skip pasting,
    # without even reading the (here missing) database
    missing = dict(_sampler_cfg(root), info_path=str(root / "missing.pkl"))
    paste = ObjectPaste(db_sampler=missing, stop_epoch=-1)
    r = _scene(4)
    assert len(paste(r)["gt_bboxes_3d"]) == 3


def test_filters_and_queue(db_root):
    root, db = db_root
    sampler = DataBaseSampler(**_sampler_cfg(root))
    for name in SIZES:
        expected = [r["path"] for r in db[name] if r["difficulty"] != -1 and r["num_points_in_gt"] >= 5]
        assert [r["path"] for r in sampler.db_infos[name]] == expected
    # drawing walks through a shuffled queue: every record once before any repeats
    rng = np.random.default_rng(0)
    n = len(sampler.db_infos["car"])
    seen = []
    while len(seen) < n:
        seen += [r["path"] for r in sampler._draw("car", 3, rng)]
    assert sorted(seen) == sorted(r["path"] for r in sampler.db_infos["car"])


def test_rejects_unknown_settings(tmp_path):
    with pytest.raises(ValueError, match="sample_2d"):
        ObjectPaste(db_sampler={"info_path": "x", "dataset_root": None, "rate": 1.0, "prepare": {},
                                "sample_groups": {}}, sample_2d=True)
    with pytest.raises(ValueError, match="unknown filter"):
        DataBaseSampler("x", None, 1.0, {"filter_by_size": 1}, {"car": 2}, CLASSES)

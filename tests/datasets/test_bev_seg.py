"""LoadBEVSegmentation against the devkit and against point-in-polygon tests of the cell centres.

A small map-expansion JSON is written here (so the test runs without the synthetic drive); when the
`synthetic_root` fixture exists (tests/conftest.py) the same checks also run on its maps.
"""
import json

import numpy as np
import pytest

pytest.importorskip("nuscenes.map_expansion.map_api")
import shapely  # noqa: E402
from shapely.geometry import LineString, Point, Polygon  # noqa: E402

from bevfusion.datasets.transforms.augment import GlobalRotScaleTrans, RandomFlip3D  # noqa: E402
from bevfusion.datasets.transforms.bev_seg import (  # noqa: E402
    LoadBEVSegmentation, MapRaster, get_map_raster, get_nuscenes_map)
from bevfusion.structures.geometry import make_transform, yaw_to_quaternion  # noqa: E402

MAP_CLASSES = ["drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "divider"]
BOUND = [-50.0, 50.0, 0.5]
CENTRE = np.array([1000.0, 800.0])  # where the ego drives in the hand-written map


def _write_map(root, location="boston-seaport"):
    """A map-expansion JSON (format 1.3) with a few polygons per layer and two divider lines."""
    rng = np.random.default_rng(0)
    js = {"version": "1.3", "canvas_edge": [3000.0, 3000.0], "polygon": [], "line": [], "node": [],
          "drivable_area": [], "road_segment": [], "road_block": [], "lane": [], "ped_crossing": [],
          "walkway": [], "stop_line": [], "carpark_area": [], "road_divider": [], "lane_divider": [],
          "traffic_light": [], "arcline_path_3": {}, "connectivity": {}, "lane_connector": []}
    shapes = {}

    def nodes(coords):
        tokens = []
        for x, y in coords:
            tok = f"n{len(js['node'])}"
            js["node"].append({"token": tok, "x": float(x), "y": float(y)})
            tokens.append(tok)
        return tokens

    def polygon(coords, hole=None):
        tok = f"p{len(js['polygon'])}"
        holes = [{"node_tokens": nodes(hole)}] if hole is not None else []
        js["polygon"].append({"token": tok, "exterior_node_tokens": nodes(coords), "holes": holes})
        return tok

    def rect(cx, cy, w, h, yaw):
        c, s = np.cos(yaw), np.sin(yaw)
        loc = np.array([[w, h], [-w, h], [-w, -h], [w, -h]]) / 2
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in loc]

    # drivable area: a big cross-shaped road with a hole, plus a second piece
    cross = [(-60, -8), (-8, -8), (-8, -60), (8, -60), (8, -8), (60, -8), (60, 8), (8, 8), (8, 60), (-8, 60),
             (-8, 8), (-60, 8)]
    cross = [(CENTRE[0] + x, CENTRE[1] + y) for x, y in cross]
    hole = [(CENTRE[0] + x, CENTRE[1] + y) for x, y in [(-3, -3), (3, -3), (3, 3), (-3, 3)]]
    extra = rect(CENTRE[0] + 30, CENTRE[1] + 30, 20, 12, 0.4)
    js["drivable_area"].append({"token": "da0", "polygon_tokens": [polygon(cross, hole), polygon(extra)]})
    shapes["drivable_area"] = [Polygon(cross, [hole]), Polygon(extra)]
    for layer, n, size in (("ped_crossing", 3, (12, 4)), ("walkway", 4, (30, 5)), ("carpark_area", 2, (25, 18)),
                           ("stop_line", 3, (6, 2))):
        shapes[layer] = []
        for i in range(n):
            r = rect(*(CENTRE + rng.uniform(-40, 40, 2)), *size, rng.uniform(-np.pi, np.pi))
            rec = {"token": f"{layer}{i}", "polygon_token": polygon(r)}
            if layer == "stop_line":
                rec.update(stop_line_type="STOP_SIGN", ped_crossing_tokens=[], traffic_light_tokens=[])
            if layer == "walkway" or layer == "carpark_area":
                rec.setdefault("road_block_token", "")
            js[layer].append(rec)
            shapes[layer].append(Polygon(r))
    # dividers: a road divider crossing the whole patch and a lane divider that leaves and re-enters it
    lines = {"road_divider": [[CENTRE + (-90, 2), CENTRE + (90, -3)]],
             "lane_divider": [[CENTRE + (-30, -70), CENTRE + (-20, 20), CENTRE + (-5, 80), CENTRE + (10, 20),
                               CENTRE + (40, -30)]]}
    for layer, ls in lines.items():
        for i, coords in enumerate(ls):
            tok = f"l{len(js['line'])}"
            js["line"].append({"token": tok, "node_tokens": nodes(coords)})
            js[layer].append({"token": f"{layer}{i}", "line_token": tok})
        shapes[layer] = [LineString(c) for c in ls]
    path = root / "maps" / "expansion"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{location}.json").write_text(json.dumps(js))
    return shapes


@pytest.fixture(scope="module")
def map_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("maproot")
    return root, _write_map(root)


def _sample(seed, centre=CENTRE, location="boston-seaport"):
    rng = np.random.default_rng(seed)
    ego_yaw = rng.uniform(-np.pi, np.pi)
    ego2global = make_transform(yaw_to_quaternion(ego_yaw), [*(centre + rng.uniform(-5, 5, 2)), 0.0])
    lidar2ego = make_transform(yaw_to_quaternion(rng.uniform(-0.3, 0.3) - np.pi / 2), [0.9, 0.0, 1.8])
    return {"location": location, "token": f"t{seed}", "ego2global": ego2global, "lidar2ego": lidar2ego,
            "lidar_aug_matrix": np.eye(4), "points": np.zeros((0, 5), np.float32),
            "gt_bboxes_3d": np.zeros((0, 9)), "rng": np.random.default_rng(seed + 7)}


def _cell_centres_global(r):
    """(X, Y, 2) global xy of every BEV cell centre, scale of the augmentation ignored (upstream)."""
    T = r["ego2global"] @ r["lidar2ego"] @ np.linalg.inv(r["lidar_aug_matrix"])
    A = T[:2, :2] / np.linalg.norm(T[:3, 0])  # rotation (and reflection) of the augmented frame, unit scale
    c = BOUND[0] + BOUND[2] * (np.arange(200) + 0.5)
    xy = np.stack(np.meshgrid(c, c, indexing="ij"), -1)  # [x, y]
    return xy @ A.T + T[:2, 3]


def _check_against_polygons(mask, shapes, centres, layers):
    """Cells away from every boundary must equal point-in-polygon of the cell centre.

    The devkit rounds vertices to whole canvas pixels and cv2 fills pixels whose *corner* (not centre)
    is inside, edges included: up to about one cell (0.5 m) of disagreement next to a boundary.
    """
    x, y = centres[..., 0].ravel(), centres[..., 1].ravel()
    pts = shapely.points(x, y)
    for k, name in enumerate(layers):
        if name == "divider":
            continue
        polys = shapes[name]
        inside = np.zeros(len(x), bool)
        dist = np.full(len(x), np.inf)
        for p in polys:
            inside |= shapely.contains_xy(p, x, y)
            dist = np.minimum(dist, shapely.distance(p.boundary, pts))
        far = dist > 1.2
        np.testing.assert_array_equal(mask[k].ravel()[far], inside[far], err_msg=name)
        assert inside[far].any() or name == "stop_line"


@pytest.mark.parametrize("seed", range(3))
def test_masks_match_devkit_and_point_in_polygon(map_root, seed):
    root, shapes = map_root
    r = _sample(seed)
    r = GlobalRotScaleTrans([0.9, 1.1], [-0.785, 0.785], 0.5, True)(r)
    out = LoadBEVSegmentation(str(root), BOUND, BOUND, MAP_CLASSES)(r)
    masks = out["gt_masks_bev"]
    assert masks.shape == (6, 200, 200) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}

    # the devkit's own rasterisation, with the pose computed here from the augmented frame's origin
    # and x axis
    T = r["ego2global"] @ r["lidar2ego"] @ np.linalg.inv(r["lidar_aug_matrix"])
    origin = T @ np.array([0, 0, 0, 1.0])
    ahead = T @ np.array([1, 0, 0, 1.0])
    angle = np.degrees(np.arctan2(ahead[1] - origin[1], ahead[0] - origin[0]))
    nusc_map = get_nuscenes_map(root, "boston-seaport")
    box = (origin[0], origin[1], 100.0, 100.0)
    for k, name in enumerate(MAP_CLASSES[:5]):
        ref = nusc_map.get_map_mask(box, angle, [name], (200, 200))[0].T
        np.testing.assert_array_equal(masks[k], ref, err_msg=name)
    # the road divider stays one piece inside the patch, which the devkit's line path can draw. Its
    # pixels truncate coordinates to int, so a 1e-12° different angle can move a line end by a pixel:
    # compare up to one cell.
    ref = nusc_map.get_map_mask(box, angle, ["road_divider"], (200, 200))[0].T.astype(bool)
    grown = masks[5].astype(bool).copy()
    for axis in (0, 1):
        for shift in (-1, 1):
            grown |= np.roll(masks[5].astype(bool), shift, axis=axis)
    assert ref.any() and grown[ref].all()

    # independent geometry: cell centres inside the polygons (away from boundaries)
    _check_against_polygons(masks, shapes, _cell_centres_global(r), MAP_CLASSES)
    # dividers: every divider cell is within ~2 cells of a divider line
    flat = _cell_centres_global(r).reshape(-1, 2)
    lines = shapes["road_divider"] + shapes["lane_divider"]
    on = masks[5].reshape(-1).astype(bool)
    assert on.sum() > 100
    d = np.min([shapely.distance(ln, shapely.points(flat[on])) for ln in lines], axis=0)
    assert d.max() < 1.5


def test_flip_before_equals_flip_after(map_root):
    """Rendering in a mirrored frame equals mirroring the rendered mask (the order used upstream)."""
    root, _ = map_root
    seg = LoadBEVSegmentation(str(root), BOUND, BOUND, MAP_CLASSES)
    for flip_y, flip_x in ((True, False), (False, True), (True, True)):
        r = _sample(11)
        after = RandomFlip3D.apply(seg(dict(r)), flip_y, flip_x)["gt_masks_bev"]
        r2 = RandomFlip3D.apply(_sample(11), flip_y, flip_x)
        before = seg(r2)["gt_masks_bev"]
        agree = (before == after).mean()
        assert agree > 0.99, (flip_y, flip_x, agree)


def test_map_cache_and_errors(map_root, tmp_path):
    root, _ = map_root
    assert get_nuscenes_map(root, "boston-seaport") is get_nuscenes_map(str(root), "boston-seaport")
    seg = LoadBEVSegmentation(str(tmp_path), BOUND, BOUND, MAP_CLASSES)
    with pytest.raises(FileNotFoundError, match="boston-seaport"):
        seg(_sample(0))
    r = _sample(0)
    r["location"] = None
    with pytest.raises(KeyError, match="location"):
        LoadBEVSegmentation(str(root), BOUND, BOUND, MAP_CLASSES)(r)


def test_synthetic_drive_maps(request):
    """Same devkit agreement on the synthetic drive's maps, when the fixture is available."""
    try:
        root = request.getfixturevalue("synthetic_root")
    except pytest.FixtureLookupError:
        pytest.skip("synthetic_root fixture not available")
    files = sorted((root / "maps" / "expansion").glob("*.json")) if hasattr(root, "__truediv__") else []
    if not files:
        pytest.skip("synthetic drive has no map-expansion files")
    location = files[0].stem
    nusc_map = get_nuscenes_map(root, location)
    nodes = np.array([[n["x"], n["y"]] for n in nusc_map.node])
    centre = nodes.mean(0)
    r = _sample(1, centre=centre, location=location)
    r = GlobalRotScaleTrans([0.9, 1.1], [-0.785, 0.785], 0.5, True)(r)
    masks = LoadBEVSegmentation(str(root), BOUND, BOUND, MAP_CLASSES)(r)["gt_masks_bev"]
    T = r["ego2global"] @ r["lidar2ego"] @ np.linalg.inv(r["lidar_aug_matrix"])
    origin, ahead = T @ np.array([0, 0, 0, 1.0]), T @ np.array([1, 0, 0, 1.0])
    angle = np.degrees(np.arctan2(ahead[1] - origin[1], ahead[0] - origin[0]))
    for k, name in enumerate(MAP_CLASSES[:5]):
        ref = nusc_map.get_map_mask((origin[0], origin[1], 100.0, 100.0), angle, [name], (200, 200))[0].T
        np.testing.assert_array_equal(masks[k], ref, err_msg=name)
    assert masks[0].any() and not masks[0].all()  # some drivable area around the map's centre


def _devkit_layer_mask(nusc_map, box, angle, layer, canvas):
    """The devkit's mask of one layer, or None where its line path cannot draw (a multi-part clip)."""
    try:
        return nusc_map.get_map_mask(box, angle, [layer], canvas)[0]
    except TypeError:  # shapely 2: the devkit iterates a MultiLineString
        return None


def _compare_raster_with_devkit(root, location, centre, rng, n_patches, spread):
    nusc_map = get_nuscenes_map(root, location)
    raster = MapRaster(nusc_map)
    layers = list(MapRaster.POLYGON_LAYERS) + ["road_divider", "lane_divider"]
    compared = {name: 0 for name in layers}
    for _ in range(n_patches):
        x, y = centre + rng.uniform(-spread, spread, 2)
        h, w = rng.choice([60.0, 100.0]), rng.choice([100.0, 80.0])
        box, angle = (x, y, h, w), float(rng.uniform(-180, 180))
        canvas = (int(h / rng.choice([0.5, 0.4])), int(w / 0.5))
        ours = raster.masks(box, angle, layers, canvas)
        for name in layers:
            ref = _devkit_layer_mask(nusc_map, box, angle, name, canvas)
            if ref is None:
                continue
            np.testing.assert_array_equal(ours[name], ref, err_msg=f"{location} {name} box={box} angle={angle}")
            compared[name] += int(ref.any())
    return compared


def test_map_raster_equals_devkit_masks(map_root):
    """MapRaster reproduces NuScenesMap.get_map_mask bit for bit: every layer, rotated patches of
    several sizes and resolutions, holes, lines leaving the patch."""
    root, _ = map_root
    compared = _compare_raster_with_devkit(root, "boston-seaport", CENTRE, np.random.default_rng(5), 12, 40.0)
    for name in ("drivable_area", "ped_crossing", "walkway", "carpark_area", "road_divider"):
        assert compared[name] > 0, (name, compared)  # the layer was non-empty in some patches
    raster = get_map_raster(root, "boston-seaport")
    assert raster is get_map_raster(str(root), "boston-seaport")
    with pytest.raises(ValueError, match="not a map layer"):
        raster.masks((CENTRE[0], CENTRE[1], 100.0, 100.0), 0.0, ["roads"], (200, 200))


def test_map_raster_equals_devkit_on_synthetic_maps(synthetic_root):
    files = sorted((synthetic_root / "maps" / "expansion").glob("*.json"))
    assert files
    totals = {}
    for i, f in enumerate(files[:2]):
        nodes = np.array([[n["x"], n["y"]] for n in get_nuscenes_map(synthetic_root, f.stem).node])
        compared = _compare_raster_with_devkit(synthetic_root, f.stem, nodes.mean(0), np.random.default_rng(i), 4,
                                               0.3 * np.ptp(nodes, axis=0).min())
        for k, v in compared.items():
            totals[k] = totals.get(k, 0) + v
    for name in ("drivable_area", "road_segment", "lane", "ped_crossing", "walkway", "lane_divider"):
        assert totals[name] > 0, (name, totals)


def test_nested_clip_results_are_drawn_part_by_part():
    """A clip can give a collection holding a multi-polygon and a line; every polygon in it is drawn."""
    from shapely.geometry import GeometryCollection, MultiPolygon

    from bevfusion.datasets.transforms.bev_seg import _simple_parts

    a, b = Polygon([(0, 0), (1, 0), (1, 1)]), Polygon([(2, 2), (3, 2), (3, 3)])
    nested = GeometryCollection([MultiPolygon([a, b]), LineString([(0, 0), (1, 1)]), GeometryCollection([Point(1, 1)])])
    assert [g.geom_type for g in _simple_parts(nested)] == ["Polygon", "Polygon", "LineString", "Point"]
    assert _simple_parts(a)[0].equals(a) and len(_simple_parts(a)) == 1

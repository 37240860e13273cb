"""The static world of one map: a grid of two-way roads, walkways, crossings, car parks, buildings.

Geometry is defined in a map-local frame (u, v) [m] and placed in the nuScenes global frame by a
rotation `angle` and an `origin`: global = R(angle) @ (u, v) + origin, ground at z = 0.

Cross-section of a road (lateral distance from its centre line, either side):
    [0, 7)       two driving lanes of 3.5 m per direction (lane 0 beside the centre line)
    [7, 9.5)     kerb lane (parking, construction zones, cones and barriers)
    [9.5, 13.5)  walkway; pedestrian crossings continue the walkways across side roads
Intersections are squares of half-size 9.5 m around grid nodes; stop lines sit 0.5 m behind the
crossings on the incoming half of each arm. Each block holds two car parks (at its low-u/low-v and
high-u/high-v corners, so every road side is lined by one) and two buildings.

`MapWorld.expansion_json()` writes the same geometry as a nuScenes map-expansion (version 1.3) and
`MapWorld.basemap()` the 0.1 m/px drivable-surface PNG that the devkit's `MapMask` reads; the
camera/LiDAR kernels use `ground_params()` to shade exactly the same layout.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# nuScenes map names; the devkit hard-codes their sizes [m] (used when no patch is given).
MAP_NAMES = ("singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown", "boston-seaport")
MAP_DIMS = {"singapore-onenorth": (1585.6, 2025.0), "singapore-hollandvillage": (2808.3, 2922.9),
            "singapore-queenstown": (3228.6, 3687.1), "boston-seaport": (2979.5, 2118.1)}

SPACING = 100.0  # road centre line to the next one
LANE = 3.5
KERB = 2.5
HALF_ROAD = 2 * LANE + KERB  # 9.5
WALK = 4.0
STOP_FROM, STOP_TO = HALF_ROAD + WALK + 0.5, HALF_ROAD + WALK + 1.0
CARPARK = 30.0
BASEMAP_RES = 0.1  # m/px, what MapMask assumes


def _token(*parts) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


@dataclass
class Building:
    center: tuple[float, float]  # local
    size: tuple[float, float, float]  # (du, dv, height)


@dataclass
class MapWorld:
    """One map's road grid: roads at u = i*SPACING and v = j*SPACING for i, j in 0..n."""

    name: str
    n: int
    angle: float
    origin: np.ndarray  # (2,)
    left_hand: bool
    buildings: list[Building] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, n: int, rng: np.random.Generator) -> "MapWorld":
        angle = float(rng.uniform(-0.5, 0.5) + rng.integers(0, 4) * np.pi / 2)
        world = cls(name=name, n=n, angle=angle, origin=np.zeros(2), left_hand=name.startswith("singapore"))
        ext = n * SPACING + HALF_ROAD + WALK
        # Place the grid's bounding box at 40 m from the global origin (all coordinates positive).
        c = world.to_global_2d(np.array([[-HALF_ROAD - WALK, -HALF_ROAD - WALK], [ext, -HALF_ROAD - WALK],
                                         [-HALF_ROAD - WALK, ext], [ext, ext]]))
        world.origin = 40.0 - c.min(0)
        for bi in range(n):
            for bj in range(n):
                lo = HALF_ROAD + WALK + 2.0
                hi = SPACING / 2 - 2.0
                for qu, qv in ((1, 0), (0, 1)):  # the two quadrants without car parks
                    du, dv = rng.uniform(14.0, hi - lo, size=2)
                    cu = bi * SPACING + (lo + du / 2 if qu == 0 else SPACING - lo - du / 2)
                    cv = bj * SPACING + (lo + dv / 2 if qv == 0 else SPACING - lo - dv / 2)
                    world.buildings.append(Building((cu, cv), (du, dv, float(rng.uniform(6.0, 30.0)))))
        return world

    # ---- frames -----------------------------------------------------------------------------------
    @property
    def rotation(self) -> np.ndarray:
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.array([[c, -s], [s, c]])

    def to_global_2d(self, uv: np.ndarray) -> np.ndarray:
        return np.asarray(uv, dtype=np.float64) @ self.rotation.T + self.origin

    def to_global_yaw(self, yaw_local: float) -> float:
        return float(np.arctan2(np.sin(yaw_local + self.angle), np.cos(yaw_local + self.angle)))

    @property
    def side(self) -> float:
        """+1 where traffic keeps right (Boston), -1 where it keeps left (Singapore)."""
        return -1.0 if self.left_hand else 1.0

    @property
    def extent(self) -> float:
        return self.n * SPACING

    def ground_params(self) -> np.ndarray:
        """Float64 parameters of the analytic ground shader (see kernels.ground_class)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.array([self.origin[0], self.origin[1], c, s, SPACING, float(self.n), HALF_ROAD, LANE,
                         WALK, CARPARK, self.side], dtype=np.float64)

    def building_boxes(self) -> np.ndarray:
        """(B, 7) global boxes (x, y, z, length, width, height, yaw) of the buildings."""
        out = np.zeros((len(self.buildings), 7))
        for i, b in enumerate(self.buildings):
            xy = self.to_global_2d(np.array(b.center))
            out[i] = (xy[0], xy[1], b.size[2] / 2, b.size[0], b.size[1], b.size[2], self.angle)
        return out

    def carparks(self) -> list[tuple[float, float, float, float]]:
        """Local rectangles (u0, v0, u1, v1) of the car parks."""
        lo, hi = HALF_ROAD + WALK, HALF_ROAD + WALK + CARPARK
        out = []
        for bi in range(self.n):
            for bj in range(self.n):
                u, v = bi * SPACING, bj * SPACING
                out.append((u + lo, v + lo, u + hi, v + hi))
                out.append((u + SPACING - hi, v + SPACING - hi, u + SPACING - lo, v + SPACING - lo))
        return out

    # ---- map expansion ----------------------------------------------------------------------------
    def expansion_json(self) -> dict:
        """The map-expansion record set (version 1.3) with every layer NuScenesMap loads."""
        b = _ExpansionBuilder(self)
        S, n, hw = SPACING, self.n, HALF_ROAD
        side = self.side
        da_polys: list[str] = []
        seg_tokens: dict[tuple, str] = {}
        # Intersections.
        for i in range(n + 1):
            for j in range(n + 1):
                p = b.rect(i * S - hw, j * S - hw, i * S + hw, j * S + hw)
                da_polys.append(p)
                seg_tokens[("x", i, j)] = b.record("road_segment", polygon_token=p, is_intersection=True,
                                                   drivable_area_token="")
        # Road segments along u (axis 0, road index j, between nodes i and i+1) and along v (axis 1).
        for axis in (0, 1):
            for j in range(n + 1):
                for i in range(n):
                    a0, a1 = i * S + hw, (i + 1) * S - hw
                    c = j * S
                    p = b.rect_axis(axis, a0, c - hw, a1, c + hw)
                    da_polys.append(p)
                    seg = b.record("road_segment", polygon_token=p, is_intersection=False, drivable_area_token="")
                    seg_tokens[(axis, i, j)] = seg
                    b.line_record("road_divider", axis, [(a0, c), (a1, c)], road_segment_token=seg)
                    for d in (1, -1):  # travel direction along the axis
                        # Lateral offsets toward the driver's right: right of heading +u is -v.
                        sgn = -d * side if axis == 0 else d * side
                        start, end = (a0, a1) if d == 1 else (a1, a0)
                        from_edge = b.line_axis(axis, [(start, c), (start, c + sgn * hw)])
                        to_edge = b.line_axis(axis, [(end, c), (end, c + sgn * hw)])
                        b.record("road_block", polygon_token=b.rect_axis(axis, a0, c, a1, c + sgn * hw),
                                 from_edge_line_token=from_edge, to_edge_line_token=to_edge,
                                 road_segment_token=seg)
                        div_nodes = {}
                        for k, lat in ((1, LANE), (2, 2 * LANE)):
                            nodes = [b.node_axis(axis, a, c + sgn * lat) for a in (start, end)]
                            div_nodes[k] = nodes
                            b.records["lane_divider"].append({
                                "token": _token(self.name, "lane_divider", len(b.records["lane_divider"])),
                                "line_token": b.line_from_nodes(nodes),
                                "lane_divider_segments": [{"node_token": t, "segment_type": "DOUBLE_DASHED_WHITE"}
                                                          for t in nodes]})
                        centre_nodes = [b.node_axis(axis, a, c) for a in (start, end)]
                        for k in (0, 1):
                            left = centre_nodes if k == 0 else div_nodes[1]
                            right = div_nodes[k + 1]
                            lane = b.record(
                                "lane", polygon_token=b.rect_axis(axis, a0, c + sgn * k * LANE, a1,
                                                                  c + sgn * (k + 1) * LANE),
                                lane_type="CAR", from_edge_line_token=from_edge, to_edge_line_token=to_edge,
                                left_lane_divider_segments=[{"node_token": t, "segment_type": "NIL"} for t in left],
                                right_lane_divider_segments=[{"node_token": t, "segment_type": "NIL"}
                                                             for t in right])
                            lat = c + sgn * (k + 0.5) * LANE
                            p0 = b.local_axis(axis, start, lat)
                            p1 = b.local_axis(axis, end, lat)
                            yaw = float(np.arctan2(p1[1] - p0[1], p1[0] - p0[0]) + self.angle)
                            g0, g1 = self.to_global_2d(p0), self.to_global_2d(p1)
                            b.arclines[lane] = [{"start_pose": [float(g0[0]), float(g0[1]), yaw],
                                                 "end_pose": [float(g1[0]), float(g1[1]), yaw],
                                                 "shape": "LSR", "radius": 999.999,
                                                 "segment_length": [0.0, float(a1 - a0), 0.0]}]
                            b.connectivity[lane] = {"incoming": [], "outgoing": []}
                    # Walkways on both sides.
                    for sgn in (1, -1):
                        lo, hi = sorted((c + sgn * hw, c + sgn * (hw + WALK)))
                        b.record("walkway", polygon_token=b.rect_axis(axis, a0, lo, a1, hi))
        b.record("drivable_area", polygon_tokens=da_polys)
        # Crossings and stop lines on every arm of every intersection.
        for i in range(n + 1):
            for j in range(n + 1):
                for axis in (0, 1):
                    node_a, c = (i, j) if axis == 0 else (j, i)
                    for arm in (1, -1):
                        seg_i = node_a if arm == 1 else node_a - 1
                        if seg_i < 0 or seg_i >= n:
                            continue
                        seg = seg_tokens[(axis, seg_i, c)]
                        a = node_a * S
                        lo, hi = sorted((a + arm * hw, a + arm * (hw + WALK)))
                        pc = b.record("ped_crossing", polygon_token=b.rect_axis(axis, lo, c * S - hw, hi, c * S + hw),
                                      road_segment_token=seg)
                        # Traffic on this arm heading to the node travels in direction -arm.
                        d = -arm
                        sgn = -d * side if axis == 0 else d * side
                        lo, hi = sorted((a + arm * STOP_FROM, a + arm * STOP_TO))
                        lat0, lat1 = sorted((c * S, c * S + sgn * 2 * LANE))
                        b.record("stop_line", polygon_token=b.rect_axis(axis, lo, lat0, hi, lat1),
                                 stop_line_type="PED_CROSSING", ped_crossing_tokens=[pc], traffic_light_tokens=[],
                                 road_block_token="")
        for (u0, v0, u1, v1) in self.carparks():
            b.record("carpark_area", polygon_token=b.rect(u0, v0, u1, v1), orientation=float(self.angle),
                     road_block_token="")
        return b.finish()

    def basemap(self):
        """The 0.1 m/px semantic prior PNG (drivable surface 255) as a PIL image, global frame."""
        from PIL import Image, ImageDraw

        hw, S, n = HALF_ROAD, SPACING, self.n
        ext = n * S
        strips = [(-hw, j * S - hw, ext + hw, j * S + hw) for j in range(n + 1)]
        strips += [(j * S - hw, -hw, j * S + hw, ext + hw) for j in range(n + 1)]
        polys = [self.to_global_2d(np.array([[a, b], [c, b], [c, d], [a, d]])) for a, b, c, d in strips]
        pts = np.concatenate(polys)
        width = int(np.ceil((pts[:, 0].max() + 40.0) / BASEMAP_RES))
        height = int(np.ceil((pts[:, 1].max() + 40.0) / BASEMAP_RES))
        img = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(img)
        for poly in polys:
            px = poly[:, 0] / BASEMAP_RES
            py = height - poly[:, 1] / BASEMAP_RES
            draw.polygon([(float(x), float(y)) for x, y in zip(px, py)], fill=255)
        return img


class _ExpansionBuilder:
    LAYERS = ("polygon", "line", "node", "drivable_area", "road_segment", "road_block", "lane", "ped_crossing",
              "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider", "traffic_light",
              "lane_connector")

    def __init__(self, world: MapWorld):
        self.world = world
        self.records: dict[str, list] = {k: [] for k in self.LAYERS}
        self.arclines: dict[str, list] = {}
        self.connectivity: dict[str, dict] = {}
        self._nodes: dict[tuple, str] = {}

    def _new_token(self, layer: str) -> str:
        return _token(self.world.name, layer, len(self.records[layer]))

    @staticmethod
    def local_axis(axis: int, a: float, c: float) -> np.ndarray:
        return np.array([a, c]) if axis == 0 else np.array([c, a])

    def node(self, u: float, v: float) -> str:
        key = (round(u, 3), round(v, 3))
        if key not in self._nodes:
            g = self.world.to_global_2d(np.array([u, v]))
            tok = self._new_token("node")
            self.records["node"].append({"token": tok, "x": float(g[0]), "y": float(g[1])})
            self._nodes[key] = tok
        return self._nodes[key]

    def node_axis(self, axis: int, a: float, c: float) -> str:
        u, v = self.local_axis(axis, a, c)
        return self.node(u, v)

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> str:
        nodes = [self.node(u0, v0), self.node(u1, v0), self.node(u1, v1), self.node(u0, v1)]  # CCW
        tok = self._new_token("polygon")
        self.records["polygon"].append({"token": tok, "exterior_node_tokens": nodes, "holes": []})
        return tok

    def rect_axis(self, axis: int, a0: float, c0: float, a1: float, c1: float) -> str:
        a0, a1 = sorted((a0, a1))
        c0, c1 = sorted((c0, c1))
        return self.rect(a0, c0, a1, c1) if axis == 0 else self.rect(c0, a0, c1, a1)

    def line_from_nodes(self, nodes: list[str]) -> str:
        tok = self._new_token("line")
        self.records["line"].append({"token": tok, "node_tokens": list(nodes)})
        return tok

    def line_axis(self, axis: int, pts: list[tuple[float, float]]) -> str:
        return self.line_from_nodes([self.node_axis(axis, a, c) for a, c in pts])

    def line_record(self, layer: str, axis: int, pts, **fields) -> str:
        tok = self._new_token(layer)
        self.records[layer].append({"token": tok, "line_token": self.line_axis(axis, pts), **fields})
        return tok

    def record(self, layer: str, **fields) -> str:
        tok = self._new_token(layer)
        self.records[layer].append({"token": tok, **fields})
        return tok

    def finish(self) -> dict:
        out = {"version": "1.3", "canvas_edge": list(MAP_DIMS[self.world.name])}
        out.update(self.records)
        out["arcline_path_3"] = self.arclines
        out["connectivity"] = self.connectivity
        return out

"""The ten detection classes and the traffic of one scene.

Every agent moves on a straight line at constant velocity in the map-local frame (lanes, walkways
and crossings are straight), so positions, headings and velocities are exact at any time and the
devkit's finite-difference `box_velocity` recovers the true velocity. Agents sharing a lane share its
speed, and lateral slots keep lanes, kerbs and walkway strips apart, so boxes never overlap.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .world import CARPARK, HALF_ROAD, KERB, LANE, SPACING, STOP_TO, WALK, MapWorld

# BEVFusion's object_classes order; the index is the class id used by the renderer.
CLASS_NAMES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
               "pedestrian", "traffic_cone")
# Hue [deg] of each class's paint (saturation/value 0.85): distinct, so a camera pixel names its class.
CLASS_HUES = (0.0, 215.0, 55.0, 100.0, 180.0, 320.0, 285.0, 140.0, 250.0, 28.0)
CLASS_COLORS = np.array([colorsys.hsv_to_rgb(h / 360.0, 0.85, 0.85) for h in CLASS_HUES]) * 255.0
CLASS_INTENSITY = (35.0, 30.0, 40.0, 30.0, 30.0, 70.0, 30.0, 25.0, 12.0, 80.0)

# Mean and std of (width, length, height) [m], close to nuScenes class statistics.
SIZES = {
    "car": ((1.95, 4.62, 1.73), (0.1, 0.35, 0.15)),
    "truck": ((2.5, 6.9, 2.9), (0.15, 1.0, 0.35)),
    "construction_vehicle": ((2.75, 6.4, 3.2), (0.08, 0.8, 0.3)),
    "bus": ((2.9, 11.0, 3.5), (0.03, 0.8, 0.2)),
    "trailer": ((2.85, 12.0, 3.9), (0.04, 1.5, 0.3)),
    "barrier": ((2.5, 0.5, 0.98), (0.1, 0.05, 0.05)),
    "motorcycle": ((0.77, 2.11, 1.47), (0.06, 0.15, 0.1)),
    "bicycle": ((0.6, 1.7, 1.28), (0.05, 0.1, 0.08)),
    "pedestrian": ((0.67, 0.73, 1.77), (0.06, 0.08, 0.1)),
    "traffic_cone": ((0.41, 0.41, 1.07), (0.03, 0.03, 0.05)),
}
DEFAULT_CATEGORY = {
    "car": "vehicle.car", "truck": "vehicle.truck", "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid", "trailer": "vehicle.trailer", "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle", "bicycle": "vehicle.bicycle", "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
}


@dataclass
class Agent:
    """One annotated object. Local frame of its map; `size` is nuScenes (w, l, h)."""

    cls: int
    category: str
    size: tuple[float, float, float]
    p0: np.ndarray  # (2,) local position at scene time 0
    vel: np.ndarray  # (2,) local velocity [m/s]
    yaw: float  # local heading
    attribute: str | None
    shade: float

    @property
    def name(self) -> str:
        return CLASS_NAMES[self.cls]


def agent_boxes(agents: list[Agent], world: MapWorld, t: float) -> np.ndarray:
    """(N, 7) global boxes (x, y, z, length, width, height, yaw) at scene time t [s]."""
    if not agents:
        return np.zeros((0, 7))
    p = np.stack([a.p0 + a.vel * t for a in agents])
    xy = world.to_global_2d(p)
    out = np.zeros((len(agents), 7))
    out[:, :2] = xy
    sz = np.array([a.size for a in agents])
    out[:, 2] = sz[:, 2] / 2
    out[:, 3] = sz[:, 1]
    out[:, 4] = sz[:, 0]
    out[:, 5] = sz[:, 2]
    yaw = np.array([a.yaw for a in agents]) + world.angle
    out[:, 6] = np.arctan2(np.sin(yaw), np.cos(yaw))
    return out


@dataclass
class Route:
    """The ego's drive along road `road` of axis `axis` in direction `d`, in lane 0.

    Speed changes linearly (`accel`) and the ego sways gently inside its lane (`sway` m, period
    `sway_period` s), so consecutive ego poses differ in translation, speed and heading.
    """

    axis: int
    road: int
    d: int
    start: float  # along-road coordinate at t = 0
    speed: float  # at t = 0 [m/s]
    accel: float = 0.0
    sway: float = 0.0
    sway_period: float = 8.0
    sway_phase: float = 0.0

    def along(self, t):
        return self.start + self.d * (self.speed * t + 0.5 * self.accel * t * t)

    def mean_speed(self, duration: float) -> float:
        return self.speed + 0.5 * self.accel * duration

    def lateral(self, t):
        """Offset from the lane centre toward the driver's right-hand lanes' outside, and its rate."""
        w = 2 * np.pi / self.sway_period
        return self.sway * np.sin(w * t + self.sway_phase), self.sway * w * np.cos(w * t + self.sway_phase)


def _local(axis: int, road: int, along: float, lat: float) -> np.ndarray:
    c = road * SPACING + lat
    return np.array([along, c]) if axis == 0 else np.array([c, along])


def _heading(axis: int, d: int) -> float:
    return (0.0 if d == 1 else np.pi) if axis == 0 else (np.pi / 2 if d == 1 else -np.pi / 2)


def _unit(axis: int, d: int) -> np.ndarray:
    return np.array([float(d), 0.0]) if axis == 0 else np.array([0.0, float(d)])


def lane_centre(k: int) -> float:
    """Lateral offset of vehicles in driving lane k. Lane 1 traffic keeps 0.25 m toward the centre line
    so that vehicles up to 3 m wide pass kerb-parked ones (flush with the walkway) without touching."""
    return (k + 0.5) * LANE - (0.25 if k == 1 else 0.0)


def kerb_centre(width: float) -> float:
    """Lateral offset of a vehicle parked flush with the walkway edge."""
    return 2 * LANE + KERB - width / 2 - 0.02


def lateral_sign(world: MapWorld, axis: int, d: int) -> float:
    """Sign of the lateral offset (added to the across-road coordinate) of lanes travelling in d."""
    return -d * world.side if axis == 0 else d * world.side


class Populator:
    """Places the agents of one scene around the ego route."""

    def __init__(self, world: MapWorld, route: Route, duration: float, rng: np.random.Generator):
        self.world, self.route, self.T, self.rng = world, route, duration, rng
        self.agents: list[Agent] = []
        a_end = route.along(duration)
        self.lo = max(min(route.start, a_end) - 60.0, 0.0)
        self.hi = min(max(route.start, a_end) + 60.0, world.extent)

    # ---- helpers ---------------------------------------------------------------------------------
    def size(self, name: str, scale: float = 1.0) -> tuple[float, float, float]:
        mean, std = SIZES[name]
        s = np.clip(self.rng.normal(mean, std), np.array(mean) - 2 * np.array(std), np.array(mean) + 2 * np.array(std))
        if name == "pedestrian":
            s = s * scale
        return tuple(float(v) for v in s)

    def add(self, name: str, size, p0, vel, yaw, attribute, category=None) -> Agent:
        a = Agent(CLASS_NAMES.index(name), category or DEFAULT_CATEGORY[name], size, np.asarray(p0, float),
                  np.asarray(vel, float), float(yaw), attribute, float(self.rng.uniform(0.8, 1.1)))
        self.agents.append(a)
        return a

    def vehicle_attribute(self, name: str, speed: float, parked: bool) -> str:
        if name in ("motorcycle", "bicycle"):
            return "cycle.without_rider" if parked else "cycle.with_rider"
        if speed > 0.2:
            return "vehicle.moving"
        return "vehicle.parked" if parked else "vehicle.stopped"

    def clear_of_nodes(self, start: float, length: float, margin: float = 1.0) -> float:
        """The first position >= start where [pos, pos + length] keeps clear of intersections and crossings."""
        pos = start
        reach = HALF_ROAD + WALK + margin
        for _ in range(3):
            node = np.floor(pos / SPACING + 0.5) * SPACING
            for nd in (node - SPACING, node, node + SPACING):
                if pos < nd + reach and pos + length > nd - reach:
                    pos = nd + reach
        return pos

    def choice(self, names, probs) -> str:
        p = np.asarray(probs, float)
        return names[int(self.rng.choice(len(names), p=p / p.sum()))]

    # ---- traffic ---------------------------------------------------------------------------------
    def lane_flow(self, axis: int, road: int, d: int, k: int, speed: float, names, probs, density: float,
                  a_min: float, a_max: float) -> None:
        """Vehicles in lane k travelling in d at `speed`, spaced along [a_min, a_max] at mid-scene."""
        sgn = lateral_sign(self.world, axis, d)
        lat = sgn * lane_centre(k)
        yaw = _heading(axis, d)
        pos = a_min + self.rng.uniform(0, 10)
        while pos < a_max:
            name = self.choice(names, probs)
            w, l, h = self.size(name)
            centre = pos + l / 2
            pos += l + self.rng.uniform(6.0, 30.0) / density
            mid = centre - d * speed * self.T / 2  # position at t = 0 so that it is `centre` at T/2
            self.add(name, (w, l, h), _local(axis, road, mid, lat), _unit(axis, d) * speed, yaw,
                     self.vehicle_attribute(name, speed, parked=False))

    def kerb(self, axis: int, road: int, d: int, a_min: float, a_max: float, zone_at: float | None) -> None:
        """Parked vehicles, parked cycles and construction zones in the kerb lane of direction d."""
        sgn = lateral_sign(self.world, axis, d)
        yaw = _heading(axis, d)
        pos = a_min + self.rng.uniform(0, 8)
        while pos < a_max:
            if zone_at is not None and pos <= zone_at < pos + 55:
                pos = self.construction_zone(axis, road, d, zone_at) + self.rng.uniform(3, 8)
                zone_at = None
                continue
            name = self.choice(("car", "truck", "trailer", "motorcycle", "bicycle", "traffic_cone", "barrier"),
                               (0.45, 0.1, 0.1, 0.1, 0.1, 0.08, 0.07))
            w, l, h = self.size(name)
            pos = self.clear_of_nodes(pos, max(w, l))
            if pos >= a_max:
                break
            lat = sgn * kerb_centre(w)
            if name == "barrier":  # long side along the kerb
                w_, l_ = w, l
                centre = pos + w_ / 2
                self.add(name, (w_, l_, h), _local(axis, road, centre, lat), np.zeros(2), yaw + np.pi / 2, None)
                pos += w_ + self.rng.uniform(2.0, 12.0)
                continue
            centre = pos + l / 2
            attr = None if name == "traffic_cone" else self.vehicle_attribute(name, 0.0, parked=True)
            self.add(name, (w, l, h), _local(axis, road, centre, lat), np.zeros(2),
                     yaw if name != "traffic_cone" else self.rng.uniform(-np.pi, np.pi), attr)
            pos += l + self.rng.uniform(2.0, 14.0)

    def construction_zone(self, axis: int, road: int, d: int, start: float) -> float:
        """Cones, barriers, a worker, a construction vehicle and an equipment trailer closing the kerb
        lane; returns the end."""
        sgn = lateral_sign(self.world, axis, d)
        yaw = _heading(axis, d)
        lat_kerb = sgn * (2 * LANE + KERB / 2)
        pos = self.clear_of_nodes(start, 42.0)
        items = ("traffic_cone", "barrier", "barrier", "worker", "construction_vehicle", "trailer", "barrier",
                 "traffic_cone")
        for item in items:
            if item == "worker":  # standing in the closed lane, next to the machine
                w, l, h = self.size("pedestrian")
                self.add("pedestrian", (w, l, h), _local(axis, road, pos + 0.9, lat_kerb), np.zeros(2),
                         self.rng.uniform(-np.pi, np.pi), "pedestrian.standing", "human.pedestrian.construction_worker")
                pos += 1.8
                continue
            w, l, h = self.size(item)
            if item == "barrier":
                self.add(item, (w, l, h), _local(axis, road, pos + w / 2, lat_kerb), np.zeros(2), yaw + np.pi / 2,
                         None)
                pos += w + 0.6
            elif item == "traffic_cone":
                self.add(item, (w, l, h), _local(axis, road, pos + l / 2, sgn * (2 * LANE + 0.5)), np.zeros(2),
                         self.rng.uniform(-np.pi, np.pi), None)
                pos += l + 1.5
            else:
                self.add(item, (w, l, h), _local(axis, road, pos + l / 2, sgn * kerb_centre(w)), np.zeros(2), yaw,
                         "vehicle.parked")
                pos += l + 0.8
        return pos

    def walkway(self, axis: int, road: int, sgn: float, a_min: float, a_max: float) -> None:
        """Walkers on three strips, standing/sitting people and parked bicycles on the outer strip."""
        yaw0 = _heading(axis, 1)
        for off in (0.6, 1.4, 2.2):
            d = 1 if self.rng.random() < 0.5 else -1
            speed = float(self.rng.uniform(1.0, 1.6))
            pos = a_min + self.rng.uniform(0, 12)
            while pos < a_max:
                cat = self.choice(("human.pedestrian.adult", "human.pedestrian.child"), (0.9, 0.1))
                w, l, h = self.size("pedestrian", 0.75 if cat.endswith("child") else 1.0)
                mid = pos - d * speed * self.T / 2
                self.add("pedestrian", (w, l, h), _local(axis, road, mid, sgn * (HALF_ROAD + off)),
                         _unit(axis, d) * speed, _heading(axis, d), "pedestrian.moving", cat)
                pos += self.rng.uniform(8.0, 45.0)
        pos = a_min + self.rng.uniform(0, 10)
        while pos < a_max:
            kind = self.choice(("standing", "sitting", "bicycle"), (0.45, 0.15, 0.4))
            pos = self.clear_of_nodes(pos, 2.0, margin=-WALK + 0.5)
            if pos >= a_max:
                break
            if kind == "bicycle":
                w, l, h = self.size("bicycle")
                self.add("bicycle", (w, l, h), _local(axis, road, pos + l / 2, sgn * (HALF_ROAD + 3.3)),
                         np.zeros(2), yaw0 + (0 if self.rng.random() < 0.5 else np.pi), "cycle.without_rider")
                pos += l + self.rng.uniform(1.0, 15.0)
                continue
            w, l, h = self.size("pedestrian")
            if kind == "sitting":
                h = float(self.rng.uniform(1.0, 1.3))
            self.add("pedestrian", (w, l, h), _local(axis, road, pos + l / 2, sgn * (HALF_ROAD + 3.3)), np.zeros(2),
                     self.rng.uniform(-np.pi, np.pi),
                     "pedestrian.standing" if kind == "standing" else "pedestrian.sitting_lying_down")
            pos += l + self.rng.uniform(3.0, 20.0)

    def side_road_queues(self, node: int) -> None:
        """Vehicles stopped at the stop lines of the side road crossing the route at `node`."""
        r = self.route
        axis = 1 - r.axis
        for arm in (1, -1):
            d = -arm  # heading toward the node
            sgn = lateral_sign(self.world, axis, d)
            for k in (0, 1):
                dist = STOP_TO + self.rng.uniform(0.8, 2.0)
                for _ in range(int(self.rng.integers(0, 4))):
                    name = self.choice(("car", "truck", "bus", "motorcycle", "bicycle"), (0.6, 0.15, 0.1, 0.08, 0.07))
                    w, l, h = self.size(name)
                    centre = r.road * SPACING + arm * (dist + l / 2)
                    self.add(name, (w, l, h), _local(axis, node, centre, sgn * lane_centre(k)), np.zeros(2),
                             _heading(axis, d), self.vehicle_attribute(name, 0.0, parked=False))
                    dist += l + self.rng.uniform(1.5, 3.5)
            # Parked vehicles further out on the kerb.
            self.kerb(axis, node, d, r.road * SPACING + 35.0 if arm == 1 else r.road * SPACING - 65.0,
                      r.road * SPACING + 65.0 if arm == 1 else r.road * SPACING - 35.0, None)

    def carpark(self, u0: float, v0: float) -> None:
        """Cars parked in the bays of the car park whose low corner is (u0, v0) (bays along v)."""
        for row_off in (10.0, 25.0):
            for m in range(int(CARPARK / 2.6)):
                if self.rng.random() > 0.3:
                    continue
                name = self.choice(("car", "truck"), (0.9, 0.1))
                w, l, h = self.size(name)
                if l > 9.5 or w > 2.4:
                    w, l, h = self.size("car")
                    name = "car"
                u = u0 + 2.6 * m + 1.3
                v = v0 + row_off + float(self.rng.uniform(-0.3, 0.3))
                self.add(name, (w, l, h), (u, v), np.zeros(2), np.pi / 2 if self.rng.random() < 0.5 else -np.pi / 2,
                         "vehicle.parked")

    # ---- the scene -------------------------------------------------------------------------------
    def populate(self) -> list[Agent]:
        r, rng = self.route, self.rng
        lo, hi = self.lo, self.hi
        ego_mid = r.along(self.T / 2)
        # Ego lane: a leader at the ego's speed.
        if rng.random() < 0.7:
            name = self.choice(("car", "truck", "bus"), (0.75, 0.15, 0.1))
            w, l, h = self.size(name)
            gap = float(rng.uniform(14.0, 35.0))
            self.add(name, (w, l, h), _local(r.axis, r.road, r.start + r.d * (gap + l / 2 + 4.0),
                                             lateral_sign(self.world, r.axis, r.d) * 0.5 * LANE),
                     _unit(r.axis, r.d) * r.mean_speed(self.T), _heading(r.axis, r.d), "vehicle.moving")
        # Other lanes of the route's road.
        slow = ("car", "truck", "bus", "motorcycle", "bicycle")
        self.lane_flow(r.axis, r.road, r.d, 1, float(rng.uniform(3.0, 6.0)), slow, (0.45, 0.15, 0.1, 0.15, 0.15),
                       0.8, lo, hi)
        self.lane_flow(r.axis, r.road, -r.d, 0, float(rng.uniform(8.0, 13.0)), ("car", "truck", "bus"),
                       (0.7, 0.2, 0.1), 1.0, lo, hi)
        self.lane_flow(r.axis, r.road, -r.d, 1, float(rng.uniform(3.0, 6.0)), slow, (0.45, 0.15, 0.1, 0.15, 0.15),
                       0.8, lo, hi)
        # Kerbs: one construction zone on each side near the middle of the drive.
        for d in (r.d, -r.d):
            zone = ego_mid + r.d * float(rng.uniform(-5.0, 15.0)) - (0 if d == r.d else r.d * 25.0)
            self.kerb(r.axis, r.road, d, lo, hi, zone)
        for sgn in (1.0, -1.0):
            self.walkway(r.axis, r.road, sgn, lo, hi)
        for node in range(self.world.n + 1):
            if lo - 20 < node * SPACING < hi + 20:
                self.side_road_queues(node)
        for (u0, v0, u1, v1) in self.world.carparks():
            lo_c, hi_c = (u0, u1) if r.axis == 0 else (v0, v1)
            across = (v0 + v1) / 2 if r.axis == 0 else (u0 + u1) / 2
            if hi_c > lo and lo_c < hi and abs(across - r.road * SPACING) < 60.0:
                self.carpark(u0, v0)
        return self.agents


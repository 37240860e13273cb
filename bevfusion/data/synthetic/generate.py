"""Write a synthetic drive in the nuScenes on-disk layout (tables, samples/, sweeps/, maps/)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...utils.logging import get_logger, progress
from . import kernels
from .objects import CLASS_COLORS, CLASS_INTENSITY, Populator, Route, agent_boxes
from .sensors import (CAMERA_NAMES, LIDAR_ELEVATIONS_DEG, LIDAR_MAX_RANGE, LIDAR_MIN_RANGE, LIDAR_NAME, build_rig,
                      rot_z, yaw_quaternion)
from .world import LANE, MAP_NAMES, SPACING, MapWorld, _token

log = get_logger("bevfusion.data.synthetic")

MINI_TRAIN = ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077", "scene-1094",
              "scene-1100")
MINI_VAL = ("scene-0103", "scene-0916")
SWEEPS_PER_SAMPLE = 10  # LiDAR at 20 Hz, keyframes at 2 Hz
FRAME_DT = 0.05
ANNOTATION_RANGE = 60.0  # agents farther than this from the ego at every keyframe are left out
CAMERA_FAR = 250.0
# Each camera is triggered when the LiDAR (one turn per 50 ms, clockwise from the front) faces it.
CAMERA_DELAY = {"CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": 0.0076, "CAM_BACK_RIGHT": 0.0153, "CAM_BACK": 0.025,
                "CAM_BACK_LEFT": 0.0347, "CAM_FRONT_LEFT": 0.0424}

CATEGORIES = (
    ("human.pedestrian.adult", "Adult subcategory."),
    ("human.pedestrian.child", "Child subcategory."),
    ("human.pedestrian.wheelchair", "Wheelchairs."),
    ("human.pedestrian.stroller", "Strollers."),
    ("human.pedestrian.personal_mobility", "Small electric or self-propelled vehicles."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.construction_worker", "Construction worker."),
    ("animal", "All animals."),
    ("vehicle.car", "Vehicle designed primarily for personal use."),
    ("vehicle.motorcycle", "Gasoline or electric powered 2-wheeled vehicle."),
    ("vehicle.bicycle", "Human or electric powered 2-wheeled vehicle."),
    ("vehicle.bus.bendy", "Bendy bus subcategory."),
    ("vehicle.bus.rigid", "Rigid bus subcategory."),
    ("vehicle.truck", "Vehicles primarily designed to haul cargo."),
    ("vehicle.construction", "Vehicles primarily designed for construction."),
    ("vehicle.emergency.ambulance", "All types of ambulances."),
    ("vehicle.emergency.police", "All types of police vehicles."),
    ("vehicle.trailer", "Any vehicle trailer."),
    ("movable_object.barrier", "Temporary road barrier placed in the scene in order to redirect traffic."),
    ("movable_object.trafficcone", "All types of traffic cone."),
    ("movable_object.pushable_pullable", "Objects that a pedestrian may push or pull."),
    ("movable_object.debris", "Movable object that is left on the driveable surface."),
    ("static_object.bicycle_rack", "Area or device intended to park or secure the bicycles in a row."),
)
ATTRIBUTES = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
    ("vehicle.parked", "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.moving", "The human is moving."),
)
VISIBILITY = (("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%"))

README = """This folder holds SYNTHETIC data written by bevfusion's generator
(tools/make_synthetic.py / bevfusion.data.synthetic.generate). It is NOT nuScenes: the roads, traffic,
LiDAR sweeps and camera images are simulated. It only uses the nuScenes on-disk format ({version},
the official mini scene names and map names) so that nuscenes-devkit and nuScenes tools read it
unchanged. Generated with: {config}
"""


@dataclass
class SyntheticConfig:
    """Settings of a synthetic drive; the defaults are the embedded dataset (`make demo`).

    Args:
        seed: everything is a function of the seed (same seed, same bytes).
        num_scenes: scenes (one log each). Up to 10 use the v1.0-mini layout (mini_train/mini_val
            scene names, 8/2 at 10); more use v1.0-trainval with official train/val names (needs
            nuscenes-devkit for the name lists).
        samples_per_scene: keyframes (2 Hz) per scene, >= 2 so that every box has a velocity.
        image_size: (width, height) of the camera images; intrinsics are scaled from 1600x900.
        lidar_azimuth_steps: LiDAR columns per revolution (1084 is about the HDL-32E at 20 Hz).
        jpeg_quality: camera JPEG quality.
    """

    seed: int = 0
    num_scenes: int = 10
    samples_per_scene: int = 20
    image_size: tuple[int, int] = (1600, 900)
    lidar_azimuth_steps: int = 1084
    jpeg_quality: int = 90
    range_noise: float = 0.01
    scene_names: tuple[str, ...] = field(default=(), repr=False)

    def validate(self) -> None:
        for name in ("num_scenes", "samples_per_scene", "lidar_azimuth_steps"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.num_scenes < 1:
            raise ValueError(f"num_scenes must be >= 1, got {self.num_scenes}")
        if self.samples_per_scene < 2:
            raise ValueError(f"samples_per_scene must be >= 2 (velocities need two keyframes), "
                             f"got {self.samples_per_scene}")
        if self.lidar_azimuth_steps < 16:
            raise ValueError(f"lidar_azimuth_steps must be >= 16, got {self.lidar_azimuth_steps}")
        if len(self.image_size) != 2 or min(int(v) for v in self.image_size) < 16:
            raise ValueError(f"image_size must be (width, height) with both >= 16, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.range_noise < 0:
            raise ValueError(f"range_noise must be >= 0, got {self.range_noise}")

    @property
    def version(self) -> str:
        return "v1.0-mini" if self.num_scenes <= 10 else "v1.0-trainval"


def split_scene_names(num_scenes: int) -> tuple[list[str], list[str]]:
    """(train names, val names) for `num_scenes` scenes, using the devkit's official split names."""
    if num_scenes <= 10:
        n_val = 0 if num_scenes == 1 else max(1, int(round(num_scenes * 0.2)))
        return list(MINI_TRAIN[:num_scenes - n_val]), list(MINI_VAL[:n_val])
    try:
        from nuscenes.utils.splits import train, val
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ValueError("more than 10 scenes need the official v1.0-trainval scene names from nuscenes-devkit "
                         "(pip install 'bevfusion[nuscenes]')") from exc
    n_val = max(1, int(round(num_scenes * 0.15)))
    if num_scenes - n_val > len(train) or n_val > len(val):
        raise ValueError(f"num_scenes {num_scenes} is more than the official split has names for")
    return list(train[:num_scenes - n_val]), list(val[:n_val])


def generate(out_dir: str | os.PathLike, seed: int = 0, num_scenes: int = 10, samples_per_scene: int = 20,
             image_size: tuple[int, int] = (1600, 900), overwrite: bool = False, show_progress: bool | None = None,
             workers: int | None = None, **kwargs) -> Path:
    """Generate a synthetic nuScenes-format dataset at `out_dir` and return its path.

    The data is built in a temporary folder beside `out_dir` and renamed into place at the end, so an
    interrupted run never leaves a complete-looking output. Extra keyword arguments go to
    `SyntheticConfig` (lidar_azimuth_steps, jpeg_quality, range_noise). `workers` processes simulate
    scenes in parallel (default: up to 2 CPUs); the output does not depend on it.

    Raises:
        ValueError: bad settings. FileExistsError: `out_dir` exists and `overwrite` is false, or it
            is not empty and not a synthetic drive (it is never replaced then).
        PermissionError / OSError: the parent folder cannot be written.
    """
    cfg = SyntheticConfig(seed=int(seed), num_scenes=num_scenes, samples_per_scene=samples_per_scene,
                          image_size=tuple(int(v) for v in image_size), **kwargs)
    cfg.validate()
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it or pass overwrite=True (--overwrite)")
    if out.exists() and not (out / "synthetic.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        # Never delete something we did not write (a real nuScenes copy, say).
        raise FileExistsError(f"{out} exists and is not a synthetic drive written by this generator; "
                              "refusing to replace it")
    parent = out.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(f"cannot write {out}: {p} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create the output folder's parent {parent}: {exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent} (output folder {out.name})")
    tmp = parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.time()
    try:
        tmp.mkdir()
        _Writer(cfg, tmp, show_progress, workers).run()
        if out.exists():
            trash = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synthetic %s with %d scenes x %d samples written to %s in %.1f s", cfg.version, cfg.num_scenes,
             cfg.samples_per_scene, out, time.time() - start)
    return out


def _ego_speed_and_grid(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    speeds = rng.uniform(6.0, 12.0, size=cfg.num_scenes)
    duration = (SWEEPS_PER_SAMPLE * cfg.samples_per_scene) * FRAME_DT
    longest = float(speeds.max() * duration)
    n = max(4, int(np.ceil((longest + 3 * SPACING) / SPACING)))
    return speeds, n


class _Writer:
    def __init__(self, cfg: SyntheticConfig, root: Path, show_progress: bool | None, workers: int = 1):
        self.cfg, self.root, self.workers = cfg, root, workers
        self.disable = None if show_progress is None else not show_progress
        self.version = cfg.version
        self.tables: dict[str, list] = {k: [] for k in (
            "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
            "scene", "sample", "sample_data", "sample_annotation", "map")}
        self.rig = build_rig(cfg.image_size)
        self.tok = lambda *p: _token("synthetic", cfg.seed, *p)

    # ---- static tables ------------------------------------------------------------------------------
    def static_tables(self) -> None:
        t = self.tables
        for name, desc in CATEGORIES:
            t["category"].append({"token": self.tok("category", name), "name": name, "description": desc})
        for name, desc in ATTRIBUTES:
            t["attribute"].append({"token": self.tok("attribute", name), "name": name, "description": desc})
        for tok, level, desc in VISIBILITY:
            t["visibility"].append({"token": tok, "level": level, "description": desc})
        for ch, s in self.rig.items():
            t["sensor"].append({"token": self.tok("sensor", ch), "channel": ch, "modality": s.modality})

    def run(self) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 0])
        self.static_tables()
        speeds, n = _ego_speed_and_grid(cfg, rng)
        worlds = [MapWorld.create(name, n, np.random.default_rng([cfg.seed, 1, i])) for i, name in enumerate(MAP_NAMES)]
        train, val = split_scene_names(cfg.num_scenes)
        names = sorted(train + val)
        (self.root / "maps" / "expansion").mkdir(parents=True)
        from concurrent.futures import ThreadPoolExecutor

        # The 0.1 m/px basemaps are written by a thread (PIL encodes without the GIL) while scenes run.
        basemaps = {w.name: f"maps/{_token('basemap', self.cfg.seed, w.name)}.png" for w in worlds}
        painter = ThreadPoolExecutor(1)
        pending = [painter.submit(lambda w=w: w.basemap().save(self.root / basemaps[w.name], optimize=False,
                                                                   compress_level=1)) for w in worlds]
        try:
            self._scenes(worlds, names, speeds, n)
        except BaseException:
            painter.shutdown(wait=True, cancel_futures=True)  # never leave a writer behind on error
            raise
        for job in pending:
            job.result()
        painter.shutdown()
        map_logs: dict[str, list[str]] = {w.name: [] for w in worlds}
        for w, log_token in self.scene_logs:
            map_logs[w].append(log_token)
        for w in worlds:
            (self.root / "maps" / "expansion" / f"{w.name}.json").write_text(
                json.dumps(w.expansion_json(), separators=(",", ":")))
            self.tables["map"].append({"token": self.tok("map", w.name), "log_tokens": map_logs[w.name],
                                       "category": "semantic_prior", "filename": basemaps[w.name]})
        table_dir = self.root / self.version
        table_dir.mkdir()
        for name, rows in self.tables.items():
            (table_dir / f"{name}.json").write_text(json.dumps(rows))
        config = {k: v for k, v in asdict(cfg).items() if k != "scene_names"}
        (self.root / "README.txt").write_text(README.format(version=self.version, config=json.dumps(config)))
        (self.root / "synthetic.json").write_text(json.dumps({"generator": "bevfusion.data.synthetic",
                                                              "version": self.version, "config": config,
                                                              "train_scenes": train, "val_scenes": val}, indent=1))

    def _scenes(self, worlds: list[MapWorld], names: list[str], speeds: np.ndarray, n: int) -> None:
        cfg = self.cfg
        self.scene_logs: list[tuple[str, str]] = []
        frames_per_scene = SWEEPS_PER_SAMPLE * cfg.samples_per_scene
        jobs = [(cfg, str(self.root), i, name, i % len(worlds), float(speeds[i]), n) for i, name in enumerate(names)]
        workers = max(1, min(self.workers, len(jobs)))
        if workers == 1:
            bar = progress(range(cfg.num_scenes * frames_per_scene), desc="synthetic drive", disable=self.disable,
                           unit="sweep")
            for job in jobs:
                tables, log_token = _scene_job(job, bar)
                self._merge(tables, worlds[job[4]].name, log_token)
            for _ in bar:  # close the bar
                pass
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                results = pool.imap(_scene_job, jobs)
                for job, (tables, log_token) in progress(zip(jobs, results), total=len(jobs),
                                                         desc=f"synthetic drive ({workers} workers)",
                                                         disable=self.disable, unit="scene"):
                    self._merge(tables, worlds[job[4]].name, log_token)

    def _merge(self, tables: dict, map_name: str, log_token: str) -> None:
        for k, rows in tables.items():
            self.tables[k].extend(rows)
        self.scene_logs.append((map_name, log_token))

    # ---- one scene ---------------------------------------------------------------------------------
    def _route(self, world: MapWorld, speed: float, rng: np.random.Generator, duration: float, idx: int) -> Route:
        axis = int(rng.integers(0, 2))
        road = int(rng.integers(1, world.n))  # an inner road: blocks on both sides
        d = 1 if rng.random() < 0.5 else -1
        length = speed * duration
        lo, hi = 1.5 * SPACING, world.extent - 1.5 * SPACING - length
        start = float(rng.uniform(lo, max(lo, hi)))
        if d == -1:
            start = world.extent - start
        # Speed drift and in-lane sway from their own stream (the traffic does not depend on them).
        motion = np.random.default_rng([self.cfg.seed, 5, idx])
        accel = float(motion.uniform(-1.0, 1.0)) / max(duration, 1.0)  # at most 1 m/s change over the scene
        return Route(axis, road, d, start, speed, accel=accel, sway=float(motion.uniform(0.05, 0.2)),
                     sway_period=float(motion.uniform(6.0, 12.0)), sway_phase=float(motion.uniform(0, 2 * np.pi)))

    def _scene(self, idx: int, scene_name: str, world: MapWorld, speed: float, bar) -> str:
        cfg, t, tok = self.cfg, self.tables, self.tok
        rng = np.random.default_rng([cfg.seed, 2, idx])
        n_frames = SWEEPS_PER_SAMPLE * cfg.samples_per_scene  # 9 sweeps before the first keyframe
        duration = (n_frames - 1) * FRAME_DT
        route = self._route(world, speed, rng, duration, idx)
        agents = Populator(world, route, duration, rng).populate()

        # Ego poses (ego frame origin on the ground, heading along its path) at any time.
        sgn = (-route.d * world.side) if route.axis == 0 else (route.d * world.side)

        def ego_at(ts: np.ndarray) -> tuple[np.ndarray, list[float]]:
            along = route.along(ts)
            sway, sway_rate = route.lateral(ts)
            across = route.road * SPACING + sgn * (0.5 * LANE + sway)
            v_along = route.d * (route.speed + route.accel * ts)
            if route.axis == 0:
                local, yaw_local = np.stack([along, across], 1), np.arctan2(sgn * sway_rate, v_along)
            else:
                local, yaw_local = np.stack([across, along], 1), np.arctan2(v_along, sgn * sway_rate)
            return world.to_global_2d(local), [world.to_global_yaw(float(y)) for y in yaw_local]

        def pose_matrix(xy, yaw) -> np.ndarray:
            m = np.eye(4)
            m[:3, :3] = rot_z(yaw)
            m[:2, 3] = xy
            return m

        times = np.arange(n_frames) * FRAME_DT
        ego_xy, ego_yaws = ego_at(times)
        key_frames = [SWEEPS_PER_SAMPLE - 1 + SWEEPS_PER_SAMPLE * k for k in range(cfg.samples_per_scene)]
        # Keep agents that come within range of the ego at some keyframe.
        keep = []
        for a in agents:
            d_min = min(np.linalg.norm(agent_boxes([a], world, times[f])[0, :2] - ego_xy[f]) for f in key_frames)
            if d_min < ANNOTATION_RANGE:
                keep.append(a)
        agents = keep

        # Log, calibrations.
        vehicle = "n008" if world.name == "boston-seaport" else "n015"
        base_s = 1532402927 + idx * 3600 + int(rng.integers(0, 600))
        date = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(base_s))
        logfile = f"{vehicle}-{date}{'-0400' if vehicle == 'n008' else '+0800'}"
        log_token = tok("log", idx)
        t["log"].append({"token": log_token, "logfile": logfile, "vehicle": vehicle,
                         "date_captured": date[:10], "location": world.name})
        cs_tokens = {}
        for ch, s in self.rig.items():
            cs_tokens[ch] = tok("calibrated_sensor", idx, ch)
            t["calibrated_sensor"].append({
                "token": cs_tokens[ch], "sensor_token": tok("sensor", ch), "translation": list(s.translation),
                "rotation": list(s.rotation),
                "camera_intrinsic": [list(r) for r in s.intrinsic] if s.intrinsic else []})

        scene_token = tok("scene", idx)
        sample_tokens = [tok("sample", idx, k) for k in range(len(key_frames))]
        timestamps = [base_s * 1_000_000 + int(round(tt * 1e6)) for tt in times]
        for k, f in enumerate(key_frames):
            t["sample"].append({"token": sample_tokens[k], "timestamp": timestamps[f],
                                "prev": sample_tokens[k - 1] if k > 0 else "",
                                "next": sample_tokens[k + 1] if k + 1 < len(key_frames) else "",
                                "scene_token": scene_token})
        t["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": len(key_frames),
                           "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                           "name": scene_name,
                           "description": f"SYNTHETIC drive on a road grid ({world.name}), ego at {speed:.1f} m/s"})

        # Annotation records are collected as keyframes are simulated; instances that no keyframe sweep
        # ever hits are dropped at the end (nuScenes annotates what its sensors observe).
        cat_tok = {name: tok("category", name) for name, _ in CATEGORIES}
        att_tok = {name: tok("attribute", name) for name, _ in ATTRIBUTES}
        inst_tokens = [tok("instance", idx, j) for j in range(len(agents))]
        ann_tokens = [[tok("sample_annotation", idx, j, k) for k in range(len(key_frames))] for j in range(len(agents))]
        ann_rows: list[list[dict]] = [[] for _ in agents]
        seen = np.zeros(len(agents), dtype=bool)

        buildings = world.building_boxes()
        mid = ego_xy.mean(0)
        buildings = buildings[np.linalg.norm(buildings[:, :2] - mid, axis=1) < CAMERA_FAR]
        n_agents = len(agents)
        box_cls = np.array([a.cls for a in agents] + [kernels.BUILDING] * len(buildings), dtype=np.int64)
        b_rng = np.random.default_rng([cfg.seed, 3, idx])
        b_col = np.array([[175, 165, 150], [150, 150, 155], [190, 180, 160], [140, 130, 120]], float)
        box_color = np.concatenate([CLASS_COLORS[[a.cls for a in agents]].reshape(-1, 3),
                                    b_col[b_rng.integers(0, len(b_col), len(buildings))]])
        box_shade = np.array([a.shade for a in agents] + list(b_rng.uniform(0.85, 1.1, len(buildings))))
        box_int = np.array([CLASS_INTENSITY[a.cls] for a in agents] + [25.0] * len(buildings))
        gp = world.ground_params()
        lidar = self.rig[LIDAR_NAME]
        l2e = lidar.to_ego
        elev = np.deg2rad(LIDAR_ELEVATIONS_DEG)
        n_ring = len(elev)
        ring = np.repeat(np.arange(n_ring, dtype=np.float32), cfg.lidar_azimuth_steps)
        noise_rng = np.random.default_rng([cfg.seed, 4, idx])

        key_of_frame = {f: k for k, f in enumerate(key_frames)}
        lidar_sd = [tok("sample_data", idx, LIDAR_NAME, f) for f in range(n_frames)]
        cam_sd = {ch: [tok("sample_data", idx, ch, k) for k in range(len(key_frames))] for ch in CAMERA_NAMES}
        for sub in ("samples", "sweeps"):
            (self.root / sub / LIDAR_NAME).mkdir(parents=True, exist_ok=True)
        for ch in CAMERA_NAMES:
            (self.root / "samples" / ch).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for f in range(n_frames):
            tt = times[f]
            e2g = pose_matrix(ego_xy[f], ego_yaws[f])
            ego_token = lidar_sd[f]
            t["ego_pose"].append({"token": ego_token, "timestamp": timestamps[f],
                                  "rotation": yaw_quaternion(ego_yaws[f]),
                                  "translation": [float(ego_xy[f, 0]), float(ego_xy[f, 1]), 0.0]})
            boxes = np.concatenate([agent_boxes(agents, world, tt), buildings]) if n_agents else buildings
            l2g = e2g @ l2e
            lidar_yaw = float(np.arctan2(l2g[1, 0], l2g[0, 0]))
            hits, inten, hit_id, any_hit = kernels.lidar_cast(
                l2g[:3, 3].copy(), lidar_yaw, elev, cfg.lidar_azimuth_steps, boxes, box_int, gp,
                kernels.GROUND_INTENSITY, LIDAR_MAX_RANGE, LIDAR_MIN_RANGE,
                noise_rng.normal(0.0, cfg.range_noise, n_ring * cfg.lidar_azimuth_steps))
            valid = hit_id != -2
            pts_sensor = (hits[valid] - l2g[:3, 3]) @ l2g[:3, :3]
            cloud = np.concatenate([pts_sensor, inten[valid, None], ring[valid, None]], axis=1).astype(np.float32)
            is_key = f in key_of_frame
            k = key_of_frame.get(f)
            # Sweeps belong to the next keyframe's sample.
            owner = k if is_key else min(kk for kk, ff in enumerate(key_frames) if ff > f)
            fname = f"{'samples' if is_key else 'sweeps'}/{LIDAR_NAME}/{logfile}__{LIDAR_NAME}__{timestamps[f]}.pcd.bin"
            cloud.tofile(self.root / fname)
            t["sample_data"].append({
                "token": lidar_sd[f], "sample_token": sample_tokens[owner], "ego_pose_token": ego_token,
                "calibrated_sensor_token": cs_tokens[LIDAR_NAME], "timestamp": timestamps[f], "fileformat": "pcd",
                "is_key_frame": is_key, "height": 0, "width": 0, "filename": fname,
                "prev": lidar_sd[f - 1] if f > 0 else "", "next": lidar_sd[f + 1] if f + 1 < n_frames else ""})
            bar_update(bar)
            if not is_key:
                continue
            # Annotations from the keyframe sweep.
            ids = hit_id[valid]
            num_pts = np.bincount(ids[(ids >= 0) & (ids < n_agents)], minlength=n_agents) if n_agents else []
            ab = agent_boxes(agents, world, tt)
            for j, a in enumerate(agents):
                # Share of the rays through the object that reach it first.
                vis = num_pts[j] / any_hit[j] if any_hit[j] > 0 else 0.0
                level = "1" if vis < 0.4 else "2" if vis < 0.6 else "3" if vis < 0.8 else "4"
                seen[j] |= num_pts[j] > 0
                ann_rows[j].append({
                    "token": ann_tokens[j][k], "sample_token": sample_tokens[k], "instance_token": inst_tokens[j],
                    "visibility_token": level, "attribute_tokens": [att_tok[a.attribute]] if a.attribute else [],
                    "translation": [float(v) for v in ab[j, :3]], "size": [float(v) for v in a.size],
                    "rotation": yaw_quaternion(float(ab[j, 6])),
                    "prev": ann_tokens[j][k - 1] if k > 0 else "",
                    "next": ann_tokens[j][k + 1] if k + 1 < len(key_frames) else "",
                    "num_lidar_pts": int(num_pts[j]), "num_radar_pts": 0})
            # Cameras fire as the spinning LiDAR sweeps across them, each at its own time and ego pose.
            for ch in CAMERA_NAMES:
                cam = self.rig[ch]
                t_cam = tt + CAMERA_DELAY[ch]
                ts_cam = timestamps[f] + int(round(CAMERA_DELAY[ch] * 1e6))
                (xy_c,), (yaw_c,) = ego_at(np.array([t_cam]))
                t["ego_pose"].append({"token": cam_sd[ch][k], "timestamp": ts_cam, "rotation": yaw_quaternion(yaw_c),
                                      "translation": [float(xy_c[0]), float(xy_c[1]), 0.0]})
                c2g = pose_matrix(xy_c, yaw_c) @ cam.to_ego
                boxes_c = np.concatenate([agent_boxes(agents, world, t_cam), buildings]) if n_agents else buildings
                kk_ = np.array(cam.intrinsic)
                img = kernels.render_camera(kk_, np.linalg.inv(kk_), c2g[:3, :3].copy(), c2g[:3, 3].copy(),
                                            cam.width, cam.height, boxes_c, box_cls, box_color, box_shade, gp,
                                            kernels.GROUND_COLORS, 0.1, CAMERA_FAR)
                cname = f"samples/{ch}/{logfile}__{ch}__{ts_cam}.jpg"
                Image.fromarray(img).save(self.root / cname, quality=cfg.jpeg_quality)
                t["sample_data"].append({
                    "token": cam_sd[ch][k], "sample_token": sample_tokens[k], "ego_pose_token": cam_sd[ch][k],
                    "calibrated_sensor_token": cs_tokens[ch], "timestamp": ts_cam, "fileformat": "jpg",
                    "is_key_frame": True, "height": cam.height, "width": cam.width, "filename": cname,
                    "prev": cam_sd[ch][k - 1] if k > 0 else "",
                    "next": cam_sd[ch][k + 1] if k + 1 < len(key_frames) else ""})
        for j, a in enumerate(agents):
            if not seen[j]:
                continue
            t["instance"].append({"token": inst_tokens[j], "category_token": cat_tok[a.category],
                                  "nbr_annotations": len(key_frames), "first_annotation_token": ann_tokens[j][0],
                                  "last_annotation_token": ann_tokens[j][-1]})
            t["sample_annotation"].extend(ann_rows[j])
        return log_token



def bar_update(bar) -> None:
    if bar is not None:
        next(bar, None)


def _scene_job(job, bar=None):
    """Simulate and write one scene (in this process or a worker); returns its table rows and log token."""
    cfg, root, idx, name, map_index, speed, n = job
    writer = _Writer(cfg, Path(root), show_progress=False)
    world = MapWorld.create(MAP_NAMES[map_index], n, np.random.default_rng([cfg.seed, 1, map_index]))
    log_token = writer._scene(idx, name, world, speed, bar)
    return writer.tables, log_token

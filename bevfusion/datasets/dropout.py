"""Sensor dropout: running with sensors left out on purpose (`drop_sensors`) or missing (`missing_sensors`).

`NuScenesDataset(missing_sensors=..., drop_sensors=...)` puts the request into each sample's results
(`camera_mask`, `drop_lidar`, `max_sweeps`, `missing_sensors`); the loading transforms act on it:
a left-out camera's image becomes a black stand-in of the right size and its `camera_mask` entry
False (batch key `camera_mask`, (B, N) bool, for the model to zero that view's features), a left-out
LiDAR gives an empty (0, C) point cloud (no sweeps either), and sweeps beyond `max_sweeps` or with a
missing file are not loaded. Ground truth is never changed. What was left out is recorded in
`results["dropped"]`, which `Collect3D` passes on as `metas["dropped"]`:

    {"cameras": [names of cameras whose image is a black stand-in],
     "lidar": True when the sample's points are empty (LiDAR dropped or its keyframe file missing),
     "sweeps": number of sweeps not loaded (beyond max_sweeps, or missing files),
     "counts": {"missing_camera_files", "missing_lidar_files", "missing_sweep_files",
                "dropped_cameras", "dropped_lidar", "dropped_sweeps"}: this sample's counts}

`missing_*` count files that do not exist (with `missing_sensors="drop"`), `dropped_*` what was left out
on purpose. A data loader's worker processes keep their own dataset copy, so the dataset's
`dropout_counts` only sees samples loaded in its own process; `sum_dropout_counts(metas)` adds up the
per-sample counts of the batches instead, which works with any number of workers.

A dataset built without either option adds none of these keys: its batches have no `camera_mask`
(all cameras present) and no `metas["dropped"]`.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["COUNT_KEYS", "MISSING_SENSOR_POLICIES", "DROP_SENSOR_KEYS", "new_record", "check_missing_policy",
           "parse_drop_sensors", "sum_dropout_counts"]

COUNT_KEYS = ("missing_camera_files", "missing_lidar_files", "missing_sweep_files", "dropped_cameras",
              "dropped_lidar", "dropped_sweeps")
MISSING_SENSOR_POLICIES = ("error", "drop")
DROP_SENSOR_KEYS = ("cameras", "lidar", "max_sweeps")


def new_record() -> dict[str, Any]:
    """An empty per-sample dropout record (see the module docstring)."""
    return {"cameras": [], "lidar": False, "sweeps": 0, "counts": dict.fromkeys(COUNT_KEYS, 0)}


def check_missing_policy(policy: str, where: str = "missing_sensors") -> str:
    if policy not in MISSING_SENSOR_POLICIES:
        raise ValueError(f"{where}: {policy!r} is not a policy (expected one of {', '.join(MISSING_SENSOR_POLICIES)})")
    return policy


def parse_drop_sensors(drop_sensors: Mapping[str, Any] | None, camera_names: Sequence[str],
                       where: str = "drop_sensors") -> dict[str, Any]:
    """Normalise a `drop_sensors` mapping to {"cameras": tuple of names, "lidar": bool, "max_sweeps": int | None}.

    Keys (all optional): `cameras` ("all" or a list of names out of `camera_names`), `lidar` (bool),
    `max_sweeps` (int >= 0: keep the newest k sweeps). Unknown keys, names or values raise ValueError
    naming them and what is allowed.
    """
    out: dict[str, Any] = {"cameras": (), "lidar": False, "max_sweeps": None}
    if drop_sensors is None:
        return out
    if not isinstance(drop_sensors, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(DROP_SENSOR_KEYS)}, "
                         f"got {type(drop_sensors).__name__}")
    unknown = [k for k in drop_sensors if k not in DROP_SENSOR_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (expected {', '.join(DROP_SENSOR_KEYS)})")
    cameras = drop_sensors.get("cameras")
    if cameras is None:
        cameras = ()
    elif isinstance(cameras, str):
        if cameras != "all":
            raise ValueError(f"{where}.cameras: {cameras!r}: expected 'all' or a list of camera names "
                             f"({', '.join(camera_names)})")
        cameras = tuple(camera_names)
    else:
        cameras = tuple(cameras)
        unknown = [c for c in cameras if c not in camera_names]
        if unknown:
            raise ValueError(f"{where}.cameras: unknown camera(s) {unknown} (this dataset has "
                             f"{', '.join(camera_names) or 'no cameras'})")
    out["cameras"] = cameras
    lidar = drop_sensors.get("lidar", False)
    if lidar is None:
        lidar = False
    if not isinstance(lidar, (bool, np.bool_)):
        raise ValueError(f"{where}.lidar: expected true or false, got {lidar!r}")
    out["lidar"] = bool(lidar)
    k = drop_sensors.get("max_sweeps")
    if k is not None:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"{where}.max_sweeps: expected an integer >= 0, got {k!r}")
        out["max_sweeps"] = int(k)
    return out


def sum_dropout_counts(metas: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Add up `metas["dropped"]["counts"]` over samples (those without a record count 0)."""
    total = dict.fromkeys(COUNT_KEYS, 0)
    for meta in metas:
        counts = (meta.get("dropped") or {}).get("counts") or {}
        for key in COUNT_KEYS:
            total[key] += int(counts.get(key, 0))
    return total

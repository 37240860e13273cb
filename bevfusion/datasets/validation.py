"""Checks of info records at load time: keys, types, shapes and finite, well-formed geometry.

`check_infos` runs once when a dataset opens its info file. Any failure raises `DataError` naming the
info file, the sample token and the field (`cams.CAM_FRONT.camera_intrinsics`, `sweeps[2].timestamp`).
Numeric fields are gathered over all samples and checked with a few array operations (a full
trainval info file: about a second, a tenth of reading it); only after a failure is the sample at
fault checked field by field to name the bad one.

What is checked (the fields the dataset and the loaders read):
- `token`, `lidar_path`, every `data_path`: strings; `location` (if present) a string or None.
- `timestamp` (sample and sweeps): finite real numbers (not strings or bools).
- translations (3,), quaternions (4,) with norm 1 ± 1 %, `sensor2lidar_rotation` (3, 3) orthonormal
  with determinant +1 (to 1e-3), `camera_intrinsics` (3, 3) with positive focal lengths and last row
  (0, 0, 1); all finite.
- annotations (required unless test mode; checked whenever present): `gt_boxes` (M, 7) finite,
  `gt_names` (M,) strings, `gt_velocity` (M, 2) with NaN allowed (the official converter writes NaN
  where a box has no neighbouring annotation; it becomes 0, as upstream) but no inf,
  `num_lidar_pts` (M,) numbers, `valid_flag` (M,) booleans or integers.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bevfusion.datasets.errors import DataError

__all__ = ["INFO_KEYS", "CAM_KEYS", "SWEEP_KEYS", "ANN_KEYS", "check_infos", "check_info"]

INFO_KEYS = ("lidar_path", "token", "sweeps", "cams", "lidar2ego_translation", "lidar2ego_rotation",
             "ego2global_translation", "ego2global_rotation", "timestamp")
CAM_KEYS = ("data_path", "sensor2ego_translation", "sensor2ego_rotation", "sensor2lidar_rotation",
            "sensor2lidar_translation", "camera_intrinsics")
SWEEP_KEYS = ("data_path", "sensor2lidar_rotation", "sensor2lidar_translation", "timestamp")
ANN_KEYS = ("gt_boxes", "gt_names", "gt_velocity", "num_lidar_pts", "valid_flag")

_QUATERNION_TOL = 1e-2
_ROTATION_TOL = 1e-3


def _quaternion_problem(q: np.ndarray) -> np.ndarray:
    return np.abs(np.linalg.norm(q, axis=1) - 1.0) > _QUATERNION_TOL


def _rotation_problem(R: np.ndarray) -> np.ndarray:
    err = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).reshape(len(R), -1).max(axis=1)
    return (err > _ROTATION_TOL) | (np.linalg.det(R) < 0)


def _intrinsics_problem(K: np.ndarray) -> np.ndarray:
    return (K[:, 0, 0] <= 0) | (K[:, 1, 1] <= 0) | (np.abs(K[:, 2] - [0.0, 0.0, 1.0]).max(axis=1) > 1e-6)


class _Kind:
    """A numeric field kind: shape, a description, and an optional test of well-formedness."""

    def __init__(self, shape: tuple[int, ...], what: str,
                 problem: Callable[[np.ndarray], np.ndarray] | None = None, problem_text: str = ""):
        self.shape, self.what, self.problem, self.problem_text = shape, what, problem, problem_text

    def bad(self, values: Sequence[Any]) -> int | None:
        """Index of the first bad value (wrong type or shape, NaN/inf, ill-formed), or None."""
        if not len(values):
            return None
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError):  # ragged: some value has another shape
            arr = None
        if arr is None or arr.dtype.kind not in "iuf" or arr.shape != (len(values),) + self.shape:
            return next((i for i, v in enumerate(values) if self.problem_of(v) is not None), 0)
        arr = arr.astype(np.float64, copy=False)
        ok = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if ok.all() and self.problem is not None:
            ok = ~self.problem(arr)
        return None if ok.all() else int(np.argmin(ok))

    def problem_of(self, value: Any) -> str | None:
        """What is wrong with one value, or None."""
        if isinstance(value, (bool, np.bool_, str, bytes)):
            return f"expected {self.what}, got {type(value).__name__} {value!r:.80}"
        try:
            a = np.asarray(value)
        except (ValueError, TypeError):
            a = np.asarray(value, dtype=object)
        if a.dtype.kind not in "iuf":
            return f"expected {self.what} as numbers, got {type(value).__name__} {value!r:.80}"
        if a.shape != self.shape:
            return f"expected {self.what} of shape {self.shape}, got shape {a.shape}"
        if not np.isfinite(a).all():
            return "contains NaN or inf"
        if self.problem is not None and self.problem(a.astype(np.float64)[None])[0]:
            return f"{self.problem_text} (got {np.array2string(a, precision=4, separator=', ')})"
        return None


_TRANSLATION = _Kind((3,), "a translation (x, y, z)")
_QUATERNION = _Kind((4,), "a (w, x, y, z) quaternion", _quaternion_problem,
                    f"not a unit quaternion (norm 1 ± {_QUATERNION_TOL:g})")
_ROTATION = _Kind((3, 3), "a rotation matrix", _rotation_problem,
                  f"not a rotation matrix (R·Rᵀ = I to {_ROTATION_TOL:g}, det +1)")
_INTRINSICS = _Kind((3, 3), "a 3x3 camera matrix", _intrinsics_problem,
                    "not a camera matrix (positive focal lengths, last row 0 0 1)")
_TIMESTAMP = _Kind((), "a timestamp (µs)")


def _fail(source: str, token: str, field: str, problem: str) -> DataError:
    return DataError(f"{source}: sample {token}: {field}: {problem}")


def _require_mapping(record: Any, keys: Sequence[str], source: str, token: str, where: str) -> None:
    if not isinstance(record, Mapping):
        raise DataError(f"{source}: sample {token}: {where or 'the info entry'} is a {type(record).__name__}, "
                        "not a dict")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{source}: sample {token} {where + ' ' if where else ''}lacks "
                        f"{'keys' if where else 'info keys'} {missing}")


def _require_str(value: Any, source: str, token: str, field: str) -> None:
    if not isinstance(value, str):
        raise _fail(source, token, field, f"expected a path string, got {type(value).__name__} {value!r:.80}")


def _numeric_fields(info: Mapping[str, Any]):
    """(kind, value, field path) of every numeric field of one (structurally valid) record."""
    yield _TIMESTAMP, info["timestamp"], "timestamp"
    for frame in ("lidar2ego", "ego2global"):
        yield _TRANSLATION, info[f"{frame}_translation"], f"{frame}_translation"
        yield _QUATERNION, info[f"{frame}_rotation"], f"{frame}_rotation"
    for cam, rec in info["cams"].items():
        yield _TRANSLATION, rec["sensor2ego_translation"], f"cams.{cam}.sensor2ego_translation"
        yield _QUATERNION, rec["sensor2ego_rotation"], f"cams.{cam}.sensor2ego_rotation"
        yield _ROTATION, rec["sensor2lidar_rotation"], f"cams.{cam}.sensor2lidar_rotation"
        yield _TRANSLATION, rec["sensor2lidar_translation"], f"cams.{cam}.sensor2lidar_translation"
        yield _INTRINSICS, rec["camera_intrinsics"], f"cams.{cam}.camera_intrinsics"
    for s, rec in enumerate(info["sweeps"]):
        yield _ROTATION, rec["sensor2lidar_rotation"], f"sweeps[{s}].sensor2lidar_rotation"
        yield _TRANSLATION, rec["sensor2lidar_translation"], f"sweeps[{s}].sensor2lidar_translation"
        yield _TIMESTAMP, rec["timestamp"], f"sweeps[{s}].timestamp"


def _check_structure(info: Any, index: int, source: str, required: Sequence[str]) -> str:
    """Keys, containers and strings of one record; returns its token."""
    token = info.get("token", f"#{index}") if isinstance(info, Mapping) else f"#{index}"
    if type(info) is not dict or not info.keys() >= set(required):
        _require_mapping(info, required, source, token, "")
    if not isinstance(token, str):
        raise _fail(source, f"#{index}", "token", f"expected a string, got {type(token).__name__} {token!r:.80}")
    _require_str(info["lidar_path"], source, token, "lidar_path")
    location = info.get("location")
    if location is not None and not isinstance(location, str):
        raise _fail(source, token, "location", f"expected a string, got {type(location).__name__}")
    cams, sweeps = info["cams"], info["sweeps"]
    if not isinstance(cams, Mapping):
        raise _fail(source, token, "cams", f"expected a dict of cameras, got {type(cams).__name__}")
    for cam, rec in cams.items():
        if type(rec) is not dict or not rec.keys() >= _CAM_KEY_SET:
            _require_mapping(rec, CAM_KEYS, source, token, f"camera {cam}")
        _require_str(rec["data_path"], source, token, f"cams.{cam}.data_path")
    if not isinstance(sweeps, (list, tuple)):
        raise _fail(source, token, "sweeps", f"expected a list, got {type(sweeps).__name__}")
    for s, rec in enumerate(sweeps):
        if type(rec) is not dict or not rec.keys() >= _SWEEP_KEY_SET:
            _require_mapping(rec, SWEEP_KEYS, source, token, f"sweep {s}")
        _require_str(rec["data_path"], source, token, f"sweeps[{s}].data_path")
    return token


_CAM_KEY_SET, _SWEEP_KEY_SET = set(CAM_KEYS), set(SWEEP_KEYS)


def _array(value: Any, kinds: str, source: str, token: str, field: str, what: str) -> np.ndarray:
    a = value if type(value) is np.ndarray else np.asarray(value)
    if a.dtype.kind == "O" and "U" in kinds and all(isinstance(v, str) for v in a.ravel()):
        return a
    if a.dtype.kind not in kinds:
        raise _fail(source, token, field, f"expected {what}, got dtype {a.dtype}")
    return a


def _annotations(info: Mapping[str, Any], source: str, token: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Types and shapes of the annotation fields; returns (boxes, velocity, num_lidar_pts) for the
    value checks, which run over all samples at once."""
    boxes = _array(info["gt_boxes"], "iuf", source, token, "gt_boxes", "numbers")
    if boxes.size == 0:
        n, boxes = 0, np.zeros((0, 7))
    elif boxes.ndim != 2 or boxes.shape[1] != 7:
        raise _fail(source, token, "gt_boxes", f"expected shape (M, 7) (x, y, z, w, l, h, yaw), got {boxes.shape}")
    else:
        n = len(boxes)
    out = [boxes]
    for key, kinds, what, cols in (("gt_names", "US", "strings", None),
                                   ("gt_velocity", "iuf", "numbers", 2),
                                   ("num_lidar_pts", "iuf", "numbers", None),
                                   ("valid_flag", "biu", "booleans", None)):
        a = _array(info[key], kinds, source, token, key, what)
        entries = len(a) if a.ndim else 1
        if entries != n:
            raise _fail(source, token, key, f"has {entries} entries, gt_boxes has {n}")
        expected = (n,) if cols is None else (n, cols)
        if a.size and a.shape != expected:
            raise _fail(source, token, key, f"expected shape {expected}, got {a.shape}")
        if key in ("gt_velocity", "num_lidar_pts"):
            out.append(a.reshape(expected))
    return out[0], out[1], out[2]


def _check_annotation_values(info: Mapping[str, Any], source: str, token: str) -> None:
    boxes, velocity, num_pts = _annotations(info, source, token)
    if not np.isfinite(boxes).all():
        raise _fail(source, token, "gt_boxes", "contains NaN or inf")
    if np.isinf(velocity).any():
        raise _fail(source, token, "gt_velocity", "contains inf (NaN is allowed: no velocity)")
    if not np.isfinite(num_pts).all():
        raise _fail(source, token, "num_lidar_pts", "contains NaN or inf")


def check_info(info: Any, source: str, require_annotations: bool, index: int = 0) -> None:
    """Check one record field by field (slow; check_infos does many at once)."""
    token = _check_structure(info, index, source, INFO_KEYS + (ANN_KEYS if require_annotations else ()))
    for kind, value, field in _numeric_fields(info):
        if kind is _TIMESTAMP and isinstance(value, (bool, np.bool_)):
            raise _fail(source, token, field, f"expected {kind.what}, got bool")
        problem = kind.problem_of(value)
        if problem is not None:
            raise _fail(source, token, field, problem)
    if all(k in info for k in ANN_KEYS):
        _check_annotation_values(info, source, token)


def check_infos(infos: Any, source: str, require_annotations: bool) -> None:
    """Check every info record (see the module docstring); raise DataError on the first problem."""
    if not isinstance(infos, (list, tuple)):
        raise DataError(f"{source}: 'infos' is a {type(infos).__name__}, expected a list of sample records")
    required = INFO_KEYS + (ANN_KEYS if require_annotations else ())
    values: dict[_Kind, list[Any]] = {k: [] for k in (_TIMESTAMP, _TRANSLATION, _QUATERNION, _ROTATION, _INTRINSICS)}
    where: dict[_Kind, list[int]] = {k: [] for k in values}
    ts, tr, quat, rot, intr = (values[k] for k in (_TIMESTAMP, _TRANSLATION, _QUATERNION, _ROTATION, _INTRINSICS))
    boxes, velocity, num_pts, ann_samples = [], [], [], []
    for i, info in enumerate(infos):
        token = _check_structure(info, i, source, required)
        cams, sweeps = info["cams"].values(), info["sweeps"]
        ts.append(info["timestamp"])
        ts.extend(rec["timestamp"] for rec in sweeps)
        tr += (info["lidar2ego_translation"], info["ego2global_translation"])
        quat += (info["lidar2ego_rotation"], info["ego2global_rotation"])
        for rec in cams:
            tr += (rec["sensor2ego_translation"], rec["sensor2lidar_translation"])
            quat.append(rec["sensor2ego_rotation"])
            rot.append(rec["sensor2lidar_rotation"])
            intr.append(rec["camera_intrinsics"])
        for rec in sweeps:
            rot.append(rec["sensor2lidar_rotation"])
            tr.append(rec["sensor2lidar_translation"])
        n_cams, n_sweeps = len(cams), len(sweeps)
        where[_TIMESTAMP] += [i] * (1 + n_sweeps)
        where[_TRANSLATION] += [i] * (2 + 2 * n_cams + n_sweeps)
        where[_QUATERNION] += [i] * (2 + n_cams)
        where[_ROTATION] += [i] * (n_cams + n_sweeps)
        where[_INTRINSICS] += [i] * n_cams
        if all(k in info for k in ANN_KEYS):
            b, v, n = _annotations(info, source, token)
            boxes.append(b)
            velocity.append(v)
            num_pts.append(n)
            ann_samples.append(i)
    # Timestamps must be numbers, not strings or bools (which numpy would quietly turn into numbers).
    bad = next((j for j, t in enumerate(ts) if isinstance(t, (bool, np.bool_)) or
                not isinstance(t, (int, float, np.integer, np.floating))), None)
    for kind in values:
        j = bad if kind is _TIMESTAMP and bad is not None else kind.bad(values[kind])
        if j is not None:
            check_info(infos[where[kind][j]], source, require_annotations, where[kind][j])
            raise DataError(f"{source}: sample #{where[kind][j]}: a {kind.what} is not valid")  # pragma: no cover
    if boxes and not (np.isfinite(np.concatenate(boxes)).all() and not np.isinf(np.concatenate(velocity)).any()
                      and np.isfinite(np.concatenate(num_pts).astype(np.float64)).all()):
        for i in ann_samples:
            _check_annotation_values(infos[i], source, infos[i]["token"])

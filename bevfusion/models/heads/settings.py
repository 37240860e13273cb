"""Typed train / test settings of the detection heads (the official `train_cfg` / `test_cfg` sections).

A head reads its options from one of these frozen dataclasses, checked once when it is built, instead of
looking keys up in a mapping at every call: a misspelt key, a string where a number belongs or a missing
grid size fails at construction with the config path (`model.heads.object.train_cfg: unknown key
min_radus (did you mean min_radius?)`), not in the middle of the first training step.

`settings_from(cls, value, path)` accepts an instance of `cls`, a mapping of the official keys, or None.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, TypeVar

__all__ = ["TransFusionTrainSettings", "TransFusionTestSettings", "CenterHeadTrainSettings", "CenterHeadTestSettings",
           "settings_from"]

T = TypeVar("T")


def _floats(n: int | None = None):
    return {"kind": "floats", "n": n}


def _ints(n: int | None = None):
    return {"kind": "ints", "n": n}


def _field(default: Any = dataclasses.MISSING, **meta: Any):
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TransFusionTrainSettings:
    """TransFusion `train_cfg`: BEV grid of the targets, Gaussian heatmap radius, label weights, the assigner."""

    point_cloud_range: tuple = _field(**_floats(6))
    grid_size: tuple = _field(**_ints())
    voxel_size: tuple = _field(**_floats())
    out_size_factor: int = _field(8, kind="int")
    gaussian_overlap: float = _field(0.1, kind="float")
    min_radius: int = _field(2, kind="int")
    pos_weight: float = _field(-1.0, kind="float")
    code_weights: Optional[tuple] = _field(None, **_floats())
    assigner: Any = _field(None, kind="object")
    dataset: str = _field("nuScenes", kind="str")


@dataclass(frozen=True)
class TransFusionTestSettings:
    """TransFusion `test_cfg`: the proposal grid, and the optional post-NMS (`nms_type`: None, circle, rotate)."""

    dataset: str = _field("nuScenes", kind="str")
    grid_size: Optional[tuple] = _field(None, **_ints())
    out_size_factor: Optional[int] = _field(None, kind="int")
    voxel_size: Optional[tuple] = _field(None, **_floats())
    pc_range: Optional[tuple] = _field(None, **_floats())
    nms_type: Optional[str] = _field(None, kind="str")
    pre_maxsize: Optional[int] = _field(None, kind="int")
    post_maxsize: Optional[int] = _field(None, kind="int")


@dataclass(frozen=True)
class CenterHeadTrainSettings:
    """CenterHead `train_cfg`: target grid, Gaussian radius, the number of target slots per sample."""

    point_cloud_range: tuple = _field(**_floats(6))
    grid_size: tuple = _field(**_ints())
    voxel_size: tuple = _field(**_floats())
    out_size_factor: int = _field(kind="int")
    max_objs: int = _field(kind="int")
    dense_reg: int = _field(1, kind="int")
    gaussian_overlap: float = _field(0.1, kind="float")
    min_radius: int = _field(2, kind="int")
    code_weights: Optional[tuple] = _field(None, **_floats())


@dataclass(frozen=True)
class CenterHeadTestSettings:
    """CenterHead `test_cfg`: score filter, centre range, and the per-task NMS (`nms_type` circle or rotate,
    one value or one per task; `min_radius` per task for circle NMS; `nms_scale` per task and class)."""

    post_center_limit_range: Optional[tuple] = _field(None, **_floats(6))
    max_per_img: int = _field(500, kind="int")
    max_pool_nms: bool = _field(False, kind="bool")
    min_radius: Optional[tuple] = _field(None, **_floats())
    score_threshold: float = _field(0.0, kind="float")
    out_size_factor: Optional[int] = _field(None, kind="int")
    voxel_size: Optional[tuple] = _field(None, **_floats())
    nms_type: Any = _field("rotate", kind="nms_type")
    pre_max_size: Optional[int] = _field(None, kind="int")
    post_max_size: Optional[int] = _field(None, kind="int")
    nms_thr: Optional[float] = _field(None, kind="float")
    nms_scale: Any = _field(None, kind="object")
    pc_range: Optional[tuple] = _field(None, **_floats())


def _convert(value: Any, meta: Mapping[str, Any], path: str) -> Any:
    kind = meta.get("kind", "object")
    if value is None or kind == "object":
        return value
    try:
        if kind in ("floats", "ints"):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError
            cast = float if kind == "floats" else _int
            out = tuple(cast(v) for v in value)
            if meta.get("n") is not None and len(out) != meta["n"]:
                raise ValueError(f"{path}: expected {meta['n']} numbers, got {len(out)}")
            return out
        if kind == "int":
            return _int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "nms_type":  # one name or one per task
            if isinstance(value, str) or (isinstance(value, Sequence) and all(isinstance(v, str) for v in value)):
                return value if isinstance(value, str) else tuple(value)
            raise TypeError
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(path):
            raise
        want = {"floats": "a list of numbers", "ints": "a list of integers", "int": "an integer", "float": "a number",
                "bool": "true or false", "str": "a string", "nms_type": "a name or a list of names"}[kind]
        raise ValueError(f"{path}: expected {want}, got {value!r}") from None
    raise AssertionError(kind)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise TypeError
    return int(v)


def settings_from(cls: type[T], value: T | Mapping[str, Any] | None, path: str) -> T | None:
    """`value` as a `cls` instance: mappings are checked key by key (unknown, missing, wrongly typed keys
    fail with `path`), None stays None."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: expected a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    from bevfusion.registry import check_keys

    check_keys(value, list(fields), [n for n, f in fields.items() if f.default is dataclasses.MISSING], path)
    return cls(**{k: _convert(v, fields[k].metadata, f"{path}.{k}") for k, v in value.items()})

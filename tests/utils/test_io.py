"""Restricted unpickling and atomic writes."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from bevfusion.utils.io import (
    UnsafePickleError,
    atomic_write_text,
    dump_pickle,
    load_pickle,
    loads_pickle,
)


def _info():
    return {
        "infos": [{
            "token": "abc",
            "gt_boxes": np.random.default_rng(0).normal(size=(3, 7)),
            "gt_names": np.array(["car", "truck", "movable_object.debris"]),
            "valid_flag": np.array([True, False, True]),
            "num_lidar_pts": np.array([3, 0, 1]),
            "sensor2lidar_rotation": np.eye(3, dtype=np.float32),
            "timestamp": 1533201470448696,
            "scalars": (np.float64(1.5), np.int64(2), np.bool_(True), np.float32(0.25)),
            "sweeps": [],
        }],
        "metadata": {"version": "v1.0-mini"},
    }


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_info_like_data_round_trips(protocol):
    obj = _info()
    assert _equal(loads_pickle(pickle.dumps(obj, protocol=protocol)), obj)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


class _Custom:
    pass


@pytest.mark.parametrize("payload", [_Evil(), _Custom(), {"nested": [_Evil()]}, np.array([_Custom()], dtype=object),
                                     pickle.loads])
def test_code_and_classes_are_refused(tmp_path, payload):
    path = tmp_path / "infos.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError, match=str(path)):
        load_pickle(path)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(_info())[:50])
    with pytest.raises(pickle.UnpicklingError, match="cut.pkl"):
        load_pickle(path)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_pickle(tmp_path / "nope.pkl")


def test_dump_is_atomic(tmp_path):
    path = tmp_path / "out" / "infos.pkl"
    dump_pickle(_info(), path)
    assert _equal(load_pickle(path), _info())

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        dump_pickle({"x": Unpicklable()}, path)
    assert _equal(load_pickle(path), _info())  # the previous file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["infos.pkl"]  # no temp file left
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"

"""The error raised for bad input data: info files, point clouds, images and devkit JSON tables.

`DataError` is a ValueError (and a KeyError, so that code written against the older KeyError for a
missing info key keeps working); its message names the file, the sample token and the field, e.g.
`nuscenes_infos_val.pkl: sample 3e8750f3: cams.CAM_FRONT.camera_intrinsics: contains NaN or inf`.
A data file that does not exist raises `DataFileNotFoundError`, which is also a FileNotFoundError.
"""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["DataError", "DataFileNotFoundError", "load_json"]


class DataError(ValueError, KeyError):
    """Input data that would give wrong results: the message names file, sample token and field."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A file an info record refers to does not exist."""


def load_json(path: str | os.PathLike) -> Any:
    """`json.load` of a file whose decoding errors name the file (json's own do not)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not readable as JSON ({exc}); truncated or damaged?") from None

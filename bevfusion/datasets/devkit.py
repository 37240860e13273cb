"""nuscenes-devkit objects whose load errors name the file (the devkit's JSON errors do not)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bevfusion.datasets.errors import DataError, DataFileNotFoundError, load_json

__all__ = ["open_nuscenes", "open_nuscenes_map"]


def _first_broken_json(files) -> None:
    """Raise the DataError of the first file that does not parse (called once loading has failed)."""
    for path in files:
        if path.is_file():
            load_json(path)


def open_nuscenes(version: str, dataroot: str | os.PathLike, verbose: bool = False):
    """`nuscenes.NuScenes(version, dataroot)`; a damaged table raises DataError naming its file."""
    from nuscenes import NuScenes

    table_root = Path(dataroot) / version
    if not table_root.is_dir():
        raise DataFileNotFoundError(f"{table_root}: the nuScenes tables of {version} are missing "
                                    f"(expected {version}/sample.json etc. under {dataroot})")
    try:
        return NuScenes(version=version, dataroot=os.fspath(dataroot), verbose=verbose)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _first_broken_json(sorted(table_root.glob("*.json")))
        raise DataError(f"{table_root}: a table is not readable as JSON ({exc})") from None


def open_nuscenes_map(dataroot: str | os.PathLike, location: str):
    """`NuScenesMap(dataroot, location)`; a damaged map expansion file raises DataError naming it."""
    from nuscenes.map_expansion.map_api import NuScenesMap

    try:
        return NuScenesMap(dataroot=os.fspath(dataroot), map_name=str(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        path = Path(dataroot) / "maps" / "expansion" / f"{location}.json"
        _first_broken_json([path])
        raise DataError(f"{path}: not readable as JSON ({exc})") from None

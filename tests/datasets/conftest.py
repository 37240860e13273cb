"""Info files and the GT database made once per session from the synthetic drive."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def converted(synthetic_root, tmp_path_factory):
    """(dataset root, folder with the pickles, {split: info path}, dbinfos path, NuScenes)."""
    pytest.importorskip("nuscenes")
    from nuscenes import NuScenes

    from bevfusion.datasets.converters.nuscenes import create_groundtruth_database, create_nuscenes_infos

    out = tmp_path_factory.mktemp("infos")
    written = create_nuscenes_infos(synthetic_root, "v1.0-mini", out, max_sweeps=10)
    db = create_groundtruth_database(synthetic_root, written["train"], out)
    return synthetic_root, out, written, db, NuScenes("v1.0-mini", str(synthetic_root), verbose=False)

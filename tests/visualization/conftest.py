"""Info files made once per session from the synthetic drive (the pattern of tests/datasets/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def viz_infos(synthetic_root, tmp_path_factory):
    """(dataset root, {split: info path}) for the session's synthetic drive."""
    pytest.importorskip("nuscenes")
    from bevfusion.datasets.converters.nuscenes import create_nuscenes_infos

    out = tmp_path_factory.mktemp("viz_infos")
    written = create_nuscenes_infos(synthetic_root, "v1.0-mini", out, max_sweeps=10)
    return synthetic_root, written


@pytest.fixture
def strict_rerun():
    """rerun in strict mode for the test: a dropped or malformed archetype raises instead of logging a warning."""
    rr = pytest.importorskip("rerun")
    before = rr.error_utils.strict_mode()
    rr.set_strict_mode(True)
    yield
    rr.set_strict_mode(before)

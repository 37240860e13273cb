"""Test-wide settings.

Without a CUDA device, Triton kernels run in the interpreter on CPU tensors. The variable must be set
before any kernel module is imported, because `triton.jit` reads it when a kernel is decorated.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

os.environ.setdefault("BEVFUSION_NO_PROGRESS", "1")

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share two cores: one intra-op thread each avoids oversubscription.
    # Tests that check thread safety set their own thread count.
    torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic nuScenes-format drive (v1.0-mini: 10 scenes x 2 samples, 400x225 images),
    generated once per session; returns its dataroot (pathlib.Path). Treat it as read-only."""
    from bevfusion.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "nuscenes", seed=0, num_scenes=10, samples_per_scene=2,
                    image_size=(400, 225), lidar_azimuth_steps=540, workers=1, show_progress=False)


@pytest.fixture(scope="session")
def converted(synthetic_root, tmp_path_factory):
    """Info files and the GT database of the synthetic drive, made once per session:
    (dataset root, folder with the pickles, {split: info path}, dbinfos path, NuScenes)."""
    pytest.importorskip("nuscenes")
    from nuscenes import NuScenes

    from bevfusion.datasets.converters.nuscenes import create_groundtruth_database, create_nuscenes_infos

    out = tmp_path_factory.mktemp("infos")
    written = create_nuscenes_infos(synthetic_root, "v1.0-mini", out, max_sweeps=10)
    db = create_groundtruth_database(synthetic_root, written["train"], out)
    return synthetic_root, out, written, db, NuScenes("v1.0-mini", str(synthetic_root), verbose=False)

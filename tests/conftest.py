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

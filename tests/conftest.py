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

"""Choosing an op's implementation: every op has a reference, a CPU path and a Triton path."""
from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["resolve_impl", "has_numba", "numba_jit"]


def resolve_impl(op: str, impl: str, device: torch.device, impls: Sequence[str]) -> str:
    """Check `impl` against `impls` and the tensors' device; "auto" means Triton on CUDA, else CPU.

    Triton on CPU tensors runs only under the interpreter (TRITON_INTERPRET=1, as the tests set it).
    """
    if impl not in impls:
        raise ValueError(f"{op}: impl must be one of {tuple(impls)}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if impl == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: impl='cpu' needs CPU tensors, got {device}")
    if impl == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(f"{op}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing "
                             "triton); use impl='cpu' or CUDA tensors")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: impl='triton' supports CUDA tensors, got {device}")
    return impl


def has_numba() -> bool:
    try:
        import numba  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def numba_jit(fn):
    """`numba.njit(cache=True, nogil=True)(fn)`: compiled on first call and cached on disk. Without
    numba the function stays plain Python (the ops check `has_numba` before picking these paths)."""
    try:
        import numba
    except ImportError:  # pragma: no cover
        return fn
    return numba.njit(cache=True, nogil=True)(fn)

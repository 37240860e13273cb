"""Choosing an op's implementation: one vocabulary for every op.

Every op takes `impl`, one of `BACKENDS`:

  "auto"       "triton" for CUDA tensors, "cpu" otherwise
  "reference"  slow, obvious torch / Python (the tests' oracle), any device
  "cpu"        the CPU fast path (numba kernels, or torch ops on CPU tensors); CPU tensors only
  "triton"     the GPU path (Triton kernels and the torch glue around them); CUDA tensors, or CPU
               tensors under TRITON_INTERPRET=1 (the tests)

An op with several algorithms per backend names them with a separate argument (the sparse conv's
`dataflow`), never with more `impl` names. No backend stands in for another: an impl that cannot run on
the given tensors raises ValueError, naming the op and the accepted names.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["BACKENDS", "resolve_impl"]

BACKENDS = ("auto", "reference", "cpu", "triton")


def resolve_impl(op: str, impl: str, device: torch.device, impls: Sequence[str] = BACKENDS) -> str:
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

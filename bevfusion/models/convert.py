"""Official checkpoints → ours.

Module and parameter names already follow the official state_dict keys, so converting only means:
reading the file safely, stripping a DDP `module.` prefix, and bringing sparse-conv weights from the
official spconv-1 layout (kx, ky, kz, Cin, Cout) — or spconv-2's (Cout, kx, ky, kz, Cin) — to ours
(kx*ky*kz, Cin, Cout). The model being loaded tells which keys are sparse convs and their kernel
sizes, so nothing is guessed from shapes alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["read_checkpoint", "convert_state_dict", "load_converted", "LoadReport"]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)` (never unpickles code).

    mmcv checkpoints keep plain metadata (strings, tuples, numbers) beside `state_dict`; a file that
    needs anything else to unpickle is refused with the name of the offending global.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError with the global's name
        raise ValueError(f"{path}: cannot be read safely with weights_only=True: {exc}") from None
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
        return dict(ckpt)
    if isinstance(ckpt, Mapping) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"state_dict": dict(ckpt)}
    raise ValueError(f"{path}: expected a checkpoint with a 'state_dict' or a plain state dict")


def _sparse_convs(model: nn.Module) -> dict[str, nn.Module]:
    from bevfusion.ops.sparse.nn import SubMConv3d, SparseConv3d, SparseInverseConv3d

    kinds = (SubMConv3d, SparseConv3d, SparseInverseConv3d)
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, kinds)}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official (or spconv-2) state dict → one that `model.load_state_dict` accepts."""
    from bevfusion.ops.sparse.convert import convert_weight

    out = {}
    for key, value in state_dict.items():
        out[key[len("module."):] if key.startswith("module.") else key] = value
    for key, conv in _sparse_convs(model).items():
        if key in out:
            try:
                out[key] = convert_weight(out[key], conv.kernel_size, conv.in_channels, conv.out_channels)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    return out


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        if self.clean:
            return "all keys matched"
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{name}: {shown}")
        return "; ".join(parts)


def load_converted(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Convert and load; with `strict`, any missing/unexpected/mismatched key raises with the list."""
    converted = convert_state_dict(state_dict, model)
    own = model.state_dict()
    report = LoadReport(
        missing=sorted(k for k in own if k not in converted),
        unexpected=sorted(k for k in converted if k not in own),
        mismatched=sorted(f"{k} {tuple(converted[k].shape)} vs {tuple(own[k].shape)}" for k in own
                          if k in converted and tuple(converted[k].shape) != tuple(own[k].shape)),
    )
    if strict and not report.clean:
        raise KeyError(f"checkpoint does not fit the model: {report}")
    loadable = {k: v for k, v in converted.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(loadable, strict=False)
    return report

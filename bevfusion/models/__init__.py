"""Model parts with the official module tree; `build_model(cfg.model)` builds a whole model.

`build_model` and `build_decoder` build from config sections through the one registry
(`bevfusion.registry`); the classes themselves take finished modules (see `bevfusion.models.bevfusion`).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

__all__ = ["build_model", "build_decoder"]


def build_model(cfg: Mapping[str, Any], path: str = "model", init_weights: bool = True) -> nn.Module:
    """Build the `model` section of a config (official files included), e.g. a `BEVFusion`.

    Every sub-section is built through `bevfusion.registry` by its official `type` name; a bad key or
    type fails with a `RegistryError` naming its config path. `init_weights=False` leaves out the camera
    backbone's own init (pretrained file or random init): use it when a checkpoint is loaded right after.
    """
    from bevfusion.registry import REGISTRY

    return REGISTRY.build(cfg, path, **({} if init_weights else {"init_weights": False}))


def build_decoder(cfg: Mapping[str, Any], path: str = "model.decoder") -> nn.Module:
    """The BEV decoder alone (`backbone` → `neck`) from a config's `model.decoder` section."""
    from bevfusion.models.bevfusion import Decoder

    return Decoder.from_config(cfg, path)

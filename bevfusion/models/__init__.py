"""Model parts with the official module tree; `build_model(cfg.model)` builds a whole model."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

__all__ = ["build_model"]


def build_model(cfg: Mapping[str, Any], path: str = "model") -> nn.Module:
    """Build the `model` section of a config (official files included), e.g. a `BEVFusion`.

    Every sub-section is built through `bevfusion.registry` by its official `type` name; a bad key or
    type fails with its config path.
    """
    from bevfusion.registry import REGISTRY, RegistryError, check_kwargs

    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise RegistryError(f"{path}: expected a mapping with a 'type' key")
    cls = REGISTRY.get(cfg["type"], path)
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    check_kwargs(cls, kwargs, path)
    if "path" in cls.__init__.__code__.co_varnames:  # containers name their children's config paths
        kwargs["path"] = path
    return cls(**kwargs)

"""The one registry from the official config `type` names to our classes.

The table is a literal, hand-written mapping from a `type` name to "module:attribute", so that a grep
for a name finds its class and nothing is registered as a side effect of an import. Classes are
imported on first lookup, which keeps `import bevfusion` light.

`build(cfg, path)` builds an object from a mapping with a `type` key: it checks the remaining keys
against the constructor's signature and fails with the config path, e.g.
`model.fuser: unknown key in_channel for ConvFuser (expected in_channels, out_channels)`.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable, Mapping

__all__ = ["Registry", "RegistryError", "REGISTRY", "build", "lookup"]


class RegistryError(KeyError):
    """An unknown `type` name or a config that does not fit the constructor."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name → class table whose values are classes or "module:attribute" strings (imported lazily)."""

    def __init__(self, name: str, table: Mapping[str, str | Callable[..., Any]]):
        self.name = name
        self._table = dict(table)

    def __contains__(self, type_name: str) -> bool:
        return type_name in self._table

    def names(self) -> list[str]:
        return sorted(self._table)

    def get(self, type_name: str, path: str = "") -> Callable[..., Any]:
        """Return the class registered as `type_name`, or raise RegistryError with close matches."""
        if not isinstance(type_name, str):
            raise RegistryError(f"{path or 'type'}: type must be a string, got {type_name!r}")
        if type_name not in self._table:
            close = difflib.get_close_matches(type_name, self._table, n=3, cutoff=0.6)
            lower = [n for n in self._table if n.lower() == type_name.lower() and n not in close]
            suggestions = lower + close
            hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
            where = f"{path}: " if path else ""
            raise RegistryError(f"{where}unknown {self.name} type {type_name!r}{hint}")
        target = self._table[type_name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            module = importlib.import_module(module_name)
            target = getattr(module, attr)
            self._table[type_name] = target
        return target

    def build(self, cfg: Mapping[str, Any], path: str = "", **extra: Any) -> Any:
        """Build `cfg["type"]` with the other keys (plus `extra`) as keyword arguments.

        Keys are checked against the constructor's signature first, so a typo fails with the config
        path and the accepted names instead of a bare TypeError from deep inside.
        """
        if not isinstance(cfg, Mapping):
            raise RegistryError(f"{path or 'config'}: expected a mapping with a 'type' key, "
                                f"got {type(cfg).__name__}")
        if "type" not in cfg:
            raise RegistryError(f"{path or 'config'}: missing 'type' key (keys: {', '.join(map(str, cfg))})")
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        kwargs.update(extra)
        cls = self.get(cfg["type"], path)
        check_kwargs(cls, kwargs, path)
        return cls(**kwargs)


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], path: str = "") -> None:
    """Raise RegistryError naming `path` if `kwargs` cannot be passed to `fn`."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters
    name = getattr(fn, "__name__", str(fn))
    where = f"{path}: " if path else ""
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, accepted, n=1)
                hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
            raise RegistryError(f"{where}unknown key {', '.join(hints)} for {name} "
                                f"(expected {', '.join(accepted)})")
    missing = [n for n, p in params.items()
               if n != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and n not in kwargs]
    if missing:
        raise RegistryError(f"{where}missing key {', '.join(missing)} for {name}")


# The official `type` names we implement. Add a line when a class lands; keep it sorted by section.
REGISTRY = Registry("bevfusion", {
    # models
    "BEVFusion": "bevfusion.models.bevfusion:BEVFusion",
    # camera encoder
    "ResNet": "bevfusion.models.camera.backbones.resnet:ResNet",
    "SwinTransformer": "bevfusion.models.camera.backbones.swin:SwinTransformer",
    "GeneralizedLSSFPN": "bevfusion.models.camera.necks:GeneralizedLSSFPN",
    "LSSTransform": "bevfusion.models.camera.vtransforms:LSSTransform",
    "DepthLSSTransform": "bevfusion.models.camera.vtransforms:DepthLSSTransform",
    # LiDAR encoder
    "Voxelization": "bevfusion.ops.voxelize:Voxelization",
    "SparseEncoder": "bevfusion.models.lidar.sparse_encoder:SparseEncoder",
    # fuser
    "ConvFuser": "bevfusion.models.fusers:ConvFuser",
    # decoder
    "SECOND": "bevfusion.models.decoder.second:SECOND",
    "SECONDFPN": "bevfusion.models.decoder.secondfpn:SECONDFPN",
    "GeneralizedResNet": "bevfusion.models.decoder.resnet:GeneralizedResNet",
    "LSSFPN": "bevfusion.models.decoder.resnet:LSSFPN",
    # heads
    "TransFusionHead": "bevfusion.models.heads.transfusion:TransFusionHead",
    "CenterHead": "bevfusion.models.heads.centerpoint:CenterHead",
    "BEVSegmentationHead": "bevfusion.models.heads.segm:BEVSegmentationHead",
})


def lookup(type_name: str, path: str = "") -> Callable[..., Any]:
    """Class registered under an official `type` name (see REGISTRY)."""
    return REGISTRY.get(type_name, path)


def build(cfg: Mapping[str, Any], path: str = "", **extra: Any) -> Any:
    """Build an object from a `{type: Name, ...}` mapping through REGISTRY (see Registry.build)."""
    return REGISTRY.build(cfg, path, **extra)

"""The one registry from the official config `type` names to our classes, and the one builder.

The table is a literal, hand-written mapping from a `type` name to "module:attribute", so that a grep
for a name finds its class and nothing is registered as a side effect of an import. Classes are
imported on first lookup, which keeps `import bevfusion` light.

`build(cfg, path)` builds an object from a mapping with a `type` key. REGISTRY (the model tree; built with
`nested=True`) builds bottom-up: every nested section with a
`type` key (a loss, a box coder, an assigner and its costs, a norm / activation / conv layer spec, ...) is
built first, in the order the keys appear, and the constructor receives finished objects. Keys are checked
against the constructor's signature, and every failure, from an unknown type to a constructor's own
ValueError, is one `RegistryError` that names the full config path, e.g.
`model.heads.object.train_cfg.assigner.cls_cost: unknown key wieght for FocalLossCost (did you mean weight?)`.

Two kinds of entries change that:
* a class with a `from_config(cfg, path, **options)` classmethod builds its own sections (containers such
  as `BEVFusion`, which choose what to build from several keys); it gets the raw mapping, its path and the
  `extra` keyword arguments of `build`;
* a name in `PARTIAL` builds a `Partial`: the checked keyword arguments, completed by the module that uses
  it (CenterHead's `separate_head` needs the per-task heads it makes).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

__all__ = ["Registry", "RegistryError", "REGISTRY", "Partial", "build", "built", "lookup", "check_keys", "check_kwargs"]


class RegistryError(ValueError, KeyError):
    """A config section that cannot be built: unknown `type`, a key the constructor does not take, or
    the constructor's own error; the message starts with the section's config path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Partial:
    """A checked, not yet called constructor: `partial(**more)` builds it with the remaining arguments."""

    def __init__(self, target: Callable[..., Any], kwargs: Mapping[str, Any], path: str = ""):
        self.target, self.kwargs, self.path = target, dict(kwargs), path

    def __call__(self, **more: Any) -> Any:
        kwargs = {**self.kwargs, **more}
        check_kwargs(self.target, kwargs, self.path)
        return _call(self.target, kwargs, self.path)

    def __repr__(self) -> str:
        return f"Partial({getattr(self.target, '__name__', self.target)}, {self.kwargs})"


def _call(target: Callable[..., Any], kwargs: Mapping[str, Any], path: str) -> Any:
    """`target(**kwargs)`; a ValueError/TypeError of the constructor becomes a RegistryError with the path."""
    try:
        return target(**kwargs)
    except (ValueError, TypeError) as exc:  # RegistryError included: one from a nested build already has its path
        where = f"{path}: " if path else ""
        message = str(exc)
        raise RegistryError(message if path and message.startswith(path) else f"{where}{message}") from exc


class Registry:
    """A name → class table whose values are classes or "module:attribute" strings (imported lazily)."""

    def __init__(self, name: str, table: Mapping[str, str | Callable[..., Any]], partial: tuple[str, ...] = (),
                 nested: bool = False):
        self.name = name
        self._table = dict(table)
        self._partial = set(partial)
        self.nested = nested  # build nested `type` sections first (the model tree); False: pass them through

    def register(self, type_name: str, target: str | Callable[..., Any], partial: bool = False) -> None:
        """Add (or replace) a name; `target` is a class/callable or a "module:attribute" string."""
        self._table[type_name] = target
        (self._partial.add if partial else self._partial.discard)(type_name)

    @contextlib.contextmanager
    def registered(self, table: Mapping[str, str | Callable[..., Any]]) -> Iterator["Registry"]:
        """Names added for the duration of a `with` block (tests, plug-ins tried in a notebook)."""
        saved, saved_partial = dict(self._table), set(self._partial)
        try:
            for name, target in table.items():
                self.register(name, target)
            yield self
        finally:
            self._table, self._partial = saved, saved_partial

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
        """Build `cfg["type"]` with the other keys (nested sections built first, plus `extra`) as keyword
        arguments; see the module docstring."""
        if not isinstance(cfg, Mapping):
            raise RegistryError(f"{path or 'config'}: expected a mapping with a 'type' key, "
                                f"got {type(cfg).__name__}")
        if "type" not in cfg:
            raise RegistryError(f"{path or 'config'}: missing 'type' key (keys: {', '.join(map(str, cfg))})")
        type_name = cfg["type"]
        target = self.get(type_name, path)
        raw = {k: v for k, v in cfg.items() if k != "type"}
        from_config = getattr(target, "from_config", None) if isinstance(target, type) else None
        if from_config is not None:
            return _call(from_config, {"cfg": raw, "path": path, **extra}, path)
        kwargs = {k: self.build_nested(v, _join(path, k)) for k, v in raw.items()} if self.nested else raw
        kwargs.update(extra)
        partial = type_name in self._partial
        check_kwargs(target, kwargs, path, complete=not partial)
        if partial:
            return Partial(target, kwargs, path)
        return _call(target, kwargs, path)

    def build_nested(self, value: Any, path: str) -> Any:
        """A config value with every `type` section in it built (mappings and lists are walked)."""
        if isinstance(value, Mapping):
            if isinstance(value.get("type"), str):
                return self.build(value, path)
            return {k: self.build_nested(v, _join(path, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.build_nested(v, f"{path}[{i}]") for i, v in enumerate(value))
        return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def check_keys(given: Iterable[Any], accepted: Sequence[str], required: Sequence[str] = (), path: str = "",
               owner: str | None = None) -> None:
    """Raise RegistryError naming `path` for a key of `given` not in `accepted` (with the closest accepted
    name) or a `required` name missing from `given`; `owner` names what the keys are for."""
    given = list(given)
    where = f"{path}: " if path else ""
    of = f" for {owner}" if owner else ""
    unknown = [k for k in given if k not in accepted]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(accepted), n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else str(k))
        raise RegistryError(f"{where}unknown key {', '.join(hints)}{of} (expected {', '.join(accepted)})")
    missing = [k for k in required if k not in given]
    if missing:
        raise RegistryError(f"{where}missing key {', '.join(missing)}{of}")


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], path: str = "", complete: bool = True) -> None:
    """Raise RegistryError naming `path` if `kwargs` cannot be passed to `fn` (with `complete=False`, required
    arguments may still be missing: a `Partial` gets them later)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    accepted = list(kwargs) if any(p.kind is p.VAR_KEYWORD for p in params.values()) else named
    required = [n for n in named if params[n].default is params[n].empty] if complete else []
    check_keys(kwargs, accepted, required, path, getattr(fn, "__name__", str(fn)))


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
    "DynamicScatter": "bevfusion.ops.voxelize:DynamicScatter",
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
    "SeparateHead": "bevfusion.models.heads.centerpoint:SeparateHead",  # partial: CenterHead adds the heads
    # box coders, assigner, matching costs
    "TransFusionBBoxCoder": "bevfusion.models.heads.coders:TransFusionBBoxCoder",
    "CenterPointBBoxCoder": "bevfusion.models.heads.coders:CenterPointBBoxCoder",
    "HungarianAssigner3D": "bevfusion.models.heads.assigners:HungarianAssigner3D",
    "FocalLossCost": "bevfusion.models.heads.assigners:FocalLossCost",
    "BBoxBEVL1Cost": "bevfusion.models.heads.assigners:BBoxBEVL1Cost",
    "IoU3DCost": "bevfusion.models.heads.assigners:IoU3DCost",
    "BboxOverlaps3D": "bevfusion.models.heads.assigners:BboxOverlaps3D",
    # losses
    "FocalLoss": "bevfusion.models.heads.losses:FocalLoss",
    "GaussianFocalLoss": "bevfusion.models.heads.losses:GaussianFocalLoss",
    "L1Loss": "bevfusion.models.heads.losses:L1Loss",
    # layer specs (norm_cfg, act_cfg, conv_cfg, upsample_cfg, init_cfg sections)
    "BN": "bevfusion.models.layers:BN",
    "BN1d": "bevfusion.models.layers:BN1d",
    "BN2d": "bevfusion.models.layers:BN2d",
    "BN3d": "bevfusion.models.layers:BN3d",
    "SyncBN": "bevfusion.models.layers:SyncBN",
    "GN": "bevfusion.models.layers:GN",
    "LN": "bevfusion.models.layers:LN",
    "ReLU": "bevfusion.models.layers:ReLU",
    "LeakyReLU": "bevfusion.models.layers:LeakyReLU",
    "GELU": "bevfusion.models.layers:GELU",
    "Sigmoid": "bevfusion.models.layers:Sigmoid",
    "SiLU": "bevfusion.models.layers:SiLU",
    "Swish": "bevfusion.models.layers:Swish",
    "Tanh": "bevfusion.models.layers:Tanh",
    "Conv": "bevfusion.models.layers:Conv",
    "Conv1d": "bevfusion.models.layers:Conv1d",
    "Conv2d": "bevfusion.models.layers:Conv2d",
    "Conv3d": "bevfusion.models.layers:Conv3d",
    "deconv": "bevfusion.models.layers:deconv",
    "ConvTranspose2d": "bevfusion.models.layers:ConvTranspose2d",
    "Pretrained": "bevfusion.models.layers:Pretrained",
}, partial=("SeparateHead",), nested=True)


def built(value: Any, path: str, default: Mapping[str, Any] | None = None, kind: type | tuple[type, ...] | None = None
          ) -> Any:
    """`value` as a finished object, for constructors that take objects but also their config in Python:
    a `{type: ...}` mapping is built through REGISTRY, None gives `default` built (or None), anything else
    passes through. With `kind`, the result must be an instance of it."""
    if value is None:
        if default is None:
            return None
        value = default
    if isinstance(value, Mapping):
        value = REGISTRY.build(value, path)
    if kind is not None and not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RegistryError(f"{path}: expected a {names} (or its config), got {type(value).__name__}")
    return value


def lookup(type_name: str, path: str = "") -> Callable[..., Any]:
    """Class registered under an official `type` name (see REGISTRY)."""
    return REGISTRY.get(type_name, path)


def build(cfg: Mapping[str, Any], path: str = "", **extra: Any) -> Any:
    """Build an object from a `{type: Name, ...}` mapping through REGISTRY (see Registry.build)."""
    return REGISTRY.build(cfg, path, **extra)

"""Optimizers from the `optimizer` config section, with mmcv's `paramwise_cfg` and frozen parameters.

`optimizer: {type: AdamW, lr: 2.0e-4, weight_decay: 0.01, paramwise_cfg: {custom_keys: {...}}}` is
built as mmcv 1.4's DefaultOptimizerConstructor does:

- `custom_keys` match by substring of the full parameter name; the longest key wins (ties:
  alphabetical order), its `lr_mult` / `decay_mult` scale the base lr / weight decay.
- Parameters no custom key matches get `bias_lr_mult`, `bias_decay_mult` (biases outside norm layers),
  `norm_decay_mult` (weights and biases of norm layers) and `dwconv_decay_mult` (depth-wise convs).
- Frozen parameters (`requires_grad` false, set by the model from its config or by the top-level
  `freeze` list of name prefixes) are left out of the optimizer.

mmcv gives every parameter its own group; groups with identical settings are merged here, which is
the same optimisation and much faster.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from bevfusion.engine.settings import as_number, as_section

__all__ = ["OptimizerConfigError", "build_optimizer", "check_optimizer_config", "check_paramwise_config",
           "param_groups", "apply_freeze"]

_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
_PARAMWISE_KEYS = {"custom_keys", "bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult",
                   "bypass_duplicate"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class OptimizerConfigError(ValueError):
    """A bad `optimizer` / `freeze` config; the message names the key."""


def apply_freeze(model: nn.Module, patterns: Iterable[str] | None) -> list[str]:
    """Set `requires_grad=False` on parameters whose name starts with one of `patterns`.

    Returns the frozen names; a pattern that matches nothing raises (a typo would silently train).
    """
    patterns = list(patterns or [])
    frozen = []
    for pattern in patterns:
        hits = [n for n, p in model.named_parameters() if n == pattern or n.startswith(pattern.rstrip(".") + ".")]
        if not hits:
            raise OptimizerConfigError(f"freeze: {pattern!r} matches no parameter of the model")
        for name, param in model.named_parameters():
            if name in hits:
                param.requires_grad_(False)
        frozen.extend(hits)
    return frozen


def _module_of(model: nn.Module) -> dict[str, nn.Module]:
    """parameter name -> module owning it."""
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    return owner


def check_paramwise_config(paramwise_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`optimizer.paramwise_cfg` with its keys and multipliers checked (numbers >= 0), as a plain dict."""
    cfg = as_section(paramwise_cfg, "optimizer.paramwise_cfg", OptimizerConfigError)
    unknown = sorted(set(cfg) - _PARAMWISE_KEYS)
    if unknown:
        raise OptimizerConfigError(f"optimizer.paramwise_cfg: unknown key(s) {', '.join(unknown)} "
                                   f"(expected {', '.join(sorted(_PARAMWISE_KEYS))})")
    custom = cfg["custom_keys"] = as_section(cfg.get("custom_keys"), "optimizer.paramwise_cfg.custom_keys",
                                             OptimizerConfigError)
    for key, value in custom.items():
        where = f"optimizer.paramwise_cfg.custom_keys.{key}"
        value = custom[key] = as_section(value, where, OptimizerConfigError)
        bad = sorted(set(value) - {"lr_mult", "decay_mult"})
        if bad:
            raise OptimizerConfigError(f"{where}: unknown key(s) {', '.join(bad)} (expected lr_mult, decay_mult)")
        for mult in ("lr_mult", "decay_mult"):
            if mult in value:
                value[mult] = as_number(value[mult], f"{where}.{mult}", OptimizerConfigError, low=0)
    for mult in ("bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult"):
        if mult in cfg:
            cfg[mult] = as_number(cfg[mult], f"optimizer.paramwise_cfg.{mult}", OptimizerConfigError, low=0)
    return cfg


def param_groups(model: nn.Module, lr: float, weight_decay: float | None,
                 paramwise_cfg: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Parameter groups (`params`, `lr`, and `weight_decay` when given) for the trainable parameters."""
    cfg = check_paramwise_config(paramwise_cfg)
    custom = cfg.get("custom_keys") or {}
    keys = sorted(sorted(custom), key=len, reverse=True)
    owner = _module_of(model)
    groups: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lr_mult, decay_mult = 1.0, 1.0
        key = next((k for k in keys if k in name), None)
        if key is not None:
            lr_mult = float((custom[key] or {}).get("lr_mult", 1.0))
            decay_mult = float((custom[key] or {}).get("decay_mult", 1.0))
        else:  # mmcv's precedence: norm, then depth-wise conv, then plain bias
            module = owner[name]
            is_norm = isinstance(module, _NORMS)
            is_dw = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
            is_bias = name.rsplit(".", 1)[-1] == "bias"
            if is_bias and not is_norm:
                lr_mult = float(cfg.get("bias_lr_mult", 1.0))
            if is_norm:
                decay_mult = float(cfg.get("norm_decay_mult", 1.0))
            elif is_dw:
                decay_mult = float(cfg.get("dwconv_decay_mult", 1.0))
            elif is_bias:
                decay_mult = float(cfg.get("bias_decay_mult", 1.0))
        group_lr = lr * lr_mult
        group_wd = None if weight_decay is None else weight_decay * decay_mult
        group = groups.setdefault((group_lr, group_wd), {"params": [], "param_names": [], "lr": group_lr})
        if group_wd is not None:
            group["weight_decay"] = group_wd
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise OptimizerConfigError("optimizer: the model has no trainable parameter (all frozen?)")
    return list(groups.values())


def check_optimizer_config(cfg: Mapping[str, Any]) -> tuple[str, float, float | None, dict[str, Any], dict[str, Any]]:
    """Type-check an `optimizer` section without a model: (type, lr, weight_decay, paramwise_cfg, other
    keyword arguments of the optimizer). Raises OptimizerConfigError naming the key."""
    cfg = as_section(cfg, "optimizer", OptimizerConfigError)
    kind = cfg.pop("type", None)
    if kind not in _OPTIMIZERS:
        raise OptimizerConfigError(f"optimizer.type: expected one of {', '.join(_OPTIMIZERS)}, got {kind!r}")
    paramwise = check_paramwise_config(cfg.pop("paramwise_cfg", None))
    if "lr" not in cfg:
        raise OptimizerConfigError("optimizer.lr: required")
    lr = as_number(cfg.pop("lr"), "optimizer.lr", OptimizerConfigError, low=0)
    wd = cfg.pop("weight_decay", None)
    if kind == "AdamW" and wd is None:
        wd = 0.01  # torch's AdamW default, which the official LiDAR-only seg config relies on
    if wd is not None:
        wd = as_number(wd, "optimizer.weight_decay", OptimizerConfigError, low=0)
    if "betas" in cfg:
        betas = cfg["betas"]
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise OptimizerConfigError(f"optimizer.betas: expected a pair of numbers in [0, 1), got {betas!r}")
        cfg["betas"] = tuple(as_number(b, f"optimizer.betas[{i}]", OptimizerConfigError, low=0, high=1, high_open=True)
                             for i, b in enumerate(betas))
    for key, low_open in (("momentum", False), ("eps", True), ("dampening", False)):
        if cfg.get(key) is not None:
            cfg[key] = as_number(cfg[key], f"optimizer.{key}", OptimizerConfigError, low=0, low_open=low_open)
    return kind, lr, wd, paramwise, cfg


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of an `optimizer` config section (AdamW, Adam or SGD) over the trainable parameters.

    Each param group keeps `param_names` (so a checkpoint names what it holds) besides the usual keys.
    """
    kind, lr, wd, paramwise, kwargs = check_optimizer_config(cfg)
    groups = param_groups(model, lr, wd, paramwise)
    try:
        return _OPTIMIZERS[kind](groups, lr=lr, **kwargs)
    except TypeError as exc:
        raise OptimizerConfigError(f"optimizer: {exc}") from None

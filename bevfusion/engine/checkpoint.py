"""Training checkpoints: atomic writes, a `latest.pth` pointer, safe loading, config/model checks.

A checkpoint is a dict that `torch.load(weights_only=True)` reads (tensors, numbers, strings, lists,
dicts; no pickled objects):

    state_dict   model weights (unwrapped from DDP), official key names
    optimizer    optimizer.state_dict() (param groups keep `param_names`, `initial_lr`, ...)
    scheduler    the schedule position (epoch, iter) and the lr / momentum it last set
    scaler       GradScaler.state_dict() or None
    rng          one entry per rank: python / numpy / torch / cuda generator states as tensors and lists
    meta         format, epoch (epochs completed or the epoch in progress), inner_iter (iterations done
                 in that epoch), iter (global), iters_per_epoch, world_size, config (resolved YAML text),
                 config_hash, time, torch version

Files in the work dir: `epoch_{N}.pth` after N epochs (the newest `max_keep_ckpts` kept) and
`latest.pth`, a hard link to the newest epoch file or a mid-epoch snapshot, replaced atomically. Every
file is written to a temp file and renamed, so a crash while writing leaves the previous files intact.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from bevfusion.config import to_plain
from bevfusion.utils.io import atomic_writer

__all__ = [
    "CheckpointError", "FORMAT", "RUNTIME_KEYS", "rng_state", "set_rng_state", "config_text", "config_hash",
    "config_diff", "save_checkpoint", "link_latest", "prune_checkpoints", "load_checkpoint", "check_config",
    "load_model_state", "find_latest", "check_finite",
]

FORMAT = "bevfusion-train-v1"
LATEST = "latest.pth"

# Config keys that may change between a run and its resumption: they do not affect the trajectory.
RUNTIME_KEYS = ("log_config", "checkpoint_config", "evaluation", "data.val", "data.test", "data.workers_per_gpu",
                "load_from", "resume_from", "work_dir", "run_dir", "cudnn_benchmark")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run; the message names file and keys."""

    exit_code = 1  # bevfusion.utils.cli: the run failed on an input file


# ---------------------------------------------------------------------------------------------------
# RNG states as weights_only-loadable values


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states of this process."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another machine shape: keep what each local device can use
            for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------------
# Config identity


def config_text(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=True, default_flow_style=None)


def _drop(tree: Any, keys: Sequence[str]) -> Any:
    tree = to_plain(tree)
    for key in keys:
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return tree


def config_hash(cfg: Mapping[str, Any], ignore: Sequence[str] = RUNTIME_KEYS) -> str:
    """SHA-256 of the config without the runtime keys (what decides the training trajectory)."""
    return hashlib.sha256(config_text(_drop(cfg, ignore)).encode()).hexdigest()


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config trees, as `a.b: old -> new` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                out.append(f"{path}: {_short(old[key])} -> (absent)")
            elif key not in old:
                out.append(f"{path}: (absent) -> {_short(new[key])}")
            else:
                out.extend(config_diff(old[key], new[key], path))
        return out
    return [] if old == new else [f"{prefix}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: Any | None, rng: list[dict[str, Any]] | None, cfg: Mapping[str, Any] | None,
                    meta: Mapping[str, Any], scheduler: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temp file + rename) and return its path."""
    model = getattr(model, "module", model)
    ckpt = {
        "meta": {
            "format": FORMAT,
            **dict(meta),
            "config": config_text(cfg) if cfg is not None else None,
            "config_hash": config_hash(cfg) if cfg is not None else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": str(torch.__version__),
        },
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": dict(scheduler or {}),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng,
    }
    return atomic_writer(path, lambda f: torch.save(ckpt, f))


def link_latest(work_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Point `work_dir/latest.pth` at `target` atomically: a hard link (no copy, no symlink), or a copy
    where the file system has no hard links."""
    work_dir = Path(work_dir)
    latest = work_dir / LATEST
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=f".{LATEST}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, latest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return latest


def prune_checkpoints(work_dir: str | os.PathLike, max_keep: int | None) -> list[Path]:
    """Delete all but the newest `max_keep` `epoch_N.pth` files (keep all when max_keep <= 0 / None)."""
    if not max_keep or max_keep <= 0:
        return []
    files = sorted(((int(m.group(1)), p) for p in Path(work_dir).glob("epoch_*.pth")
                    if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name))), key=lambda t: t[0])
    removed = [p for _, p in files[:-max_keep]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def find_latest(work_dir: str | os.PathLike) -> Path | None:
    path = Path(work_dir) / LATEST
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint with `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: missing, truncated/corrupted, unsafe to unpickle, or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip errors, EOF, unpickling refusals all mean: not usable
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupted or unsafe): "
                              f"{type(exc).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("meta"), dict) or ckpt["meta"].get("format") != FORMAT:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a bevfusion training checkpoint (top-level keys {keys}); "
                              "use --load-from to start from a weights-only or official checkpoint")
    missing = [k for k in ("state_dict", "optimizer", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def check_config(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], source: str = "checkpoint",
                 ignore: Sequence[str] = RUNTIME_KEYS) -> None:
    """Raise CheckpointError listing every config key that differs from the one the checkpoint was
    written with (runtime keys such as log_config, checkpoint_config and evaluation are ignored)."""
    meta = ckpt["meta"]
    if meta.get("config_hash") == config_hash(cfg, ignore):
        return
    old = yaml.safe_load(meta["config"]) if meta.get("config") else {}
    diff = config_diff(_drop(old, ignore), _drop(cfg, ignore))
    if not diff:
        return
    lines = "\n  ".join(diff[:30]) + (f"\n  ... and {len(diff) - 30} more" if len(diff) > 30 else "")
    raise CheckpointError(f"{source} was written with a different config; mismatched keys "
                          f"(checkpoint -> now):\n  {lines}")


def check_finite(state_dict: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> None:
    """Raise CheckpointError naming `source` and the first floating-point weight with NaN or inf values
    (a diverged run's weights give boxes with NaN coordinates that fail far from the cause)."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                kind = "NaN" if bool(torch.isnan(value).any()) else "inf"
                raise CheckpointError(f"{source}: {key} has {bad} {kind} value(s) of {value.numel()}; "
                                      "the checkpoint is unusable (did the training diverge?)")


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load that names missing, unexpected and shape-mismatched keys."""
    model = getattr(model, "module", model)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in own
                    if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:10])}" + (" ..." if len(keys) > 10 else ""))
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)

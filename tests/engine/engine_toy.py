"""A toy model and dataset with the engine's contracts, and a CLI running the real training entry point
(`bevfusion.engine.launch.main`) on them. The engine tests start it in subprocesses:

    python tests/engine/engine_toy.py CONFIG [tools/train.py options]

Fault injection (test only): TOY_KILL_AT=k SIGKILLs the process in its k-th training forward;
TOY_CRASH_IN_SAVE=n SIGKILLs it halfway through writing its n-th checkpoint file; TOY_FULL_AT_SAVE=n lowers
the process's file size limit (RLIMIT_FSIZE) to 4 KiB just before its n-th checkpoint file, so that the
operating system refuses the write (EFBIG) as a full disk would (ENOSPC).
"""
from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset


class ToyData(Dataset):
    """`n` samples {x (dim,), y (2,), metas}; `noise` > 0 adds augmentation drawn from the torch, numpy and
    python RNGs, as a real pipeline would."""

    def __init__(self, n: int = 24, dim: int = 4, noise: float = 0.0, type: str | None = None):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(dim, 2, generator=g))
        self.noise, self.epoch = noise, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        if self.noise:
            x = x + self.noise * (torch.randn(x.shape) + float(np.random.uniform(-1, 1)) + random.uniform(-1, 1))
        return {"x": x, "y": self.y[i], "metas": {"index": int(i), "epoch": self.epoch}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ToyModel(nn.Module):
    """Two named parts (`encoders`, `heads`) so paramwise keys and freezing have something to match."""

    def __init__(self, dim: int = 4, hidden: int = 16, dropout: float = 0.0, type: str | None = None):
        super().__init__()
        self.encoders = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.heads = nn.Linear(hidden, 2)
        self.forwards = 0

    def forward(self, batch: dict):
        out = self.heads(self.encoders(batch["x"]))
        if not self.training:
            return [{"pred": o} for o in out]
        self.forwards += 1
        if os.environ.get("TOY_KILL_AT") and self.forwards == int(os.environ["TOY_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        outputs = {"loss_mse": F.mse_loss(out, batch["y"]), "loss_l1": [0.1 * (out - batch["y"]).abs().mean()],
                   "stat_mean": out.mean()}
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            outputs["stats/rank1_only"] = torch.tensor(5.0)  # ranks may report different keys
        return outputs


def build_model(cfg) -> ToyModel:
    return ToyModel(**{k: v for k, v in cfg.items() if k != "type"})


def build_dataset(cfg, path: str = "data.train", seed: int = 0, **overrides) -> ToyData:
    return ToyData(**{k: v for k, v in cfg.items() if k != "type"})


def evaluate(model: nn.Module, epoch: int) -> dict:
    """Validation that consumes RNG (the trainer must shield training from it)."""
    model.eval()
    data = ToyData()
    with torch.no_grad():
        preds = torch.stack([r["pred"] for r in model({"x": data.x})])
    torch.rand(100)
    np.random.rand(10)
    random.random()
    return {"mse": float(F.mse_loss(preds, data.y))}


def toy_config(**changes) -> dict:
    cfg = {
        "seed": 3,
        "max_epochs": 3,
        "model": {"type": "ToyModel", "dim": 4, "hidden": 16, "dropout": 0.1},
        "data": {"samples_per_gpu": 4, "workers_per_gpu": 0, "train": {"type": "ToyData", "n": 26, "noise": 0.05}},
        "optimizer": {"type": "AdamW", "lr": 1.0e-2, "weight_decay": 0.01,
                      "paramwise_cfg": {"custom_keys": {"heads": {"lr_mult": 0.5}}}},
        "optimizer_config": {"grad_clip": {"max_norm": 1.0, "norm_type": 2}},
        "lr_config": {"policy": "cyclic"},
        "momentum_config": {"policy": "cyclic"},
        "checkpoint_config": {"interval": 1, "max_keep_ckpts": 2, "iter_interval": 0},
        "log_config": {"interval": 1, "hooks": [{"type": "TextLoggerHook"}]},
        "evaluation": {"interval": 1},
        "fp16": None,
    }
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(toy_config(**changes), sort_keys=False))
    return path


def _crash_in_save(n: int) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _full_at_save(n: int) -> None:
    import resource

    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("TOY_CRASH_IN_SAVE"):
        _crash_in_save(int(os.environ["TOY_CRASH_IN_SAVE"]))
    if os.environ.get("TOY_FULL_AT_SAVE"):
        _full_at_save(int(os.environ["TOY_FULL_AT_SAVE"]))
    from bevfusion.engine.launch import main

    sys.exit(main(sys.argv[1:], model_builder=build_model, dataset_builder=build_dataset,
                  evaluate_fn=None if os.environ.get("TOY_NO_EVAL") else evaluate))

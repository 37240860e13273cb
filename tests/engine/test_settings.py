"""Typed config reads (bevfusion.engine.settings) and the engine's early check of a whole config
(`check_settings`): every trainable config of the repository passes, and each wrong type or
impossible value is refused with its dotted key."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from bevfusion.config import load_config
from bevfusion.engine.launch import TrainConfigError, check_settings
from bevfusion.engine.optim import OptimizerConfigError, check_optimizer_config
from bevfusion.engine.schedules import build_schedules
from bevfusion.engine.settings import as_bool, as_int, as_number

REPO = Path(__file__).resolve().parents[2]
TRAINABLE = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                   if (load_config(p).get("optimizer") or {}).get("type"))


def test_numbers():
    assert as_number(2, "k") == 2.0 and as_number("2e-4", "k") == 2e-4 and as_number(0.5, "k", low=0, high=1) == 0.5
    for bad in ("abc", None, True, [1], float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^k: expected a (finite )?number"):
            as_number(bad, "k")
    with pytest.raises(ValueError, match="k: must be > 0"):
        as_number(0, "k", low=0, low_open=True)
    with pytest.raises(ValueError, match="k: must be < 1"):
        as_number(1, "k", high=1, high_open=True)
    assert math.isinf(as_number("inf", "k", finite=False))


def test_integers_and_bools():
    assert as_int(3, "k") == 3 and as_int(2.0, "k") == 2 and as_int("4", "k") == 4
    for bad in (1.5, "1.5", "x", True, None, float("nan")):
        with pytest.raises(TrainConfigError, match="^k: expected an integer"):
            as_int(bad, "k", TrainConfigError)
    with pytest.raises(ValueError, match="k: must be >= 1, got -1"):
        as_int(-1, "k", low=1)
    assert as_bool(True, "k") is True and as_bool(None, "k") is False and as_bool(0, "k") is False
    with pytest.raises(ValueError, match="k: expected true or false, got 'false'"):
        as_bool("false", "k")  # bool("false") would be True


@pytest.mark.parametrize("config", TRAINABLE)
def test_every_trainable_config_passes(config):
    cfg = load_config(REPO / config)
    settings = check_settings(cfg)
    assert settings.max_epochs >= 1 and settings.samples_per_gpu >= 1
    build_schedules(cfg, settings.max_epochs, 7)


def test_settings_read_as_before():
    """The values the trainer gets are those the config holds (the synthetic config, read by hand)."""
    cfg = load_config(REPO / "configs/nuscenes/synthetic/fusion.yaml")
    s = check_settings(cfg)
    assert s.max_epochs == cfg.runner.max_epochs and s.samples_per_gpu == cfg.data.samples_per_gpu
    assert s.workers_per_gpu == cfg.data.workers_per_gpu and s.seed == int(cfg.get("seed") or 0)
    assert s.grad_clip == dict(cfg.optimizer_config.grad_clip)
    assert s.log_interval == cfg.log_config.interval and s.eval_interval == cfg.evaluation.interval
    assert s.ckpt_interval == cfg.checkpoint_config.interval
    assert s.max_keep_ckpts == cfg.checkpoint_config.max_keep_ckpts


@pytest.mark.parametrize("override, error, key", [
    ("max_epochs=-1", TrainConfigError, "runner.max_epochs"),
    ("max_epochs=2.5", TrainConfigError, "runner.max_epochs"),
    ("data.samples_per_gpu=1.5", TrainConfigError, "data.samples_per_gpu"),
    ("data.samples_per_gpu=0", TrainConfigError, "data.samples_per_gpu"),
    ("data.workers_per_gpu=-2", TrainConfigError, "data.workers_per_gpu"),
    ("optimizer.lr=abc", OptimizerConfigError, "optimizer.lr"),
    ("optimizer.weight_decay=-0.1", OptimizerConfigError, "optimizer.weight_decay"),
    ("+optimizer.betas=[0.9, 1.5]", OptimizerConfigError, r"optimizer.betas\[1\]"),
    ("+optimizer.paramwise_cfg={custom_keys: {head: {lr_mult: x}}}", OptimizerConfigError,
     "optimizer.paramwise_cfg.custom_keys.head.lr_mult"),
    ("optimizer_config.grad_clip.max_norm=0", TrainConfigError, "optimizer_config.grad_clip.max_norm"),
    ("optimizer_config.grad_clip.norm_type=two", TrainConfigError, "optimizer_config.grad_clip.norm_type"),
    ("checkpoint_config.interval=1.5", TrainConfigError, "checkpoint_config.interval"),
    ("+checkpoint_config.iter_interval=-5", TrainConfigError, "checkpoint_config.iter_interval"),
    ("log_config.interval=-1", TrainConfigError, "log_config.interval"),
    ("log_config.hooks=5", TrainConfigError, "log_config.hooks"),
    ("seed=-3", TrainConfigError, "seed"),
    ("+find_unused_parameters=maybe", TrainConfigError, "find_unused_parameters"),
])
def test_bad_values_name_their_key(override, error, key):
    cfg = load_config(REPO / "configs/nuscenes/synthetic/fusion.yaml", [override])
    with pytest.raises(error, match=f"^{key}: "):
        check_settings(cfg)


def test_optimizer_config_without_a_model():
    kind, lr, wd, paramwise, kwargs = check_optimizer_config({"type": "AdamW", "lr": "2e-4", "betas": [0.9, 0.99]})
    assert (kind, lr, wd, kwargs) == ("AdamW", 2e-4, 0.01, {"betas": (0.9, 0.99)})
    assert paramwise == {"custom_keys": {}}

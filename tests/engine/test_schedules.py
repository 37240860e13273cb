"""lr / momentum schedules and the optimizer constructor against values written out from the mmcv 1.4
formulas of the facts sheet (§1.7), never by calling the engine twice."""
import math

import pytest
import torch
from torch import nn

from bevfusion.engine.optim import OptimizerConfigError, apply_freeze, build_optimizer
from bevfusion.engine.schedules import ScheduleError, build_schedules


def cos_anneal(start, end, t):
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def run_schedule(cfg, epochs, iters_per_epoch, lr=1e-4, betas=(0.9, 0.999)):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr, betas=betas)
    sched = build_schedules(cfg, epochs, iters_per_epoch)
    lrs, moms = [], []
    for e in range(epochs):
        for i in range(iters_per_epoch):
            it = e * iters_per_epoch + i
            sched.apply(opt, e, it)
            lrs.append(opt.param_groups[0]["lr"])
            moms.append(opt.param_groups[0]["betas"][0])
    return lrs, moms


def test_cyclic_defaults_lidar_only():
    # 2 epochs x 50 iterations: 100 iterations, 40 up (int(0.4 * 100)), 60 down.
    lrs, moms = run_schedule({"lr_config": {"policy": "cyclic"}, "momentum_config": {"policy": "cyclic"}}, 2, 50)
    base = 1e-4
    for it in range(100):
        if it < 40:
            lr = base + (10 * base - base) * (1 - math.cos(math.pi * it / 40)) / 2
            mom = 0.9 + (0.9 * 0.85 / 0.95 - 0.9) * (1 - math.cos(math.pi * it / 40)) / 2
        else:
            t = (it - 40) / 60
            lr = base * 1e-4 + (10 * base - base * 1e-4) * (1 + math.cos(math.pi * t)) / 2
            mom = 0.9 + (0.9 * 0.85 / 0.95 - 0.9) * (1 + math.cos(math.pi * t)) / 2
        assert lrs[it] == pytest.approx(lr, rel=1e-12), it
        assert moms[it] == pytest.approx(mom, rel=1e-12), it
    assert lrs[0] == pytest.approx(base) and lrs[40] == pytest.approx(10 * base)
    assert moms[40] == pytest.approx(0.9 * 0.85 / 0.95) and moms[40] == pytest.approx(0.805, abs=1e-3)


def test_cyclic_float_target_ratio_camera_only():
    # target_ratio 5.0 means (5.0, 5e-5): peak 1e-3 and end 1e-8 for base 2e-4 (facts 1.6.3).
    cfg = {"lr_config": {"policy": "cyclic", "target_ratio": 5.0, "cyclic_times": 1, "step_ratio_up": 0.4}}
    lrs, _ = run_schedule(cfg, 3, 7, lr=2e-4)  # 21 iterations, int(8.4) = 8 up
    assert lrs[8] == pytest.approx(1e-3)
    assert lrs[20] == pytest.approx(cos_anneal(1e-3, 1e-8, 12 / 13))
    assert lrs[3] == pytest.approx(2e-4 + (1e-3 - 2e-4) * (1 - math.cos(math.pi * 3 / 8)) / 2)


def test_cyclic_two_cycles():
    cfg = {"lr_config": {"policy": "cyclic", "target_ratio": [4, 0.5], "cyclic_times": 2, "step_ratio_up": 0.5}}
    lrs, _ = run_schedule(cfg, 1, 20, lr=1.0)  # cycles of 10, 5 up
    assert lrs[:10] == pytest.approx(lrs[10:])
    assert lrs[5] == pytest.approx(4.0) and lrs[7] == pytest.approx(cos_anneal(4.0, 0.5, 2 / 5))


def test_cosine_annealing_with_linear_warmup_fusion():
    # Fusion det: CosineAnnealing by epoch, min_lr_ratio 1e-3, linear warmup 500 iterations from 1/3.
    cfg = {"lr_config": {"policy": "CosineAnnealing", "warmup": "linear", "warmup_iters": 500,
                         "warmup_ratio": 0.33333333, "min_lr_ratio": 1.0e-3},
           "momentum_config": {"policy": "cyclic"}}
    epochs, per_epoch, base = 6, 300, 2e-4
    lrs, moms = run_schedule(cfg, epochs, per_epoch, lr=base)
    min_lr = 2e-7
    for it in range(epochs * per_epoch):
        e = it // per_epoch
        regular = min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * e / 6))
        expected = regular * (1 - (1 - it / 500) * (1 - 0.33333333)) if it < 500 else regular
        assert lrs[it] == pytest.approx(expected, rel=1e-12), it
    assert lrs[0] == pytest.approx(base / 3, rel=1e-6)
    assert len(set(lrs[600:900])) == 1  # set once per epoch after the warmup
    # the inherited cyclic momentum still runs per iteration
    assert moms[int(0.4 * 1800)] == pytest.approx(0.9 * 0.85 / 0.95)


def test_cosine_by_iter_min_lr_and_step():
    cfg = {"lr_config": {"policy": "CosineAnnealing", "by_epoch": False, "min_lr": 1e-6}}
    lrs, _ = run_schedule(cfg, 2, 10, lr=1e-3)
    assert lrs[13] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 13 / 20)))
    lrs, _ = run_schedule({"lr_config": {"policy": "step", "step": [1, 2], "gamma": 0.5,
                                         "warmup": "constant", "warmup_iters": 2, "warmup_ratio": 0.25}}, 3, 4)
    assert lrs == pytest.approx([2.5e-5, 2.5e-5, 1e-4, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5] + [2.5e-5] * 4)
    lrs, _ = run_schedule({"lr_config": {"policy": "fixed", "warmup": "exp", "warmup_iters": 4,
                                         "warmup_ratio": 0.01}}, 1, 6)
    assert lrs == pytest.approx([1e-4 * 0.01 ** (1 - i / 4) for i in range(4)] + [1e-4, 1e-4])


def test_sgd_momentum_and_lr_mult_base():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.01}], lr=0.1, momentum=0.95)
    sched = build_schedules({"lr_config": {"policy": "cyclic"}, "momentum_config": {"policy": "cyclic"}}, 1, 10)
    sched.apply(opt, 0, 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0) and opt.param_groups[1]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)


@pytest.mark.parametrize("cfg, message", [
    ({"lr_config": {"policy": "poly"}}, "lr_config.policy"),
    ({"lr_config": {"policy": "cyclic", "target_ration": 3}}, "target_ration"),
    ({"lr_config": {"policy": "CosineAnnealing"}}, "min_lr"),
    ({"lr_config": {"policy": "fixed", "warmup": "linear"}}, "warmup_iters"),
    ({"momentum_config": {"policy": "step"}}, "momentum_config.policy"),
    ({"lr_config": {"policy": "cyclic", "target_ratio": "abc"}}, "lr_config.target_ratio"),
    ({"lr_config": {"policy": "cyclic", "target_ratio": [10, "x"]}}, r"lr_config.target_ratio\[1\]"),
    ({"lr_config": {"policy": "cyclic", "cyclic_times": 0}}, "lr_config.cyclic_times"),
    ({"lr_config": {"policy": "step", "step": [8, "x"]}}, r"lr_config.step\[1\]"),
    ({"lr_config": {"policy": "step", "step": 8, "gamma": "x"}}, "lr_config.gamma"),
    ({"lr_config": {"policy": "CosineAnnealing", "min_lr_ratio": "x"}}, "lr_config.min_lr_ratio"),
    ({"lr_config": {"policy": "CosineAnnealing", "min_lr_ratio": 0.1, "by_epoch": "false"}}, "lr_config.by_epoch"),
    ({"lr_config": {"policy": "fixed", "warmup": "linear", "warmup_iters": 2.5}}, "lr_config.warmup_iters"),
    ({"lr_config": {"policy": "fixed", "warmup": "linear", "warmup_iters": 5, "warmup_ratio": "x"}},
     "lr_config.warmup_ratio"),
    ({"lr_config": "cyclic"}, "lr_config"),
    ({"momentum_config": {"policy": "cyclic", "step_ratio_up": 1.5}}, "momentum_config.step_ratio_up"),
])
def test_schedule_errors_name_the_key(cfg, message):
    with pytest.raises(ScheduleError, match=message):
        build_schedules(cfg, 2, 5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"camera": nn.ModuleDict({"backbone": nn.Linear(3, 3)})})
        self.absolute_pos_embed = nn.Parameter(torch.zeros(3))
        self.conv = nn.Conv2d(4, 4, 3, groups=4)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(3, 2)


def _settings(opt):
    out = {}
    for g in opt.param_groups:
        for n in g["param_names"]:
            out[n] = (g["lr"], g["weight_decay"])
    return out


def test_paramwise_custom_keys_camera_only():
    net = Net()
    cfg = {"type": "AdamW", "lr": 2e-4, "weight_decay": 0.01,
           "paramwise_cfg": {"custom_keys": {"absolute_pos_embed": {"decay_mult": 0},
                                             "encoders.camera.backbone": {"lr_mult": 0.1},
                                             "encoders": {"lr_mult": 0.5}}}}
    opt = build_optimizer(net, cfg)
    s = _settings(opt)
    # longest matching key wins
    assert s["encoders.camera.backbone.weight"] == pytest.approx((2e-5, 0.01))
    assert s["encoders.camera.backbone.bias"] == pytest.approx((2e-5, 0.01))
    assert s["absolute_pos_embed"] == pytest.approx((2e-4, 0.0))
    assert s["head.weight"] == pytest.approx((2e-4, 0.01))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    assert isinstance(opt, torch.optim.AdamW)


def test_paramwise_bias_norm_dwconv():
    net = Net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 1.0, "weight_decay": 1.0, "momentum": 0.9,
                                "paramwise_cfg": {"bias_lr_mult": 2.0, "bias_decay_mult": 0.5,
                                                  "norm_decay_mult": 0.0, "dwconv_decay_mult": 0.25}})
    s = _settings(opt)
    assert s["head.bias"] == (2.0, 0.5) and s["head.weight"] == (1.0, 1.0)
    assert s["norm.weight"] == (1.0, 0.0) and s["norm.bias"] == (1.0, 0.0)
    assert s["conv.weight"] == (1.0, 0.25) and s["conv.bias"] == (2.0, 0.25)


def test_frozen_parameters_are_excluded():
    net = Net()
    net.norm.weight.requires_grad_(False)  # e.g. norm_cfg requires_grad false
    frozen = apply_freeze(net, ["encoders.camera"])
    assert frozen == ["encoders.camera.backbone.weight", "encoders.camera.backbone.bias"]
    opt = build_optimizer(net, {"type": "AdamW", "lr": 1e-4})
    names = {n for g in opt.param_groups for n in g["param_names"]}
    assert "norm.weight" not in names and not any(n.startswith("encoders") for n in names)
    assert opt.param_groups[0]["weight_decay"] == 0.01  # torch's AdamW default
    with pytest.raises(OptimizerConfigError, match="'encoder.camera'"):
        apply_freeze(net, ["encoder.camera"])


@pytest.mark.parametrize("cfg, message", [
    ({"type": "Adagrad", "lr": 1}, "optimizer.type"),
    ({"type": "AdamW"}, "optimizer.lr"),
    ({"type": "AdamW", "lr": 1, "paramwise_cfg": {"custom_key": {}}}, "custom_key"),
    ({"type": "AdamW", "lr": 1, "paramwise_cfg": {"custom_keys": {"head": {"lr_mul": 2}}}}, "lr_mul"),
    ({"type": "AdamW", "lr": "abc"}, "optimizer.lr: expected a number"),
    ({"type": "SGD", "lr": 1, "momentum": "x"}, "optimizer.momentum"),
    ({"type": "AdamW", "lr": 1, "betas": [0.9]}, "optimizer.betas"),
    ({"type": "AdamW", "lr": 1, "paramwise_cfg": {"norm_decay_mult": "x"}}, "optimizer.paramwise_cfg.norm_decay_mult"),
])
def test_optimizer_errors_name_the_key(cfg, message):
    with pytest.raises(OptimizerConfigError, match=message):
        build_optimizer(Net(), cfg)


OFFICIAL = {
    "det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml": "cosine",
    "det/transfusion/secfpn/lidar/voxelnet_0p075.yaml": "cyclic",
    "det/centerhead/lssfpn/camera/256x704/swint/default.yaml": "cyclic5",
    "seg/fusion-bev256d2-lss.yaml": "cyclic",
    "seg/camera-bev256d2.yaml": "cyclic",
    "seg/lidar-centerpoint-bev128.yaml": "cyclic",
}


@pytest.mark.parametrize("leaf", sorted(OFFICIAL))
def test_official_configs_build(leaf):
    """Every official training section builds, with the lr the facts sheet gives at 40 % and at the end."""
    from pathlib import Path

    from bevfusion.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "nuscenes" / leaf)
    epochs, per_epoch = cfg.runner.max_epochs, 100
    sched = build_schedules(cfg, epochs, per_epoch)
    base = cfg.optimizer.lr
    total = epochs * per_epoch
    peak_it, last = int(0.4 * total), total - 1
    if OFFICIAL[leaf] == "cosine":
        assert epochs == 6 and base == 2e-4
        assert sched.lr_at(base, 0, 0) == pytest.approx(base / 3, rel=1e-6)
        assert sched.lr_at(base, 5, last) == pytest.approx(2e-7 + 0.5 * (base - 2e-7) * (1 + math.cos(math.pi * 5 / 6)))
    else:
        up = 5.0 if OFFICIAL[leaf] == "cyclic5" else 10.0
        end = 5.0 / 1e5 if OFFICIAL[leaf] == "cyclic5" else 1e-4
        assert sched.lr_at(base, peak_it // per_epoch, peak_it) == pytest.approx(up * base)
        assert sched.lr_at(base, epochs - 1, last) == pytest.approx(
            base * end + (up * base - base * end) * (1 + math.cos(math.pi * (last - peak_it) / (total - peak_it))) / 2)
    assert sched.momentum_at(0.9, 0, peak_it) == pytest.approx(0.9 * 0.85 / 0.95)
    assert cfg.optimizer_config.grad_clip == {"max_norm": 35, "norm_type": 2}
    settings = _settings(build_optimizer(Net(), cfg.optimizer))
    assert settings["head.weight"] == pytest.approx((base, 0.01))
    if "paramwise_cfg" in cfg.optimizer:
        assert settings["absolute_pos_embed"] == pytest.approx((base, 0.0))

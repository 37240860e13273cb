"""Learning-rate and momentum schedules with mmcv 1.4 semantics (facts §1.7).

A schedule is a pure function of the training position: `lr(base_lr, epoch, it)` where `epoch` is the
0-based epoch in progress and `it` the 0-based global iteration about to run. Being stateless, a
resumed run needs only the two counters to continue exactly.

Config forms (the `lr_config` / `momentum_config` sections of the official configs):

- `{policy: cyclic, target_ratio: (10, 1e-4), cyclic_times: 1, step_ratio_up: 0.4}`: per iteration,
  cosine from base to base*r0 over the first `int(step_ratio_up * max_iters // cyclic_times)` iterations
  of each cycle, then cosine down to base*r1. A float `target_ratio` r means (r, r/1e5).
- `{policy: CosineAnnealing, min_lr_ratio | min_lr, by_epoch: true}`: lr = min + (base-min)(1+cos(pi*p))/2
  with p = epoch/max_epochs (or iter/max_iters when `by_epoch` is false).
- `{policy: step, step: [8, 11], gamma: 0.1}` and `{policy: fixed}`.
- Warmup for any lr policy: `warmup: linear|constant|exp, warmup_iters, warmup_ratio`, applied per
  iteration to the regular lr while `it < warmup_iters`.
- `momentum_config: {policy: cyclic, target_ratio: (0.85/0.95, 1), ...}` scales the base momentum
  (SGD `momentum`, Adam/AdamW `betas[0]`) the same way as the cyclic lr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from bevfusion.engine.settings import as_bool, as_int, as_number

__all__ = [
    "annealing_cos", "LrSchedule", "CyclicSchedule", "CosineAnnealingSchedule", "StepSchedule",
    "FixedSchedule", "Warmup", "ScheduleSet", "build_lr_schedule", "build_momentum_schedule",
    "ScheduleError",
]


class ScheduleError(ValueError):
    """A bad `lr_config` / `momentum_config`; the message names the key."""


def annealing_cos(start: float, end: float, factor: float) -> float:
    """Cosine interpolation: `start` at factor 0, `end` at factor 1."""
    return end + 0.5 * (start - end) * (math.cos(math.pi * factor) + 1)


def _target_ratio(value: Any, key: str) -> tuple[float, float]:
    if isinstance(value, bool):
        raise ScheduleError(f"{key}: expected a number or a pair, got {value!r}")
    if isinstance(value, (int, float)):
        value = as_number(value, key, ScheduleError, low=0)
        return value, value / 1e5
    if isinstance(value, (list, tuple)) and len(value) == 1:
        first = as_number(value[0], f"{key}[0]", ScheduleError, low=0)
        return first, first / 1e5
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (as_number(value[0], f"{key}[0]", ScheduleError, low=0),
                as_number(value[1], f"{key}[1]", ScheduleError, low=0))
    raise ScheduleError(f"{key}: expected a number or a pair, got {value!r}")


class LrSchedule:
    """Base: `value(base, epoch, it)` is the regular (un-warmed) value."""

    def value(self, base: float, epoch: int, it: int) -> float:
        raise NotImplementedError

    def __call__(self, base: float, epoch: int, it: int) -> float:
        return self.value(base, epoch, it)


@dataclass
class CyclicSchedule(LrSchedule):
    """mmcv CyclicLrUpdaterHook / CyclicMomentumUpdaterHook (per iteration, cosine annealing)."""

    max_iters: int
    target_ratio: tuple[float, float] = (10.0, 1e-4)
    cyclic_times: int = 1
    step_ratio_up: float = 0.4

    def __post_init__(self):
        if not 0 <= self.step_ratio_up < 1:
            raise ScheduleError(f"step_ratio_up: must be in [0, 1), got {self.step_ratio_up}")
        self.iters_per_cycle = self.max_iters // self.cyclic_times
        self.iters_up = int(self.step_ratio_up * self.iters_per_cycle)
        # (start, end, cycle length, start ratio, end ratio), as mmcv's phases
        self.phases = [(0, self.iters_up, self.iters_per_cycle, 1.0, self.target_ratio[0]),
                       (self.iters_up, self.iters_per_cycle, self.iters_per_cycle, self.target_ratio[0],
                        self.target_ratio[1])]

    def value(self, base: float, epoch: int, it: int) -> float:
        cur = it
        for start, end, length, r0, r1 in self.phases:
            cur %= max(length, 1)
            if start <= cur < end:
                return annealing_cos(base * r0, base * r1, (cur - start) / (end - start))
        return base  # mmcv returns None past the phases; only reachable with max_iters 0


@dataclass
class CosineAnnealingSchedule(LrSchedule):
    """mmcv CosineAnnealingLrUpdaterHook: by epoch (default) or by iteration."""

    max_epochs: int
    max_iters: int
    min_lr: float | None = None
    min_lr_ratio: float | None = None
    by_epoch: bool = True

    def __post_init__(self):
        if (self.min_lr is None) == (self.min_lr_ratio is None):
            raise ScheduleError("lr_config: CosineAnnealing needs exactly one of min_lr, min_lr_ratio")

    def value(self, base: float, epoch: int, it: int) -> float:
        progress, total = (epoch, self.max_epochs) if self.by_epoch else (it, self.max_iters)
        target = base * self.min_lr_ratio if self.min_lr_ratio is not None else self.min_lr
        return annealing_cos(base, target, progress / total)


@dataclass
class StepSchedule(LrSchedule):
    """mmcv StepLrUpdaterHook: lr = base * gamma**(number of steps passed), optional min_lr."""

    step: Sequence[int] | int
    gamma: float = 0.1
    min_lr: float | None = None
    by_epoch: bool = True

    def value(self, base: float, epoch: int, it: int) -> float:
        progress = epoch if self.by_epoch else it
        if isinstance(self.step, int):
            exp = progress // self.step
        else:
            exp = sum(1 for s in self.step if progress >= s)
        lr = base * self.gamma ** exp
        return max(lr, self.min_lr) if self.min_lr is not None else lr


class FixedSchedule(LrSchedule):
    def value(self, base: float, epoch: int, it: int) -> float:
        return base


@dataclass
class Warmup:
    """mmcv warmup, per iteration, applied to the regular lr for `it < iters`."""

    kind: str
    iters: int
    ratio: float = 0.1

    def __post_init__(self):
        if self.kind not in ("linear", "constant", "exp"):
            raise ScheduleError(f"lr_config.warmup: expected linear, constant or exp, got {self.kind!r}")
        if self.iters <= 0:
            raise ScheduleError("lr_config.warmup_iters: must be positive with a warmup")
        if not 0 < self.ratio <= 1:
            raise ScheduleError(f"lr_config.warmup_ratio: must be in (0, 1], got {self.ratio}")

    def apply(self, regular: float, it: int) -> float:
        if it >= self.iters:
            return regular
        if self.kind == "constant":
            return regular * self.ratio
        if self.kind == "linear":
            k = (1 - it / self.iters) * (1 - self.ratio)
            return regular * (1 - k)
        return regular * self.ratio ** (1 - it / self.iters)


_LR_KEYS = {
    "cyclic": {"target_ratio", "cyclic_times", "step_ratio_up", "anneal_strategy", "by_epoch", "gamma"},
    "cosineannealing": {"min_lr", "min_lr_ratio", "by_epoch"},
    "step": {"step", "gamma", "min_lr", "by_epoch"},
    "fixed": {"by_epoch"},
}
_WARMUP_KEYS = {"warmup", "warmup_iters", "warmup_ratio", "warmup_by_epoch", "warmup_epochs"}


def _check_keys(cfg: Mapping[str, Any], allowed: set[str], section: str) -> None:
    unknown = sorted(set(cfg) - allowed - {"policy"})
    if unknown:
        raise ScheduleError(f"{section}: unknown key(s) {', '.join(unknown)} for policy {cfg.get('policy')!r} "
                            f"(expected {', '.join(sorted(allowed))})")


def _common_checks(cfg: Mapping[str, Any], section: str) -> None:
    if cfg.get("policy") == "cyclic" or str(cfg.get("policy", "")).lower() == "cyclic":
        if cfg.get("by_epoch", False):
            raise ScheduleError(f"{section}.by_epoch: the cyclic policy runs per iteration (by_epoch false)")
        if cfg.get("anneal_strategy", "cos") != "cos":
            raise ScheduleError(f"{section}.anneal_strategy: only 'cos' is supported")
        if cfg.get("gamma", 1) != 1:
            raise ScheduleError(f"{section}.gamma: only 1 is supported (mmcv 1.4 has no gamma)")


@dataclass
class ScheduleSet:
    """The lr schedule (with optional warmup) and the optional momentum schedule of one run."""

    lr: LrSchedule
    warmup: Warmup | None = None
    momentum: LrSchedule | None = None

    def lr_at(self, base: float, epoch: int, it: int) -> float:
        regular = self.lr(base, epoch, it)
        return self.warmup.apply(regular, it) if self.warmup is not None else regular

    def momentum_at(self, base: float, epoch: int, it: int) -> float | None:
        return None if self.momentum is None else self.momentum(base, epoch, it)

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, it: int) -> None:
        """Set every param group's lr (and momentum / betas[0]) for iteration `it` of `epoch`.

        Base values are the group's `initial_lr` / `initial_momentum`, recorded on first use.
        """
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = self.lr_at(group["initial_lr"], epoch, it)
            if self.momentum is None:
                continue
            if "betas" in group:
                group.setdefault("initial_momentum", group["betas"][0])
                group["betas"] = (self.momentum(group["initial_momentum"], epoch, it), group["betas"][1])
            elif "momentum" in group:
                group.setdefault("initial_momentum", group["momentum"])
                group["momentum"] = self.momentum(group["initial_momentum"], epoch, it)


def build_lr_schedule(lr_config: Mapping[str, Any] | None, max_epochs: int, iters_per_epoch: int
                      ) -> tuple[LrSchedule, Warmup | None]:
    """The regular lr schedule and warmup of an `lr_config` section (None means a fixed lr)."""
    if lr_config is None:
        return FixedSchedule(), None
    if not isinstance(lr_config, Mapping):
        raise ScheduleError(f"lr_config: expected a mapping with a policy, got {lr_config!r}")
    cfg = dict(lr_config)
    policy = cfg.get("policy")
    if not isinstance(policy, str) or policy.lower() not in _LR_KEYS:
        raise ScheduleError(f"lr_config.policy: expected one of cyclic, CosineAnnealing, step, fixed, got {policy!r}")
    name = policy.lower()
    _check_keys(cfg, _LR_KEYS[name] | _WARMUP_KEYS, "lr_config")
    _common_checks(cfg, "lr_config")
    max_iters = max_epochs * iters_per_epoch
    if name == "cyclic":
        sched: LrSchedule = CyclicSchedule(max_iters, _target_ratio(cfg.get("target_ratio", (10, 1e-4)),
                                                                    "lr_config.target_ratio"),
                                           *_cycles(cfg, "lr_config"))
    elif name == "cosineannealing":
        min_lr, ratio = cfg.get("min_lr"), cfg.get("min_lr_ratio")
        if min_lr is not None:
            min_lr = as_number(min_lr, "lr_config.min_lr", ScheduleError, low=0)
        if ratio is not None:
            ratio = as_number(ratio, "lr_config.min_lr_ratio", ScheduleError, low=0)
        sched = CosineAnnealingSchedule(max_epochs, max_iters, min_lr, ratio,
                                        as_bool(cfg.get("by_epoch", True), "lr_config.by_epoch", ScheduleError))
    elif name == "step":
        if "step" not in cfg:
            raise ScheduleError("lr_config.step: required for the step policy")
        step = cfg["step"]
        if isinstance(step, (list, tuple)):
            step = [as_int(v, f"lr_config.step[{i}]", ScheduleError, low=0) for i, v in enumerate(step)]
        else:
            step = as_int(step, "lr_config.step", ScheduleError, low=1)
        min_lr = cfg.get("min_lr")
        sched = StepSchedule(step, as_number(cfg.get("gamma", 0.1), "lr_config.gamma", ScheduleError, low=0),
                             None if min_lr is None else as_number(min_lr, "lr_config.min_lr", ScheduleError, low=0),
                             as_bool(cfg.get("by_epoch", True), "lr_config.by_epoch", ScheduleError))
    else:
        sched = FixedSchedule()
    warmup = None
    if cfg.get("warmup") is not None:
        if as_bool(cfg.get("warmup_by_epoch"), "lr_config.warmup_by_epoch", ScheduleError):
            iters = as_int(cfg.get("warmup_epochs", 0), "lr_config.warmup_epochs", ScheduleError, low=0) \
                * iters_per_epoch
        else:
            iters = cfg.get("warmup_iters")
            if iters is None:
                raise ScheduleError("lr_config.warmup_iters: required with a warmup")
            iters = as_int(iters, "lr_config.warmup_iters", ScheduleError)
        warmup = Warmup(str(cfg["warmup"]), iters,
                        as_number(cfg.get("warmup_ratio", 0.1), "lr_config.warmup_ratio", ScheduleError))
    return sched, warmup


def _cycles(cfg: Mapping[str, Any], section: str) -> tuple[int, float]:
    """(cyclic_times, step_ratio_up) of a cyclic section, type-checked."""
    return (as_int(cfg.get("cyclic_times", 1), f"{section}.cyclic_times", ScheduleError, low=1),
            as_number(cfg.get("step_ratio_up", 0.4), f"{section}.step_ratio_up", ScheduleError, low=0, high=1,
                      high_open=True))


def build_momentum_schedule(momentum_config: Mapping[str, Any] | None, max_epochs: int,
                            iters_per_epoch: int) -> LrSchedule | None:
    """The momentum schedule of a `momentum_config` section (only `cyclic`, as the official configs)."""
    if momentum_config is None:
        return None
    if not isinstance(momentum_config, Mapping):
        raise ScheduleError(f"momentum_config: expected a mapping with a policy, got {momentum_config!r}")
    cfg = dict(momentum_config)
    policy = cfg.get("policy")
    if not isinstance(policy, str) or policy.lower() != "cyclic":
        raise ScheduleError(f"momentum_config.policy: only 'cyclic' is supported, got {policy!r}")
    _check_keys(cfg, {"target_ratio", "cyclic_times", "step_ratio_up", "anneal_strategy", "by_epoch", "gamma"},
                "momentum_config")
    _common_checks(cfg, "momentum_config")
    return CyclicSchedule(max_epochs * iters_per_epoch,
                          _target_ratio(cfg.get("target_ratio", (0.85 / 0.95, 1)), "momentum_config.target_ratio"),
                          *_cycles(cfg, "momentum_config"))


def build_schedules(cfg: Mapping[str, Any], max_epochs: int, iters_per_epoch: int) -> ScheduleSet:
    """The `ScheduleSet` of a whole config (`lr_config`, `momentum_config`)."""
    lr, warmup = build_lr_schedule(cfg.get("lr_config"), max_epochs, iters_per_epoch)
    return ScheduleSet(lr, warmup, build_momentum_schedule(cfg.get("momentum_config"), max_epochs, iters_per_epoch))

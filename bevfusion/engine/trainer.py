"""The epoch-based training loop: schedules, AMP, gradient clipping, DDP, logging, checkpoints, resume.

The model contract: in train mode `model(batch)` returns a dict of named scalars; the total loss is the
sum of every value whose key contains "loss" and does not start with "stats" (a tensor is averaged, a list
of tensors is summed after averaging each, as mmdet's `_parse_losses`); the other values are logged as
statistics.

Exact resume: the sampler order depends only on (seed, epoch), the schedules only on (epoch, iter),
and a checkpoint holds the optimizer, scaler and every RNG state, so a run resumed from any
checkpoint (epoch end or mid-epoch snapshot) follows the uninterrupted run bit for bit on CPU with
`workers_per_gpu: 0`. (With worker processes the data pipeline's own random streams restart at the
resume point, since each worker is seeded once per epoch.)
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler

from bevfusion.engine import checkpoint as ckpt_io
from bevfusion.engine.dist import DistInfo, all_gather_object, all_reduce_mean, barrier
from bevfusion.engine.schedules import ScheduleSet
from bevfusion.utils.logging import get_logger, progress

__all__ = ["parse_losses", "Trainer", "SkipSampler", "EvaluateFn"]

EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]


def parse_losses(outputs: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached per-key scalars of a model's training output.

    The total is the sum of the values whose key contains "loss", except statistics under `stats...`
    (BEVFusion reports e.g. `loss/object/heatmap` as a loss and `stats/object/matched_ious` as a statistic).
    """
    if not isinstance(outputs, Mapping):
        raise TypeError(f"in train mode the model must return a dict of losses, got {type(outputs).__name__}")
    log_vars: dict[str, torch.Tensor] = {}
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor):
            log_vars[key] = value.float().mean()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
            log_vars[key] = sum(v.float().mean() for v in value)
        else:
            raise TypeError(f"model output {key!r} is a {type(value).__name__}, expected a tensor or list of tensors")
    losses = [v for k, v in log_vars.items() if "loss" in k and not k.startswith("stats")]
    if not losses:
        raise ValueError(f"the model returned no key containing 'loss' (keys: {sorted(outputs)})")
    total = sum(losses)
    log_vars["loss"] = total
    return total, {k: v.detach() for k, v in log_vars.items()}


class SkipSampler(Sampler):
    """The indices of `sampler` after the first `skip` (to start an epoch in the middle)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_move(v, device) for v in batch]
    return batch


@contextlib.contextmanager
def _preserved_rng():
    """Evaluation must not change the training trajectory (nor make resume depend on it)."""
    state = ckpt_io.rng_state()
    try:
        yield
    finally:
        ckpt_io.set_rng_state(state)


class Trainer:
    """Runs `max_epochs` epochs of `loader` through `model` (already on its device, DDP-wrapped or not).

    Args:
        model: the module to train (a DistributedDataParallel wrapper in a distributed run).
        optimizer: from `build_optimizer`.
        loader: the training DataLoader (its sampler: RandomSampler with a generator, a
            DistributedSampler, or sequential); the epoch is set on the sampler and the dataset.
        schedules: lr / momentum schedules.
        max_epochs: epochs to train.
        work_dir: checkpoints, `train.log`, `log.jsonl`, `tf_logs/`.
        cfg: the resolved config, saved in every checkpoint and checked on resume.
        dist_info: rank, world size, device.
        amp_dtype: torch.float16 / torch.bfloat16 for autocast, or None.
        scaler: a GradScaler for fp16 (None otherwise).
        grad_clip: `{max_norm, norm_type}` or None.
        log_interval: iterations between log lines.
        ckpt_interval: epochs between `epoch_N.pth` files; `ckpt_iter_interval` > 0 also writes a
            mid-epoch `latest.pth` snapshot every that many iterations.
        max_keep_ckpts: newest epoch files kept (<= 0: all).
        evaluate_fn: `fn(model, epoch) -> {metric: value}`, run on every rank every `eval_interval`
            epochs (after the checkpoint); RNG states are restored afterwards.
        seed: the data order seed (RandomSampler generators are reseeded with seed + epoch).
        tensorboard: write scalars to `work_dir/tf_logs` when `torch.utils.tensorboard` imports.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 schedules: ScheduleSet, max_epochs: int, work_dir: str | os.PathLike, cfg: Mapping[str, Any],
                 dist_info: DistInfo = DistInfo(), amp_dtype: torch.dtype | None = None, scaler: Any = None,
                 grad_clip: Mapping[str, Any] | None = None, log_interval: int = 50, ckpt_interval: int = 1,
                 ckpt_iter_interval: int = 0, max_keep_ckpts: int = 1, evaluate_fn: EvaluateFn | None = None,
                 eval_interval: int = 1, seed: int = 0, tensorboard: bool = True):
        self.model, self.optimizer, self.loader, self.schedules = model, optimizer, loader, schedules
        self.max_epochs, self.cfg, self.dist = max_epochs, cfg, dist_info
        self.work_dir = Path(work_dir)
        self.amp_dtype, self.scaler = amp_dtype, scaler
        self.grad_clip = dict(grad_clip) if grad_clip else None
        self.log_interval, self.ckpt_interval = max(int(log_interval), 1), int(ckpt_interval)
        self.ckpt_iter_interval, self.max_keep_ckpts = int(ckpt_iter_interval or 0), max_keep_ckpts
        self.evaluate_fn, self.eval_interval, self.seed = evaluate_fn, int(eval_interval), seed
        self.iters_per_epoch = len(loader)
        self.max_iters = self.max_epochs * self.iters_per_epoch
        # position: `epoch` in progress (0-based), iterations done in it, global iterations done
        self.epoch, self.inner_iter, self.iter = 0, 0, 0
        self._resume_rng: list[dict[str, Any]] | None = None
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = get_logger("train", self.work_dir / "train.log" if self.dist.is_main else None)
        self._writer = self._tensorboard() if tensorboard and self.dist.is_main else None

    # -------------------------------------------------------------------------------------------
    # set-up helpers

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is an optional dependency
            self.log.info("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
            return None
        return SummaryWriter(os.fspath(self.work_dir / "tf_logs"))

    @property
    def raw_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def _epoch_loader(self, epoch: int, skip: int) -> DataLoader:
        loader = self.loader
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(self.seed + epoch)  # as build_dataloader seeds epoch `epoch`
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        if skip == 0:
            return loader
        return DataLoader(loader.dataset, batch_size=loader.batch_size,
                          sampler=SkipSampler(sampler, skip * loader.batch_size),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                          generator=loader.generator)

    # -------------------------------------------------------------------------------------------
    # checkpoints

    def _scheduler_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "iter": self.iter,
                "lr": [float(g["lr"]) for g in self.optimizer.param_groups]}

    def save(self, path: Path) -> None:
        """Collective (every rank gathers its RNG state); rank 0 writes."""
        rng = all_gather_object(ckpt_io.rng_state())
        if not self.dist.is_main:
            return
        try:
            ckpt_io.save_checkpoint(path, model=self.model, optimizer=self.optimizer, scaler=self.scaler, rng=rng,
                                    cfg=self.cfg, scheduler=self._scheduler_state(),
                                    meta={"epoch": self.epoch, "inner_iter": self.inner_iter, "iter": self.iter,
                                          "iters_per_epoch": self.iters_per_epoch, "max_epochs": self.max_epochs,
                                          "world_size": self.dist.world_size})
        except OSError as exc:  # disk full, read-only, quota: the files written before stay as they were
            latest = ckpt_io.find_latest(self.work_dir)
            kept = (f"{latest} is the last good checkpoint (continue with --resume)" if latest is not None
                    else "no checkpoint was kept")
            raise ckpt_io.CheckpointError(f"{path}: saving the checkpoint failed: "
                                          f"{exc.strerror or exc}; {kept}") from exc

    def resume(self, path: str | os.PathLike) -> None:
        """Continue exactly from a checkpoint of this config (raises CheckpointError naming what differs)."""
        ckpt = ckpt_io.load_checkpoint(path)
        ckpt_io.check_config(ckpt, self.cfg, source=f"{path}")
        meta = ckpt["meta"]
        if meta["iters_per_epoch"] != self.iters_per_epoch:
            raise ckpt_io.CheckpointError(
                f"{path}: {meta['iters_per_epoch']} iterations per epoch in the checkpoint, {self.iters_per_epoch} "
                "now (dataset size, samples_per_gpu or world size changed)")
        ckpt_io.check_finite(ckpt["state_dict"], path)
        ckpt_io.load_model_state(self.model, ckpt["state_dict"], source=f"{path}")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ckpt_io.CheckpointError(f"{path}: optimizer state does not fit: {exc}") from None
        if self.scaler is not None and self.scaler.is_enabled():
            if ckpt.get("scaler") is None:
                self.log.warning("%s has no GradScaler state (trained without fp16); starting a fresh scaler", path)
            else:
                self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.inner_iter, self.iter = meta["epoch"], meta["inner_iter"], meta["iter"]
        rng = ckpt["rng"]
        if meta.get("world_size", 1) != self.dist.world_size:
            self.log.warning("%s was written by %d processes, now %d: the data order and random streams "
                             "will not continue exactly", path, meta.get("world_size", 1), self.dist.world_size)
        self._resume_rng = rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0]
        self.log.info("resumed from %s: epoch %d, iteration %d of %d in it (global %d)", path, self.epoch + 1,
                      self.inner_iter, self.iters_per_epoch, self.iter)

    def _after_epoch_checkpoint(self) -> None:
        if self.ckpt_interval <= 0 or (self.epoch % self.ckpt_interval != 0 and self.epoch != self.max_epochs):
            return
        path = self.work_dir / f"epoch_{self.epoch}.pth"
        self.save(path)
        if self.dist.is_main:
            ckpt_io.link_latest(self.work_dir, path)
            for removed in ckpt_io.prune_checkpoints(self.work_dir, self.max_keep_ckpts):
                self.log.debug("removed old checkpoint %s", removed)
            self.log.info("saved checkpoint %s", path)

    # -------------------------------------------------------------------------------------------
    # the loop

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One optimisation step on `batch` at the current position; returns the (unreduced) log values."""
        self.schedules.apply(self.optimizer, self.epoch, self.iter)
        batch = _move(batch, self.dist.device)
        with self._autocast():
            outputs = self.model(batch)
        loss, log_vars = parse_losses(outputs)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if params:
                log_vars["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, **self.grad_clip).detach()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return log_vars

    def train(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log.info("training %d epochs x %d iterations (%d processes, device %s, amp %s) in %s", self.max_epochs,
                      self.iters_per_epoch, self.dist.world_size, self.dist.device,
                      {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype], self.work_dir)
        self._run_start, self._run_start_iter = time.time(), self.iter
        while self.epoch < self.max_epochs:
            self._train_epoch()
            self.epoch, self.inner_iter = self.epoch + 1, 0
            self._after_epoch_checkpoint()
            if self.evaluate_fn is not None and self.eval_interval > 0 and self.epoch % self.eval_interval == 0:
                self._evaluate()
        barrier()
        if self._writer is not None:
            self._writer.close()
        self.log.info("training done: %d epochs, %d iterations", self.epoch, self.iter)

    def _evaluate(self) -> None:
        with _preserved_rng():
            metrics = dict(self.evaluate_fn(self.raw_model, self.epoch) or {})
        self.model.train()
        if self.dist.is_main and metrics:
            text = ", ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
            self.log.info("Epoch(val) [%d] %s", self.epoch, text)
            self._write_json({"mode": "val", "epoch": self.epoch, "iter": self.iter, **metrics})
            if self._writer is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        self._writer.add_scalar(f"val/{k}", v, self.iter)

    def _train_epoch(self) -> None:
        skip = self.inner_iter
        rng, self._resume_rng = self._resume_rng, None
        if rng is not None and skip == 0:
            ckpt_io.set_rng_state(rng)  # an epoch-end snapshot precedes the next epoch's iterator
        loader = self._epoch_loader(self.epoch, skip)
        batches = iter(loader)  # creating the iterator draws a seed from the torch RNG
        if rng is not None and skip > 0:
            ckpt_io.set_rng_state(rng)  # a mid-epoch snapshot was taken after that draw
        self.model.train()
        # the bar only on an interactive terminal: in a redirected log the lines (with ETA) say it all
        show = self.dist.is_main and not os.environ.get("BEVFUSION_NO_PROGRESS") and sys.stderr.isatty()
        bar = progress(batches, total=self.iters_per_epoch, initial=skip, disable=not show,
                       desc=f"epoch {self.epoch + 1}/{self.max_epochs}", leave=False)
        acc: dict[str, list[torch.Tensor]] = defaultdict(list)
        t_data = t_iter = time.time()
        data_time = iter_time = 0.0
        n_window = 0
        redirect = self._redirect_logging() if show else contextlib.nullcontext()
        with redirect:
            for batch in bar:
                data_time += time.time() - t_data
                log_vars = self.train_step(batch)
                for k, v in log_vars.items():
                    acc[k].append(v)
                self.inner_iter += 1
                self.iter += 1
                n_window += 1
                if self.dist.device.type == "cuda":
                    torch.cuda.synchronize(self.dist.device)
                iter_time += time.time() - t_iter
                if self.inner_iter % self.log_interval == 0 or self.inner_iter == self.iters_per_epoch:
                    self._log_window(acc, n_window, data_time, iter_time, len(batch_size_of(batch)))
                    acc.clear()
                    data_time = iter_time = 0.0
                    n_window = 0
                if (self.ckpt_iter_interval > 0 and self.inner_iter % self.ckpt_iter_interval == 0
                        and self.inner_iter < self.iters_per_epoch):
                    path = self.work_dir / ckpt_io.LATEST
                    self.save(path)
                    if self.dist.is_main:
                        self.log.info("saved mid-epoch snapshot %s (iteration %d)", path, self.iter)
                t_data = t_iter = time.time()

    @staticmethod
    def _redirect_logging():
        import logging

        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(loggers=[logging.getLogger("bevfusion")])

    def _log_window(self, acc: Mapping[str, list[torch.Tensor]], n: int, data_time: float, iter_time: float,
                    batch: int) -> None:
        # Ranks may report different keys (a statistic only some batches have): agree on the union, then
        # average each key over the ranks that have it (sum and count both averaged: the ratio is the mean).
        keys: list[str] = []
        for rank_keys in all_gather_object(list(acc)):
            keys.extend(k for k in rank_keys if k not in keys)
        device = next(iter(acc.values()))[0].device
        zero = torch.zeros((), device=device)
        sums = torch.stack([torch.stack(acc[k]).float().mean() if k in acc else zero for k in keys])
        counts = torch.tensor([1.0 if k in acc else 0.0 for k in keys], device=device)
        total = all_reduce_mean(torch.stack([sums.double(), counts.double()]))
        means = (total[0] / total[1]).tolist()  # the same numbers on every rank
        if not self.dist.is_main:
            return
        values = dict(zip(keys, means))
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        momentum = float(group["betas"][0] if "betas" in group else group.get("momentum", 0.0))
        sec = iter_time / max(n, 1)
        elapsed = time.time() - self._run_start
        done = self.iter - self._run_start_iter
        eta = elapsed / max(done, 1) * (self.max_iters - self.iter)
        record = {"mode": "train", "epoch": self.epoch + 1, "iter": self.inner_iter, "global_iter": self.iter,
                  "lr": lr, "momentum": momentum, "time": sec, "data_time": data_time / max(n, 1),
                  "samples_per_s": batch * self.dist.world_size / sec if sec > 0 else float("nan")}
        if self.dist.device.type == "cuda":
            record["memory"] = int(torch.cuda.max_memory_allocated(self.dist.device) // 2**20)
        if self.scaler is not None and self.scaler.is_enabled():
            record["loss_scale"] = float(self.scaler.get_scale())
        ordered = {k: v for k, v in values.items() if k not in ("loss", "grad_norm")}
        ordered["loss"] = values["loss"]
        if "grad_norm" in values:
            ordered["grad_norm"] = values["grad_norm"]
        record.update(ordered)
        stats = ", ".join(f"{k}: {v:.4f}" if math.isfinite(v) else f"{k}: {v}" for k, v in ordered.items())
        mem = f", memory: {record['memory']} MB" if "memory" in record else ""
        self.log.info("Epoch [%d/%d][%d/%d] lr: %.3e, eta: %s, time: %.3f, data_time: %.3f, samples/s: %.1f%s, %s",
                      self.epoch + 1, self.max_epochs, self.inner_iter, self.iters_per_epoch, lr,
                      str(datetime.timedelta(seconds=int(eta))), sec, record["data_time"], record["samples_per_s"],
                      mem, stats)
        self._write_json(record)
        if self._writer is not None:
            for k, v in record.items():
                if k not in ("mode", "epoch", "iter", "global_iter") and isinstance(v, (int, float)):
                    self._writer.add_scalar(f"train/{k}", v, self.iter)

    def _write_json(self, record: Mapping[str, Any]) -> None:
        with open(self.work_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def batch_size_of(batch: Mapping[str, Any]) -> list:
    """A list as long as the batch (from `metas`, or the first tensor / list value)."""
    if isinstance(batch, Mapping):
        if isinstance(batch.get("metas"), list):
            return batch["metas"]
        for v in batch.values():
            if isinstance(v, (list, torch.Tensor)):
                return list(range(len(v)))
    return [None]

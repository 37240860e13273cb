"""Train a model from a config: the library side of `tools/train.py`.

    tools/train.py CONFIG [--set k=v ...] [--work-dir D] [--resume [CKPT]] [--load-from CKPT]
    torchrun --nproc-per-node 8 tools/train.py CONFIG ...              # DDP, one process per GPU
    torchrun --nnodes 2 --node-rank R --master-addr H --nproc-per-node 8 tools/train.py CONFIG ...

Config keys used: model, data.{train, val, samples_per_gpu, workers_per_gpu}, optimizer (paramwise_cfg),
optimizer_config.grad_clip, lr_config, momentum_config, runner.max_epochs (or max_epochs), fp16.loss_scale,
checkpoint_config.{interval, max_keep_ckpts, iter_interval}, log_config.{interval, hooks},
evaluation.interval, seed, deterministic, cudnn_benchmark, load_from, resume_from, find_unused_parameters,
and `freeze` (a list of parameter-name prefixes to keep fixed; our addition, give it with `--set +freeze=[...]`).
"""
from __future__ import annotations

import argparse
import logging
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bevfusion.config import dump_config
from bevfusion.engine import checkpoint as ckpt_io
from bevfusion.engine.dist import DistInfo, cleanup, init_distributed
from bevfusion.engine.optim import OptimizerConfigError, apply_freeze, build_optimizer
from bevfusion.engine.schedules import ScheduleError, build_schedules
from bevfusion.engine.trainer import EvaluateFn, Trainer
from bevfusion.utils.cli import config_parser, parse_config_args
from bevfusion.utils.logging import get_logger
from bevfusion.utils.seed import set_seed

__all__ = ["TrainConfigError", "build_parser", "main", "make_scaler", "amp_dtype_for", "default_evaluate_fn"]


class TrainConfigError(ValueError):
    """A bad training setting (config key or option); the message names it."""

ModelBuilder = Callable[[Mapping[str, Any]], nn.Module]
DatasetBuilder = Callable[..., Any]


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(__doc__)
    parser.add_argument("--work-dir", help="folder for checkpoints, logs and the resolved config (default: the "
                        "config's work_dir, else work_dirs/<config path below configs/>)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                        help="continue a run exactly from CKPT, or without a value from WORK_DIR/latest.pth "
                             "(a fresh start if there is none); the config must match the checkpoint's")
    parser.add_argument("--load-from", "--load_from", dest="load_from", metavar="CKPT",
                        help="initialise weights from CKPT (ours or official), non-strictly: missing and "
                             "unexpected keys are logged (overrides the config's load_from)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available (one GPU per process, LOCAL_RANK), else cpu")
    parser.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto",
                        help="mixed precision: auto = fp16 with a GradScaler when the config has `fp16` and the "
                             "device is CUDA, else off; bf16 autocasts without a scaler (also on CPU)")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the evaluation every evaluation.interval epochs")
    return parser


def amp_dtype_for(mode: str, cfg: Mapping[str, Any], device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise TrainConfigError("--amp fp16 needs a CUDA device (use bf16 on CPU)")
        return torch.float16
    return torch.float16 if cfg.get("fp16") and device.type == "cuda" else None


def make_scaler(cfg: Mapping[str, Any], amp_dtype: torch.dtype | None, device: torch.device):
    """GradScaler for fp16 from `fp16.loss_scale` (a dict of GradScaler arguments as mmcv, 'dynamic', or a
    number: the initial scale, never grown)."""
    if amp_dtype is not torch.float16:
        return None
    loss_scale = (cfg.get("fp16") or {}).get("loss_scale", "dynamic")
    if isinstance(loss_scale, Mapping):
        kwargs = dict(loss_scale)
    elif loss_scale == "dynamic":
        kwargs = {}
    elif isinstance(loss_scale, (int, float)):
        kwargs = {"init_scale": float(loss_scale), "growth_interval": 2**31 - 1}
    else:
        raise TrainConfigError(f"fp16.loss_scale: expected a mapping, 'dynamic' or a number, got {loss_scale!r}")
    try:
        return torch.amp.GradScaler(device.type, **kwargs)
    except TypeError as exc:
        raise TrainConfigError(f"fp16.loss_scale: {exc}") from None


def default_evaluate_fn(cfg: Mapping[str, Any], dist_info: DistInfo, work_dir: Path,
                        dataset_builder: DatasetBuilder, amp_dtype: torch.dtype | None) -> EvaluateFn | None:
    """Evaluation on `data.val` with the metrics of the configured heads (bbox and/or map)."""
    heads = (cfg.get("model") or {}).get("heads") or {}
    metrics = [m for m, head in (("bbox", "object"), ("map", "map")) if heads.get(head)]
    val_cfg = (cfg.get("data") or {}).get("val")
    if not metrics or val_cfg is None:
        return None
    log = get_logger("train")
    state: dict[str, Any] = {}

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        from bevfusion.datasets.loader import build_dataloader
        from bevfusion.evaluation.runner import evaluate_results, gather_results, run_inference

        if "loader" not in state:
            dataset = dataset_builder(val_cfg, "data.val", filter_empty_gt=False)
            state["dataset"] = dataset
            state["loader"] = build_dataloader(dataset, samples_per_gpu=1,
                                               workers_per_gpu=cfg["data"].get("workers_per_gpu", 0), shuffle=False,
                                               rank=dist_info.rank, world_size=dist_info.world_size)
        records = gather_results(run_inference(model, state["loader"], dist_info.device, amp_dtype),
                                 size=len(state["dataset"]))
        if not dist_info.is_main:
            return {}
        try:
            return evaluate_results(records, state["dataset"], metrics, out_dir=work_dir / f"eval_epoch_{epoch}")
        except Exception:  # a metric failure should not end a long training run
            log.error("evaluation after epoch %d failed:\n%s", epoch, traceback.format_exc())
            return {}

    return evaluate


def _lazy_build_model() -> ModelBuilder:
    try:
        from bevfusion.models import build_model
    except ImportError as exc:
        raise SystemExit(f"error: bevfusion.models.build_model is not available ({exc}); the model package "
                         "must be installed to train") from None
    return build_model


def _lazy_build_dataset() -> DatasetBuilder:
    from bevfusion.datasets.builder import build_dataset

    return build_dataset


def default_work_dir(config: str | Path) -> Path:
    """work_dirs/<config path below configs/, without .yaml> (official leaves are often `default.yaml`)."""
    path = Path(config).with_suffix("")
    parts = path.parts
    if "configs" in parts:
        return Path("work_dirs", *parts[len(parts) - parts[::-1].index("configs"):])
    return Path("work_dirs") / path.name


def _max_epochs(cfg: Mapping[str, Any]) -> int:
    runner = cfg.get("runner") or {}
    value = runner.get("max_epochs", cfg.get("max_epochs"))
    if value is None:
        raise TrainConfigError("runner.max_epochs (or max_epochs): required")
    return int(value)


def _load_weights(model: nn.Module, path: str, log) -> None:
    from bevfusion.models.convert import load_converted, read_checkpoint

    ckpt = read_checkpoint(path)
    report = load_converted(model, ckpt["state_dict"], strict=False)
    log.info("load_from %s: %s", path, report)
    for label, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                        ("shape-mismatched (skipped)", report.mismatched)):
        if keys:
            log.warning("load_from: %d %s keys: %s%s", len(keys), label, ", ".join(keys[:20]),
                        " ..." if len(keys) > 20 else "")


def main(argv: Sequence[str] | None = None, *, model_builder: ModelBuilder | None = None,
         dataset_builder: DatasetBuilder | None = None, evaluate_fn: EvaluateFn | None = None) -> int:
    """Run `tools/train.py`; builders can be injected (tests use toy models and datasets)."""
    parser = build_parser()
    args, cfg = parse_config_args(parser, argv)
    dist_info = init_distributed(args.device)
    root = logging.getLogger("bevfusion")
    handlers = set(root.handlers)
    if not dist_info.is_main:
        get_logger("train")
        root.setLevel(logging.WARNING)  # one copy of the info lines (rank 0's); warnings from every rank
    try:
        return _train(args, cfg, dist_info, model_builder, dataset_builder, evaluate_fn)
    except (ckpt_io.CheckpointError, OptimizerConfigError, ScheduleError, TrainConfigError) as exc:
        get_logger("train").error("%s", exc)
        return 1
    finally:
        cleanup()
        for handler in set(root.handlers) - handlers:  # this run's train.log (main may run again in-process)
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()


def _train(args, cfg, dist_info: DistInfo, model_builder, dataset_builder, evaluate_fn) -> int:
    from bevfusion.datasets.loader import build_dataloader

    work_dir = Path(args.work_dir or cfg.get("work_dir") or default_work_dir(args.config))
    if dist_info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, work_dir / "configs.yaml")
    log = get_logger("train", work_dir / "train.log" if dist_info.is_main else None)
    log.info("config %s%s, work dir %s", args.config,
             f" with {' '.join(args.overrides)}" if args.overrides else "", work_dir)

    seed = int(cfg.get("seed") or 0)
    set_seed(seed, bool(cfg.get("deterministic", False)))
    if cfg.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True

    dataset_builder = dataset_builder or _lazy_build_dataset()
    dataset = dataset_builder(cfg["data"]["train"], "data.train", seed=seed)
    loader = build_dataloader(dataset, samples_per_gpu=int(cfg["data"]["samples_per_gpu"]),
                              workers_per_gpu=int(cfg["data"].get("workers_per_gpu", 0)), shuffle=True, seed=seed,
                              rank=dist_info.rank, world_size=dist_info.world_size)
    if len(loader) == 0:
        raise TrainConfigError("data.train: no training batch (empty dataset?)")

    model = (model_builder or _lazy_build_model())(cfg["model"])
    frozen = apply_freeze(model, cfg.get("freeze"))
    if frozen:
        log.info("frozen by config: %d parameters (%s%s)", len(frozen), ", ".join(frozen[:5]),
                 " ..." if len(frozen) > 5 else "")
    load_from = args.load_from or cfg.get("load_from")
    resume = args.resume or cfg.get("resume_from")
    if load_from and not resume:
        _load_weights(model, load_from, log)
    model.to(dist_info.device)
    optimizer = build_optimizer(model, cfg["optimizer"])
    n_train = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters, %.2f M trained", n_all / 1e6, n_train / 1e6)
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))

    max_epochs = _max_epochs(cfg)
    schedules = build_schedules(cfg, max_epochs, len(loader))
    amp_dtype = amp_dtype_for(args.amp, cfg, dist_info.device)
    scaler = make_scaler(cfg, amp_dtype, dist_info.device)
    opt_cfg = dict(cfg.get("optimizer_config") or {})
    unknown = sorted(set(opt_cfg) - {"grad_clip", "type", "loss_scale"})
    if unknown:
        raise TrainConfigError(f"optimizer_config: unknown key(s) {', '.join(unknown)} (expected grad_clip)")
    ckpt_cfg = dict(cfg.get("checkpoint_config") or {})
    log_cfg = dict(cfg.get("log_config") or {})
    hooks = [h.get("type") for h in (log_cfg.get("hooks") or []) if isinstance(h, Mapping)]
    eval_cfg = dict(cfg.get("evaluation") or {})
    if evaluate_fn is None and not args.no_validate:
        evaluate_fn = default_evaluate_fn(cfg, dist_info, work_dir, dataset_builder, amp_dtype)
    trainer = Trainer(model, optimizer, loader, schedules, max_epochs, work_dir, cfg, dist_info,
                      amp_dtype=amp_dtype, scaler=scaler, grad_clip=opt_cfg.get("grad_clip"),
                      log_interval=int(log_cfg.get("interval", 50)), ckpt_interval=int(ckpt_cfg.get("interval", 1)),
                      ckpt_iter_interval=int(ckpt_cfg.get("iter_interval", 0) or 0),
                      max_keep_ckpts=int(ckpt_cfg.get("max_keep_ckpts", -1) or -1),
                      evaluate_fn=None if args.no_validate else evaluate_fn,
                      eval_interval=int(eval_cfg.get("interval", 1)), seed=seed,
                      tensorboard=not hooks or "TensorboardLoggerHook" in hooks)
    if resume == "auto":
        resume = ckpt_io.find_latest(work_dir)
        if resume is None:
            log.info("--resume: no %s in %s, starting from scratch", ckpt_io.LATEST, work_dir)
    if resume:
        trainer.resume(resume)
    trainer.train()
    return 0

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bevfusion.config import dump_config
from bevfusion.engine import checkpoint as ckpt_io
from bevfusion.engine.dist import DistInfo, cleanup, init_distributed
from bevfusion.engine.optim import apply_freeze, build_optimizer, check_optimizer_config
from bevfusion.engine.schedules import build_schedules
from bevfusion.engine.settings import as_bool, as_int, as_number, as_section
from bevfusion.engine.trainer import EvaluateFn, Trainer
from bevfusion.utils.cli import config_parser, parse_config_args, tool_main
from bevfusion.utils.logging import get_logger
from bevfusion.utils.seed import set_seed

__all__ = ["TrainConfigError", "TrainSettings", "check_settings", "build_parser", "main", "make_scaler",
           "amp_dtype_for", "default_evaluate_fn"]


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


@dataclass(frozen=True)
class TrainSettings:
    """The engine's scalar settings, type-checked (see `check_settings`)."""

    max_epochs: int
    samples_per_gpu: int
    workers_per_gpu: int
    seed: int
    deterministic: bool
    cudnn_benchmark: bool
    find_unused_parameters: bool
    grad_clip: dict[str, Any] | None
    log_interval: int
    ckpt_interval: int
    ckpt_iter_interval: int
    max_keep_ckpts: int
    eval_interval: int
    tensorboard: bool


def check_settings(cfg: Mapping[str, Any]) -> TrainSettings:
    """Read and type-check every scalar the engine takes from the config, before anything is built.

    Raises TrainConfigError naming the key for a wrong type or an impossible value (negative or zero
    epochs, a fractional or zero batch size, a negative worker count, a non-positive log interval, ...).
    The `optimizer` section is checked here too (OptimizerConfigError); the lr / momentum schedules are
    checked by building them (ScheduleError).
    """
    err = TrainConfigError
    data = as_section(cfg.get("data"), "data", err)
    if "samples_per_gpu" not in data:
        raise err("data.samples_per_gpu: required")
    runner = as_section(cfg.get("runner"), "runner", err)
    if "max_epochs" in runner:
        max_epochs = as_int(runner["max_epochs"], "runner.max_epochs", err, low=1)
    elif cfg.get("max_epochs") is not None:
        max_epochs = as_int(cfg["max_epochs"], "max_epochs", err, low=1)
    else:
        raise err("runner.max_epochs (or max_epochs): required")
    check_optimizer_config(cfg.get("optimizer"))
    opt_cfg = as_section(cfg.get("optimizer_config"), "optimizer_config", err)
    unknown = sorted(set(opt_cfg) - {"grad_clip", "type", "loss_scale"})
    if unknown:
        raise err(f"optimizer_config: unknown key(s) {', '.join(unknown)} (expected grad_clip)")
    grad_clip = None
    if opt_cfg.get("grad_clip") is not None:
        grad_clip = as_section(opt_cfg["grad_clip"], "optimizer_config.grad_clip", err)
        bad = sorted(set(grad_clip) - {"max_norm", "norm_type", "error_if_nonfinite", "foreach"})
        if bad or "max_norm" not in grad_clip:
            raise err(f"optimizer_config.grad_clip: expected max_norm and optionally norm_type, got {grad_clip!r}")
        grad_clip["max_norm"] = as_number(grad_clip["max_norm"], "optimizer_config.grad_clip.max_norm", err,
                                          low=0, low_open=True)
        if "norm_type" in grad_clip:
            grad_clip["norm_type"] = as_number(grad_clip["norm_type"], "optimizer_config.grad_clip.norm_type", err,
                                               low=0, low_open=True, finite=False)
        if "error_if_nonfinite" in grad_clip:
            grad_clip["error_if_nonfinite"] = as_bool(grad_clip["error_if_nonfinite"],
                                                      "optimizer_config.grad_clip.error_if_nonfinite", err)
    ckpt_cfg = as_section(cfg.get("checkpoint_config"), "checkpoint_config", err)
    log_cfg = as_section(cfg.get("log_config"), "log_config", err)
    hooks = log_cfg.get("hooks") or []
    if not isinstance(hooks, (list, tuple)):
        raise err(f"log_config.hooks: expected a list, got {hooks!r}")
    hook_types = [h.get("type") for h in hooks if isinstance(h, Mapping)]
    eval_cfg = as_section(cfg.get("evaluation"), "evaluation", err)
    seed = cfg.get("seed")
    max_keep = ckpt_cfg.get("max_keep_ckpts", -1)
    return TrainSettings(
        max_epochs=max_epochs,
        samples_per_gpu=as_int(data["samples_per_gpu"], "data.samples_per_gpu", err, low=1),
        workers_per_gpu=as_int(data.get("workers_per_gpu", 0), "data.workers_per_gpu", err, low=0),
        seed=0 if seed is None else as_int(seed, "seed", err, low=0),
        deterministic=as_bool(cfg.get("deterministic", False), "deterministic", err),
        cudnn_benchmark=as_bool(cfg.get("cudnn_benchmark"), "cudnn_benchmark", err),
        find_unused_parameters=as_bool(cfg.get("find_unused_parameters", False), "find_unused_parameters", err),
        grad_clip=grad_clip,
        log_interval=as_int(log_cfg.get("interval", 50), "log_config.interval", err, low=1),
        ckpt_interval=as_int(ckpt_cfg.get("interval", 1), "checkpoint_config.interval", err),
        ckpt_iter_interval=as_int(ckpt_cfg.get("iter_interval", 0) or 0, "checkpoint_config.iter_interval", err, low=0),
        max_keep_ckpts=-1 if max_keep is None else as_int(max_keep, "checkpoint_config.max_keep_ckpts", err) or -1,
        eval_interval=as_int(eval_cfg.get("interval", 1), "evaluation.interval", err),
        tensorboard=not hook_types or "TensorboardLoggerHook" in hook_types,
    )


def _check_paths(args, work_dir: Path) -> None:
    """Fail before anything is built: the work dir must be a folder we can write, and the checkpoints
    named on the command line must exist."""
    from bevfusion.utils.io import check_writable_output

    check_writable_output(work_dir, option="--work-dir", kind="work dir", folder=True)
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise ckpt_io.CheckpointError(f"--resume {args.resume}: checkpoint not found")
    if args.load_from and not Path(args.load_from).is_file():
        raise ckpt_io.CheckpointError(f"--load-from {args.load_from}: checkpoint not found")


def _load_weights(model: nn.Module, path: str, log) -> None:
    from bevfusion.models.convert import load_converted, read_checkpoint

    ckpt = read_checkpoint(path)
    ckpt_io.check_finite(ckpt["state_dict"], path)
    report = load_converted(model, ckpt["state_dict"], strict=False)
    log.info("load_from %s: %s", path, report)
    for label, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                        ("shape-mismatched (skipped)", report.mismatched)):
        if keys:
            log.warning("load_from: %d %s keys: %s%s", len(keys), label, ", ".join(keys[:20]),
                        " ..." if len(keys) > 20 else "")


@tool_main
def main(argv: Sequence[str] | None = None, *, model_builder: ModelBuilder | None = None,
         dataset_builder: DatasetBuilder | None = None, evaluate_fn: EvaluateFn | None = None) -> int:
    """Run `tools/train.py`; builders can be injected (tests use toy models and datasets).

    Returns the exit code; an error is one `error: ...` line on stderr (bevfusion.utils.cli.tool_main)
    and, once the work dir exists, the full message in its train.log.
    """
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
    except Exception as exc:
        _log_to_files(root, exc)
        raise
    finally:
        cleanup()
        for handler in set(root.handlers) - handlers:  # this run's train.log (main may run again in-process)
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                try:
                    handler.close()
                except OSError:  # a full disk: the log's last lines are lost, the error line is not
                    pass


def _log_to_files(root: logging.Logger, exc: Exception) -> None:
    """The error (in full, with the traceback of an unexpected one) into train.log, not on the console:
    the console gets the one `error:` line of tool_main."""
    known = isinstance(exc, (ckpt_io.CheckpointError, ValueError, KeyError, OSError))
    text = str(exc) if known else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    record = logging.LogRecord("bevfusion.train", logging.ERROR, __file__, 0, "%s", (text,), None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.handle(record)
            except Exception:  # a full disk must not hide the original error
                pass


def _train(args, cfg, dist_info: DistInfo, model_builder, dataset_builder, evaluate_fn) -> int:
    from bevfusion.datasets.loader import build_dataloader

    settings = check_settings(cfg)
    build_schedules(cfg, settings.max_epochs, 1)  # type-checks lr_config / momentum_config before any work
    work_dir = Path(args.work_dir or cfg.get("work_dir") or default_work_dir(args.config))
    _check_paths(args, work_dir)
    if dist_info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, work_dir / "configs.yaml")
    log = get_logger("train", work_dir / "train.log" if dist_info.is_main else None)
    log.info("config %s%s, work dir %s", args.config,
             f" with {' '.join(args.overrides)}" if args.overrides else "", work_dir)

    seed = settings.seed
    set_seed(seed, settings.deterministic)
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True

    dataset_builder = dataset_builder or _lazy_build_dataset()
    dataset = dataset_builder(cfg["data"]["train"], "data.train", seed=seed)
    loader = build_dataloader(dataset, samples_per_gpu=settings.samples_per_gpu,
                              workers_per_gpu=settings.workers_per_gpu, shuffle=True, seed=seed,
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
            broadcast_buffers=False, find_unused_parameters=settings.find_unused_parameters)

    max_epochs = settings.max_epochs
    schedules = build_schedules(cfg, max_epochs, len(loader))
    amp_dtype = amp_dtype_for(args.amp, cfg, dist_info.device)
    scaler = make_scaler(cfg, amp_dtype, dist_info.device)
    if evaluate_fn is None and not args.no_validate:
        evaluate_fn = default_evaluate_fn(cfg, dist_info, work_dir, dataset_builder, amp_dtype)
    trainer = Trainer(model, optimizer, loader, schedules, max_epochs, work_dir, cfg, dist_info,
                      amp_dtype=amp_dtype, scaler=scaler, grad_clip=settings.grad_clip,
                      log_interval=settings.log_interval, ckpt_interval=settings.ckpt_interval,
                      ckpt_iter_interval=settings.ckpt_iter_interval, max_keep_ckpts=settings.max_keep_ckpts,
                      evaluate_fn=None if args.no_validate else evaluate_fn,
                      eval_interval=settings.eval_interval, seed=seed, tensorboard=settings.tensorboard)
    if resume == "auto":
        resume = ckpt_io.find_latest(work_dir)
        if resume is None:
            log.info("--resume: no %s in %s, starting from scratch", ckpt_io.LATEST, work_dir)
    if resume:
        trainer.resume(resume)
    trainer.train()
    return 0

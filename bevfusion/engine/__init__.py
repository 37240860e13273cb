"""The model-independent training engine (used by tools/train.py).

- `optim`: `build_optimizer(model, cfg.optimizer)` with mmcv's paramwise_cfg; `apply_freeze`.
- `schedules`: `build_schedules(cfg, max_epochs, iters_per_epoch)`: mmcv 1.4 lr / momentum policies.
- `checkpoint`: atomic checkpoints, `latest.pth`, weights_only loading, config / model-key checks.
- `dist`: torchrun environment, NCCL / gloo process groups.
- `trainer`: `Trainer`, the epoch loop with AMP, clipping, DDP, logging, evaluation hook and resume.
- `launch`: `main(argv)`, the command line of tools/train.py (model and dataset builders injectable).
"""

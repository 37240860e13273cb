#!/usr/bin/env python3
"""Train BEVFusion from a config (single process, or DDP under torchrun).

    tools/train.py CONFIG [--set k=v ...] [--work-dir D] [--resume [CKPT]] [--load-from CKPT]
    torchrun --nproc-per-node 8 tools/train.py CONFIG --load-from pretrained/lidar-only-det.pth
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 tools/train.py CONFIG

The work dir gets the resolved config (configs.yaml), train.log, log.jsonl, tf_logs/ (with tensorboard
installed), epoch_N.pth checkpoints and latest.pth. Put CONFIG before a bare --resume.
"""
import sys

from bevfusion.engine.launch import main

if __name__ == "__main__":
    sys.exit(main())

"""Deterministic seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (all devices).

    With `deterministic`, torch is also asked to use deterministic algorithms where they exist
    (warning instead of failing where they do not).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def worker_seed(base_seed: int, rank: int, worker_id: int) -> int:
    """A distinct, reproducible seed per (process rank, data-loader worker)."""
    return (base_seed * 1_000_003 + rank * 1009 + worker_id) % 2**31

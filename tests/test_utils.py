"""Logging, progress and seeding helpers."""
from __future__ import annotations

import logging
import random
import re

import numpy as np
import torch

from bevfusion.utils.logging import get_logger, progress
from bevfusion.utils.seed import set_seed, worker_seed


def test_logger_writes_timestamped_lines_to_file(tmp_path):
    log_file = tmp_path / "run.log"
    logger = get_logger("engine", log_file=log_file)
    assert logger.name == "bevfusion.engine"
    logger.info("epoch 1 done")
    for h in logging.getLogger("bevfusion").handlers:
        h.flush()
    line = log_file.read_text().strip().splitlines()[-1]
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} INFO bevfusion.engine: epoch 1 done$", line)
    # Asking again does not add a second handler for the same file.
    get_logger("engine", log_file=log_file)
    files = [h for h in logging.getLogger("bevfusion").handlers if isinstance(h, logging.FileHandler)]
    assert len([h for h in files if h.baseFilename == str(log_file)]) == 1
    for h in files:
        logging.getLogger("bevfusion").removeHandler(h)
        h.close()


def test_progress_yields_every_item():
    assert list(progress(range(5), desc="x", disable=True)) == [0, 1, 2, 3, 4]
    assert list(progress(iter("abc"), total=3)) == ["a", "b", "c"]


def _draw():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_set_seed_is_reproducible():
    set_seed(123)
    first = _draw()
    set_seed(123)
    assert _draw() == first
    set_seed(124)
    assert _draw() != first


def test_worker_seeds_are_distinct_and_stable():
    seeds = {worker_seed(0, rank, worker) for rank in range(8) for worker in range(16)}
    assert len(seeds) == 8 * 16
    assert worker_seed(5, 1, 2) == worker_seed(5, 1, 2)

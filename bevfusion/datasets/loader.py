"""Data loading: class-balanced resampling (CBGS), samplers that work with DDP, seeded workers."""
from __future__ import annotations

import random
from functools import partial
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from bevfusion.datasets.collate import collate
from bevfusion.utils.seed import worker_seed

__all__ = ["CBGSDataset", "cbgs_indices", "build_dataloader"]


def cbgs_indices(cat_ids: Sequence[Sequence[int]], num_classes: int, seed: int = 0) -> np.ndarray:
    """Class-balanced grouping and sampling (CBGS) as the official wrapper draws it.

    For each class c with samples S_c (samples containing c), draw with replacement
    int(|S_c| · (1/num_classes) / (|S_c| / Σ_k |S_k|)) indices from S_c, then concatenate, class by class.
    Classes no sample contains are skipped.
    """
    per_class = [[i for i, ids in enumerate(cat_ids) if c in ids] for c in range(num_classes)]
    total = sum(len(s) for s in per_class)
    if total == 0:
        raise ValueError("CBGS: no sample contains any of the classes")
    rng = np.random.default_rng(seed)
    frac = 1.0 / num_classes
    chunks = []
    for samples in per_class:
        if not samples:
            continue
        ratio = frac / (len(samples) / total)
        chunks.append(rng.choice(samples, int(len(samples) * ratio), replace=True))
    return np.concatenate(chunks).astype(np.int64)


class CBGSDataset(Dataset):
    """Wrap a dataset with `get_cat_ids` and resample it class-balanced (drawn once, with `seed`)."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        classes = getattr(dataset, "object_classes", None) or getattr(dataset, "CLASSES")
        self.sample_indices = cbgs_indices([dataset.get_cat_ids(i) for i in range(len(dataset))],
                                           len(classes), seed)

    def __len__(self) -> int:
        return len(self.sample_indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.sample_indices[index])]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getattr__(self, name):  # expose the wrapped dataset's attributes (classes, infos, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _init_worker(worker_id: int, base_seed: int, rank: int) -> None:
    # torch.initial_seed() here is the loader's per-epoch base seed (drawn from the main process's torch
    # RNG at each `iter(loader)`) plus the worker id: reproducible under a fixed global seed, and new
    # every epoch, so augmentations do not repeat from epoch to epoch.
    seed = worker_seed(base_seed + torch.initial_seed(), rank, worker_id)
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def build_dataloader(dataset: Dataset, samples_per_gpu: int, workers_per_gpu: int = 0, shuffle: bool = True,
                     seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                     epoch: int = 0) -> DataLoader:
    """A DataLoader over `dataset` for one process of a (possibly distributed) run.

    With world_size > 1 a DistributedSampler gives each rank its share (call
    `loader.sampler.set_epoch(e)` every epoch; it is set to `epoch` here). Workers are seeded from
    (seed, the loader's per-epoch base seed, rank, worker id), and the main process's sampling from
    `seed`, so a run is repeatable under a fixed global torch seed and each epoch draws anew.
    """
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        sampler.set_epoch(epoch)
    elif shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=samples_per_gpu,
        sampler=sampler,
        num_workers=workers_per_gpu,
        collate_fn=collate,
        worker_init_fn=partial(_init_worker, base_seed=seed, rank=rank),
        drop_last=drop_last,
        pin_memory=False,
        persistent_workers=False,
    )

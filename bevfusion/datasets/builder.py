"""Build datasets from the `data.train` / `data.val` / `data.test` sections of a config."""
from __future__ import annotations

from typing import Any, Mapping

from bevfusion.registry import Registry, RegistryError

__all__ = ["DATASETS", "build_dataset"]

DATASETS = Registry("dataset", {
    "NuScenesDataset": "bevfusion.datasets.nuscenes:NuScenesDataset",
    "CBGSDataset": "bevfusion.datasets.loader:CBGSDataset",
})


def build_dataset(cfg: Mapping[str, Any], path: str = "data.train", seed: int = 0, **overrides: Any):
    """Build a dataset; a `CBGSDataset` wraps its `dataset` sub-config (built first).

    `overrides` are applied to the innermost dataset (e.g. `filter_empty_gt=False` for evaluation).
    """
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise RegistryError(f"{path}: expected a mapping with a 'type' key")
    if cfg["type"] == "CBGSDataset":
        if "dataset" not in cfg:
            raise RegistryError(f"{path}: CBGSDataset needs a 'dataset' section")
        inner = build_dataset(cfg["dataset"], f"{path}.dataset", seed, **overrides)
        extra = {k: v for k, v in cfg.items() if k not in ("type", "dataset")}
        if extra:
            raise RegistryError(f"{path}: unknown key {', '.join(extra)} for CBGSDataset (expected dataset)")
        return DATASETS.get("CBGSDataset")(inner, seed=seed)
    return DATASETS.build({**cfg, **overrides}, path)

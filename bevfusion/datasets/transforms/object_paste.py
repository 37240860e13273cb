"""Copy-paste augmentation from the ground-truth database (official `ObjectPaste` / `DataBaseSampler`).

The database is what `tools/create_data.py` writes (and what the official converter writes):
`<dataset_root>/nuscenes_dbinfos_train.pkl`, a dict {class name: [record, ...]} whose records hold
`name`, `path` (point file relative to dataset_root), `image_idx`, `gt_idx`, `box3d_lidar` (7 or 9
values in the **official** box convention), `num_points_in_gt`, `difficulty` and `group_id`; each
point file is float32 (n, 5) with xyz relative to the box centre (LiDAR axes, not rotated).

Per sample, for every class in `sample_groups` (max per class), round(rate · (max - existing)) objects
are drawn without replacement from a shuffled per-class queue (reshuffled when it runs out, as
upstream's BatchSampler), candidates whose bird's-eye-view box overlaps an existing box or an object
pasted before it are dropped (exact rotated-rectangle test), the scene points inside the pasted boxes
are removed and the objects' points are added in front of the scene points. It runs in the original
LiDAR frame, before the other augmentations, and only while epoch < stop_epoch.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bevfusion.structures.boxes import box_corners, official_to_internal, points_in_boxes_np

__all__ = ["ObjectPaste", "DataBaseSampler", "bev_boxes_overlap"]


def bev_boxes_overlap(a: np.ndarray, b: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """(N, 7+) and (M, 7+) internal boxes → (N, M) bool: their BEV rectangles overlap with positive area.

    Separating-axis test on the four edge directions of each pair (the boxes' headings and their
    normals): two convex polygons are disjoint iff their projections on one of these axes are
    separated. Rectangles that only touch (overlap length ≤ eps on some axis) do not count.
    """
    a, b = _as_boxes(a), _as_boxes(b)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=bool)
    ca = box_corners(a)[:, :4, :2]  # (N, 4, 2)
    cb = box_corners(b)[:, :4, :2]  # (M, 4, 2)

    def axes(boxes):
        c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
        return np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], 1)  # (K, 2, 2)

    overlap = np.ones((len(a), len(b)), dtype=bool)
    for ax_a in (True, False):
        ax = axes(a) if ax_a else axes(b)  # axes of one box of each pair
        for k in range(2):
            if ax_a:
                v = ax[:, k]  # (N, 2)
                pa = np.einsum("nci,ni->nc", ca, v)[:, None, :]  # (N, 1, 4)
                pb = np.einsum("mci,ni->nmc", cb, v)  # (N, M, 4)
            else:
                v = ax[:, k]  # (M, 2)
                pa = np.einsum("nci,mi->nmc", ca, v)  # (N, M, 4)
                pb = np.einsum("mci,mi->mc", cb, v)[None, :, :]  # (1, M, 4)
            lo = np.maximum(pa.min(-1), pb.min(-1))
            hi = np.minimum(pa.max(-1), pb.max(-1))
            overlap &= (hi - lo) > eps
    return overlap


def _as_boxes(boxes) -> np.ndarray:
    """(M, k) float64 boxes; an empty input of any shape becomes (0, 9)."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.size == 0:
        return np.zeros((0, 9))
    return boxes.reshape(-1, boxes.shape[-1])


def _default_points_loader(results: dict) -> dict:
    from bevfusion.datasets.transforms.loading import load_points

    results["points"] = load_points(results["lidar_path"], 5, results.get("token", "?"), allow_empty=True)
    return results


class DataBaseSampler:
    """Draw non-colliding objects from the ground-truth database.

    Args:
        info_path: the dbinfos pickle (read with the restricted unpickler, on first use).
        dataset_root: folder the records' `path` is relative to (None: paths are used as written).
        rate: fraction of the missing count (max − existing) to draw per class.
        prepare: filters applied once after loading, official names: `filter_by_difficulty` (list of
            difficulties to drop) and `filter_by_min_points` ({class: minimum num_points_in_gt}).
        sample_groups: {class: max objects of the class per sample}; the order is the drawing order.
        classes: label order (the dataset's object_classes); defaults to the sample_groups order.
        points_loader: a `LoadPointsFromFile` config (built with the pipeline registry), a callable
            taking {"lidar_path": path} and returning it with "points", or None (float32 (n, 5)).
    """

    def __init__(self, info_path: str, dataset_root: str | None, rate: float,
                 prepare: Mapping[str, Any] | None, sample_groups: Mapping[str, int],
                 classes: Sequence[str] | None = None,
                 points_loader: Mapping[str, Any] | Callable[[dict], dict] | None = None):
        self.info_path = os.fspath(info_path)
        self.dataset_root = None if dataset_root is None else os.fspath(dataset_root)
        self.rate = float(rate)
        self.prepare = dict(prepare or {})
        for key in self.prepare:
            if key not in ("filter_by_difficulty", "filter_by_min_points"):
                raise ValueError(f"db_sampler.prepare: unknown filter {key!r} "
                                 "(expected filter_by_difficulty, filter_by_min_points)")
        self.sample_groups = {str(k): int(v) for k, v in dict(sample_groups).items()}
        self.classes = list(classes) if classes is not None else list(self.sample_groups)
        self.cat2label = {name: i for i, name in enumerate(self.classes)}
        for name in self.sample_groups:
            if name not in self.cat2label:
                raise ValueError(f"db_sampler.sample_groups: class {name!r} is not in classes {self.classes}")
        if isinstance(points_loader, Mapping):
            from bevfusion.datasets.pipeline import TRANSFORMS

            points_loader = TRANSFORMS.build(points_loader, "db_sampler.points_loader")
        self.points_loader = points_loader or _default_points_loader
        self._db_infos: dict[str, list[dict]] | None = None
        self._queues: dict[str, tuple[np.ndarray, int]] = {}

    # database -------------------------------------------------------------------------------------
    @property
    def db_infos(self) -> dict[str, list[dict]]:
        if self._db_infos is None:
            from bevfusion.utils.io import load_pickle

            db = load_pickle(self.info_path)
            if not isinstance(db, Mapping):
                raise ValueError(f"{self.info_path}: expected a dict of class name → records")
            db = {str(k): list(v) for k, v in db.items()}
            for key, value in self.prepare.items():
                db = getattr(self, key)(db, value)
            self._db_infos = db
        return self._db_infos

    @staticmethod
    def filter_by_difficulty(db_infos: dict[str, list[dict]], removed_difficulty: Sequence[int]):
        removed = set(removed_difficulty)
        return {k: [r for r in v if r.get("difficulty", 0) not in removed] for k, v in db_infos.items()}

    @staticmethod
    def filter_by_min_points(db_infos: dict[str, list[dict]], min_gt_points_dict: Mapping[str, int]):
        out = dict(db_infos)
        for name, min_num in min_gt_points_dict.items():
            if int(min_num) > 0 and name in out:
                out[name] = [r for r in out[name] if r["num_points_in_gt"] >= int(min_num)]
        return out

    def _draw(self, name: str, num: int, rng: np.random.Generator) -> list[dict]:
        """Up to `num` records of a class from its shuffled queue (fewer when the queue runs out)."""
        records = self.db_infos.get(name, [])
        if num <= 0 or not records:
            return []
        order, pos = self._queues.get(name, (None, 0))
        if order is None or len(order) != len(records):
            order, pos = rng.permutation(len(records)), 0
        if pos + num >= len(records):
            picked = order[pos:]
            order, pos = rng.permutation(len(records)), 0
        else:
            picked = order[pos:pos + num]
            pos += num
        self._queues[name] = (order, pos)
        return [records[i] for i in picked]

    @staticmethod
    def _record_box(record: dict) -> np.ndarray:
        box = np.asarray(record["box3d_lidar"], np.float64).reshape(1, -1)
        if box.shape[1] == 7:
            box = np.concatenate([box, np.zeros((1, 2))], axis=1)
        return official_to_internal(box[:, :9])[0]

    def sample_all(self, gt_bboxes: np.ndarray, gt_labels: np.ndarray,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray] | None:
        """Draw objects for one sample.

        Args:
            gt_bboxes: (M, 7+) internal boxes already in the scene (all of them, any label).
            gt_labels: (M,) labels in `classes` order (-1 for other names).
        Returns:
            None when nothing was pasted, else gt_bboxes_3d (K, 9) internal, gt_labels_3d (K,) int64,
            gt_names (K,) str and points (n, C) float32 in the LiDAR frame.
        """
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(0, 2**31 - 1))
        gt_labels = np.asarray(gt_labels)
        avoid = _as_boxes(gt_bboxes)[:, :7]
        chosen: list[tuple[dict, np.ndarray]] = []
        for name, max_num in self.sample_groups.items():
            missing = max_num - int(np.sum(gt_labels == self.cat2label[name]))
            num = int(np.round(self.rate * missing))
            for record in self._draw(name, num, rng):
                box = self._record_box(record)
                if bev_boxes_overlap(box[None, :7], avoid).any():
                    continue
                chosen.append((record, box))
                avoid = np.concatenate([avoid, box[None, :7]], axis=0)
        if not chosen:
            return None
        boxes = np.stack([b for _, b in chosen])
        points = []
        for record, box in chosen:
            path = record["path"]
            if self.dataset_root and not os.path.isabs(path):
                path = os.path.join(self.dataset_root, path)
            loaded = self.points_loader({"lidar_path": path, "token": record.get("image_idx", "?"),
                                         "allow_empty_points": True})
            pts = np.array(loaded["points"], dtype=np.float32, copy=True)
            pts[:, :3] += box[:3].astype(np.float32)
            points.append(pts)
        return {
            "gt_bboxes_3d": boxes,
            "gt_labels_3d": np.array([self.cat2label[r["name"]] for r, _ in chosen], dtype=np.int64),
            "gt_names": np.array([r["name"] for r, _ in chosen]),
            "points": np.concatenate(points, axis=0),
        }

    def __repr__(self) -> str:
        return f"DataBaseSampler(info_path={self.info_path!r}, rate={self.rate}, sample_groups={self.sample_groups})"


class ObjectPaste:
    """Paste database objects into the scene while the epoch is below `stop_epoch`.

    Args:
        db_sampler: a `DataBaseSampler` config (its `type`, if any, must be DataBaseSampler) or object.
        sample_2d: pasting into the images; not supported (upstream configs use false).
        stop_epoch: skip once epoch >= stop_epoch (None: never skip). The epoch starts at -1 and is set
            by the dataset through `set_epoch`, so the default stop_epoch -1 never pastes.
    Updates points, gt_bboxes_3d, gt_labels_3d and gt_names (pasted objects appended).
    """

    def __init__(self, db_sampler: Mapping[str, Any] | DataBaseSampler, sample_2d: bool = False,
                 stop_epoch: int | None = None):
        if sample_2d:
            raise ValueError("ObjectPaste: sample_2d (pasting into images) is not supported")
        if isinstance(db_sampler, Mapping):
            cfg = dict(db_sampler)
            kind = cfg.pop("type", "DataBaseSampler")
            if kind != "DataBaseSampler":
                raise ValueError(f"ObjectPaste.db_sampler: unknown type {kind!r} (expected DataBaseSampler)")
            from bevfusion.registry import check_kwargs

            check_kwargs(DataBaseSampler, cfg, "db_sampler")
            db_sampler = DataBaseSampler(**cfg)
        self.db_sampler = db_sampler
        self.stop_epoch = stop_epoch
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, results: dict) -> dict:
        if self.stop_epoch is not None and self.epoch >= self.stop_epoch:
            return results
        if (results.get("dropped") or {}).get("lidar"):
            return results  # no LiDAR (sensor dropout): pasting would bring points back
        from bevfusion.datasets.transforms.augment import sample_rng

        boxes = _as_boxes(results["gt_bboxes_3d"])
        labels = np.asarray(results["gt_labels_3d"], np.int64)
        sampled = self.db_sampler.sample_all(boxes, labels, sample_rng(results))
        if sampled is None:
            return results
        points = np.asarray(results["points"])
        if sampled["points"].shape[1] != points.shape[1]:
            raise ValueError(f"sample {results.get('token', '?')}: database points have "
                             f"{sampled['points'].shape[1]} columns, the scene has {points.shape[1]}")
        inside = points_in_boxes_np(points[:, :3], sampled["gt_bboxes_3d"]).any(axis=1)
        results["points"] = np.concatenate([sampled["points"].astype(points.dtype), points[~inside]], axis=0)
        results["gt_bboxes_3d"] = np.concatenate([boxes, sampled["gt_bboxes_3d"]], 0)
        results["gt_labels_3d"] = np.concatenate([labels, sampled["gt_labels_3d"]])
        if "gt_names" in results:
            results["gt_names"] = np.concatenate([np.asarray(results["gt_names"]).astype(object),
                                                  sampled["gt_names"].astype(object)]).astype(str)
        return results

    def __repr__(self) -> str:
        return f"ObjectPaste(stop_epoch={self.stop_epoch}, db_sampler={self.db_sampler!r})"

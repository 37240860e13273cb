"""The nuScenes dataset over official-format info files (real nuScenes or the synthetic drive)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bevfusion.datasets.pipeline import Compose
from bevfusion.structures.boxes import official_to_internal
from bevfusion.structures.geometry import invert_transform, make_transform
from bevfusion.utils.io import load_pickle

__all__ = ["NuScenesDataset", "OBJECT_CLASSES", "MAP_CLASSES"]

OBJECT_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                  "pedestrian", "traffic_cone")
MAP_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "divider")

_INFO_KEYS = ("lidar_path", "token", "sweeps", "cams", "lidar2ego_translation", "lidar2ego_rotation",
              "ego2global_translation", "ego2global_rotation", "timestamp")
_CAM_KEYS = ("data_path", "sensor2ego_translation", "sensor2ego_rotation", "sensor2lidar_rotation",
             "sensor2lidar_translation", "camera_intrinsics")
_SWEEP_KEYS = ("data_path", "sensor2lidar_rotation", "sensor2lidar_translation", "timestamp")
_ANN_KEYS = ("gt_boxes", "gt_names", "gt_velocity", "num_lidar_pts", "valid_flag")


class NuScenesDataset(torch.utils.data.Dataset):
    """Samples from `nuscenes_infos_*.pkl`, run through a pipeline of transforms.

    Args:
        dataset_root: the dataset folder (paths in the infos are also resolved against it).
        ann_file: info pickle (read with the restricted unpickler).
        pipeline: list of transform configs (official `type` names) or callables.
        object_classes: detection classes in label order; other names get label -1.
        map_classes: BEV map classes (used by LoadBEVSegmentation and the map metric).
        modality: the official `input_modality` flags (kept for the submission meta).
        test_mode: annotations are optional (loaded when the info has them, as val infos do; the
            test split has none); sweeps are chosen deterministically; no sample is ever replaced.
        use_valid_flag: mask boxes by `valid_flag` (LiDAR or radar points > 0) instead of
            `num_lidar_pts > 0`.
        filter_empty_gt: in training, a sample left without any labelled box after the pipeline is
            replaced by a random other one (official behaviour). Never in test mode; evaluation code
            also builds its datasets with filter_empty_gt=False, so no val sample is ever swapped.
        load_interval: keep every n-th info.
    """

    CLASSES = OBJECT_CLASSES

    def __init__(self, dataset_root: str | os.PathLike, ann_file: str | os.PathLike,
                 pipeline: Sequence[Mapping[str, Any]] | None = None,
                 object_classes: Sequence[str] | None = None, map_classes: Sequence[str] | None = None,
                 modality: Mapping[str, bool] | None = None, box_type_3d: str = "LiDAR",
                 filter_empty_gt: bool = True, test_mode: bool = False, use_valid_flag: bool = False,
                 load_interval: int = 1, eval_version: str = "detection_cvpr_2019", type: str | None = None):
        if box_type_3d.lower() != "lidar":
            raise ValueError(f"box_type_3d {box_type_3d!r} is not supported (only LiDAR)")
        self.dataset_root = os.fspath(dataset_root)
        self.ann_file = os.fspath(ann_file)
        self.object_classes = tuple(object_classes) if object_classes is not None else OBJECT_CLASSES
        self.map_classes = tuple(map_classes) if map_classes is not None else MAP_CLASSES
        self.modality = dict(modality) if modality is not None else {
            "use_lidar": True, "use_camera": True, "use_radar": False, "use_map": False, "use_external": False}
        self.test_mode = test_mode
        self.use_valid_flag = use_valid_flag
        self.filter_empty_gt = filter_empty_gt
        self.eval_version = eval_version
        self.epoch = 0
        data = load_pickle(self.ann_file)
        if not isinstance(data, Mapping) or "infos" not in data:
            raise KeyError(f"{self.ann_file}: not an info file (expected a dict with 'infos' and 'metadata')")
        infos = sorted(data["infos"], key=lambda info: info.get("timestamp", 0))[::load_interval]
        self.metadata = dict(data.get("metadata", {}))
        self.version = self.metadata.get("version")
        for info in infos:
            self._validate(info)
        self.data_infos = infos
        self.pipeline = Compose(pipeline or [], path=f"{self.ann_file} pipeline")
        self._class_index = {name: i for i, name in enumerate(self.object_classes)}

    def _validate(self, info: Mapping[str, Any]) -> None:
        token = info.get("token", "?") if isinstance(info, Mapping) else "?"
        if not isinstance(info, Mapping):
            raise KeyError(f"{self.ann_file}: an info entry is a {type(info).__name__}, not a dict")
        required = _INFO_KEYS + (() if self.test_mode else _ANN_KEYS)
        missing = [k for k in required if k not in info]
        if missing:
            raise KeyError(f"{self.ann_file}: sample {token} lacks info keys {missing}")
        for cam, cam_info in info["cams"].items():
            missing = [k for k in _CAM_KEYS if k not in cam_info]
            if missing:
                raise KeyError(f"{self.ann_file}: sample {token} camera {cam} lacks keys {missing}")
        for i, sweep in enumerate(info["sweeps"]):
            missing = [k for k in _SWEEP_KEYS if k not in sweep]
            if missing:
                raise KeyError(f"{self.ann_file}: sample {token} sweep {i} lacks keys {missing}")
        if not self.test_mode:
            n = len(info["gt_boxes"])
            for key in ("gt_names", "gt_velocity", "num_lidar_pts", "valid_flag"):
                if len(info[key]) != n:
                    raise ValueError(f"{self.ann_file}: sample {token}: {key} has {len(info[key])} entries, "
                                     f"gt_boxes has {n}")

    def __len__(self) -> int:
        return len(self.data_infos)

    def set_epoch(self, epoch: int) -> None:
        """Tell epoch-dependent transforms (ObjectPaste's stop_epoch) which epoch runs."""
        self.epoch = epoch
        for t in self.pipeline.transforms:
            if hasattr(t, "set_epoch"):
                t.set_epoch(epoch)

    def get_data_info(self, index: int) -> dict[str, Any]:
        """Everything the pipeline needs for one sample (keys documented in bevfusion.datasets.pipeline)."""
        info = self.data_infos[index]
        lidar2ego = make_transform(info["lidar2ego_rotation"], info["lidar2ego_translation"])
        ego2global = make_transform(info["ego2global_rotation"], info["ego2global_translation"])
        cams = list(info["cams"].values())
        camera2lidar = np.stack([make_transform(c["sensor2lidar_rotation"], c["sensor2lidar_translation"])
                                 for c in cams]) if cams else np.zeros((0, 4, 4))
        lidar2camera = np.stack([invert_transform(T) for T in camera2lidar]) if cams else np.zeros((0, 4, 4))
        intrinsics = np.zeros((len(cams), 4, 4))
        intrinsics[:, 3, 3] = 1.0
        for i, c in enumerate(cams):
            intrinsics[i, :3, :3] = np.asarray(c["camera_intrinsics"], dtype=np.float64)
        camera2ego = np.stack([make_transform(c["sensor2ego_rotation"], c["sensor2ego_translation"])
                               for c in cams]) if cams else np.zeros((0, 4, 4))
        results: dict[str, Any] = {
            "token": info["token"],
            "sample_idx": info["token"],
            "timestamp": info["timestamp"] / 1e6,
            "location": info.get("location"),
            "dataset_root": self.dataset_root,
            "test_mode": self.test_mode,
            "lidar_path": info["lidar_path"],
            "sweeps": info["sweeps"],
            "image_paths": [c["data_path"] for c in cams],
            "camera_names": list(info["cams"].keys()),
            "lidar2ego": lidar2ego,
            "ego2global": ego2global,
            "camera_intrinsics": intrinsics,
            "camera2lidar": camera2lidar,
            "lidar2camera": lidar2camera,
            "lidar2image": intrinsics @ lidar2camera,
            "camera2ego": camera2ego,
            "lidar_aug_matrix": np.eye(4),
            "img_aug_matrix": np.tile(np.eye(4), (len(cams), 1, 1)),
            # Sweep choice and augmentations draw from this generator, derived from the global numpy
            # state, which the data loader seeds per worker.
            "rng": np.random.default_rng(np.random.randint(0, 2**31 - 1)),
        }
        if self.has_annotations(index):
            results["ann_info"] = self.get_ann_info(index)
        return results

    def has_annotations(self, index: int) -> bool:
        """Whether the info carries ground truth (val infos do, also in test mode; test-split infos do not)."""
        return all(k in self.data_infos[index] for k in _ANN_KEYS)

    def get_ann_info(self, index: int) -> dict[str, np.ndarray]:
        """Boxes (internal convention, 9 values with velocity), labels and names of one sample."""
        info = self.data_infos[index]
        mask = np.asarray(info["valid_flag"], dtype=bool) if self.use_valid_flag \
            else np.asarray(info["num_lidar_pts"]) > 0
        names = np.asarray(info["gt_names"])[mask]
        boxes = np.asarray(info["gt_boxes"], dtype=np.float64)[mask].reshape(-1, 7)
        velocity = np.nan_to_num(np.asarray(info["gt_velocity"], dtype=np.float64)[mask].reshape(-1, 2))
        labels = np.array([self._class_index.get(str(n), -1) for n in names], dtype=np.int64)
        return {
            "gt_bboxes_3d": official_to_internal(np.concatenate([boxes, velocity], axis=1)),
            "gt_labels_3d": labels,
            "gt_names": names,
        }

    def get_cat_ids(self, index: int) -> list[int]:
        """Label ids present in a sample (masked like get_ann_info), for class-balanced sampling."""
        info = self.data_infos[index]
        mask = np.asarray(info["valid_flag"], dtype=bool) if self.use_valid_flag \
            else np.asarray(info["num_lidar_pts"]) > 0
        return sorted({self._class_index[str(n)] for n in np.asarray(info["gt_names"])[mask]
                       if str(n) in self._class_index})

    def prepare(self, index: int) -> dict | None:
        return self.pipeline(self.get_data_info(index))

    def __getitem__(self, index: int) -> dict:
        if self.test_mode or not self.filter_empty_gt:
            result = self.prepare(index)
            if result is None:
                raise RuntimeError(f"sample {self.data_infos[index]['token']}: the pipeline dropped it")
            return result
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        for _ in range(len(self)):
            result = self.prepare(index)
            if result is not None and _has_labels(result):
                return result
            index = int(rng.integers(len(self)))
        raise RuntimeError(f"{self.ann_file}: no sample keeps a labelled box through the pipeline")


def _has_labels(result: Mapping[str, Any]) -> bool:
    labels = result.get("gt_labels_3d")
    if labels is None:
        return True
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return bool((labels != -1).any())

"""The nuScenes dataset over official-format info files (real nuScenes or the synthetic drive)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bevfusion.datasets.dropout import COUNT_KEYS, check_missing_policy, new_record, parse_drop_sensors
from bevfusion.datasets.errors import DataError
from bevfusion.datasets.pipeline import Compose
from bevfusion.datasets.validation import ANN_KEYS, check_infos
from bevfusion.structures.boxes import official_to_internal
from bevfusion.structures.geometry import invert_transform, make_transform
from bevfusion.utils.io import load_pickle

__all__ = ["NuScenesDataset", "OBJECT_CLASSES", "MAP_CLASSES"]

OBJECT_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                  "pedestrian", "traffic_cone")
MAP_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "divider")


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
        missing_sensors: what a missing camera, LiDAR or sweep file does: "error" (default) raises
            DataFileNotFoundError naming the file and sample; "drop" runs without it (a black image
            with `camera_mask` False, empty points, or one sweep fewer) and counts it.
        drop_sensors: leave sensors out on purpose, to measure robustness: None or a mapping with
            optional keys `cameras` ("all" or a list of camera names), `lidar` (bool: empty point
            clouds) and `max_sweeps` (int k >= 0: only the newest k sweeps). Ground truth is unchanged.
            See bevfusion.datasets.dropout for the per-sample record (`metas["dropped"]`) and the
            counts (`dropout_counts`). With either option, every sample carries `camera_mask` (batch
            key, (B, N) bool) and `metas["dropped"]`; without them neither exists.

    Every info record is checked when the file is opened (bevfusion.datasets.validation); a bad one
    raises DataError naming the file, sample token and field.
    """

    CLASSES = OBJECT_CLASSES

    def __init__(self, dataset_root: str | os.PathLike, ann_file: str | os.PathLike,
                 pipeline: Sequence[Mapping[str, Any]] | None = None,
                 object_classes: Sequence[str] | None = None, map_classes: Sequence[str] | None = None,
                 modality: Mapping[str, bool] | None = None, box_type_3d: str = "LiDAR",
                 filter_empty_gt: bool = True, test_mode: bool = False, use_valid_flag: bool = False,
                 load_interval: int = 1, eval_version: str = "detection_cvpr_2019",
                 missing_sensors: str = "error", drop_sensors: Mapping[str, Any] | None = None):
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
            raise DataError(f"{self.ann_file}: not an info file (expected a dict with 'infos' and 'metadata')")
        check_infos(data["infos"], self.ann_file, require_annotations=not test_mode)
        infos = sorted(data["infos"], key=lambda info: info["timestamp"])[::load_interval]
        self.metadata = dict(data.get("metadata", {}))
        self.version = self.metadata.get("version")
        self.data_infos = infos
        self.camera_names = tuple(dict.fromkeys(name for info in data["infos"] for name in info["cams"]))
        self.missing_sensors = check_missing_policy(missing_sensors, f"{self.ann_file}: missing_sensors")
        self.drop_sensors = parse_drop_sensors(drop_sensors, self.camera_names)
        self.dropout_enabled = (self.missing_sensors == "drop" or bool(self.drop_sensors["cameras"])
                                or self.drop_sensors["lidar"] or self.drop_sensors["max_sweeps"] is not None)
        self._dropout_counts = dict.fromkeys(COUNT_KEYS, 0)
        self.pipeline = Compose(pipeline or [], path=f"{self.ann_file} pipeline")
        self._class_index = {name: i for i, name in enumerate(self.object_classes)}

    def __len__(self) -> int:
        return len(self.data_infos)

    @property
    def dropout_counts(self) -> dict[str, int]:
        """Files missing and sensors dropped so far, over the samples returned **in this process**
        (data-loader workers count in their own copies: add up `metas["dropped"]["counts"]` instead,
        with bevfusion.datasets.dropout.sum_dropout_counts)."""
        return dict(self._dropout_counts)

    def reset_dropout_counts(self) -> None:
        self._dropout_counts = dict.fromkeys(COUNT_KEYS, 0)

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
        if self.dropout_enabled:
            # What to leave out on purpose, what a missing file does, and the record of what the
            # loaders left out (bevfusion.datasets.dropout). Without dropout options none of these
            # keys exist, so batches are exactly as before.
            results.update({
                "camera_mask": np.array([n not in self.drop_sensors["cameras"] for n in info["cams"]], dtype=bool),
                "drop_lidar": self.drop_sensors["lidar"],
                "max_sweeps": self.drop_sensors["max_sweeps"],
                "missing_sensors": self.missing_sensors,
                "dropped": new_record(),
            })
        if self.has_annotations(index):
            results["ann_info"] = self.get_ann_info(index)
        return results

    def has_annotations(self, index: int) -> bool:
        """Whether the info carries ground truth (val infos do, also in test mode; test-split infos do not)."""
        return all(k in self.data_infos[index] for k in ANN_KEYS)

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
        return self._prepare(index)[0]

    def _prepare(self, index: int) -> tuple[dict | None, dict[str, Any] | None]:
        """The pipeline's output and the sample's dropout record (filled in by the loaders; None
        without dropout options)."""
        results = self.get_data_info(index)
        record = results.get("dropped")
        return self.pipeline(results), record

    def _count(self, record: Mapping[str, Any] | None) -> None:
        if record is not None:
            for key, n in record["counts"].items():
                self._dropout_counts[key] += n

    def __getitem__(self, index: int) -> dict:
        if self.test_mode or not self.filter_empty_gt:
            result, record = self._prepare(index)
            if result is None:
                raise RuntimeError(f"sample {self.data_infos[index]['token']}: the pipeline dropped it")
            self._count(record)
            return result
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        for _ in range(len(self)):
            result, record = self._prepare(index)
            if result is not None and _has_labels(result):
                self._count(record)
                return result
            index = int(rng.integers(len(self)))
        raise RuntimeError(f"{self.ann_file}: no sample keeps a labelled box through the pipeline")


def _has_labels(result: Mapping[str, Any]) -> bool:
    labels = result.get("gt_labels_3d")
    if labels is None:
        return True
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return bool((labels != -1).any())

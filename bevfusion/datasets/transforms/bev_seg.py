"""BEV map-segmentation labels from the nuScenes map expansion (official `LoadBEVSegmentation`).

The map is rendered around the **augmented** LiDAR frame, as upstream (facts §5.1): the patch pose is
lidar2global = ego2global · lidar2ego · inverse(lidar_aug_matrix); the patch centre is its
translation and the patch angle (degrees) the heading of its x axis. The scale of the augmentation
is ignored, so the patch is always |xbound| × |ybound| metres while points and boxes are scaled (an
upstream quirk we keep). Masks come from nuscenes-devkit's `NuScenesMap.get_map_mask` for polygon
layers; line layers (the dividers) are drawn the way the devkit draws them, but also when a line
leaves and re-enters the patch (the devkit's own line path iterates a MultiLineString, which
shapely 2 no longer allows).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np

__all__ = ["LoadBEVSegmentation", "get_nuscenes_map", "map_layers_for_class", "patch_pose"]

_MAPS: dict[tuple[str, str], Any] = {}
_MAPS_LOCK = threading.Lock()

_LINE_LAYERS = ("road_divider", "lane_divider", "traffic_light")


def get_nuscenes_map(dataset_root: str | os.PathLike, location: str):
    """The devkit's NuScenesMap for `location` (cached per process: loading a real map takes seconds)."""
    key = (os.path.realpath(os.fspath(dataset_root)), str(location))
    with _MAPS_LOCK:
        nusc_map = _MAPS.get(key)
        if nusc_map is None:
            from nuscenes.map_expansion.map_api import NuScenesMap

            path = os.path.join(key[0], "maps", "expansion", f"{location}.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"map expansion file {path} for location {location!r} is missing")
            nusc_map = NuScenesMap(dataroot=key[0], map_name=str(location))
            _MAPS[key] = nusc_map
    return nusc_map


def map_layers_for_class(name: str) -> list[str]:
    """Devkit layers whose union is a map class (upstream's mapping)."""
    if name == "divider":
        return ["road_divider", "lane_divider"]
    if name == "drivable_area*":
        return ["road_segment", "lane"]
    return [name]


def patch_pose(lidar2ego: np.ndarray, ego2global: np.ndarray, lidar_aug_matrix: np.ndarray
               ) -> tuple[np.ndarray, float, bool]:
    """(global xy of the augmented LiDAR origin, heading of its x axis in degrees, mirrored?).

    `mirrored` is true when the augmentation includes a reflection (an odd number of flips): the
    frame's y axis then points clockwise of its x axis in the global frame.
    """
    lidar2global = np.asarray(ego2global, np.float64) @ np.asarray(lidar2ego, np.float64) \
        @ np.linalg.inv(np.asarray(lidar_aug_matrix, np.float64))
    rotation = lidar2global[:3, :3]
    x_axis, y_axis = rotation[:, 0], rotation[:, 1]
    yaw = float(np.arctan2(x_axis[1], x_axis[0]))
    mirrored = bool(x_axis[0] * y_axis[1] - x_axis[1] * y_axis[0] < 0)
    return lidar2global[:2, 3].copy(), float(np.degrees(yaw)), mirrored


def _line_masks(nusc_map, patch_box, patch_angle, layer_names, canvas_size) -> dict[str, np.ndarray]:
    """Line layers drawn like the devkit's `_line_geom_to_mask` (2-px cv2 polylines), multi-part safe."""
    import cv2
    from shapely import affinity
    from shapely.geometry import box as shapely_box

    canvas_h, canvas_w = canvas_size
    patch_h, patch_w = patch_box[2], patch_box[3]
    local_patch = shapely_box(-patch_w / 2, -patch_h / 2, patch_w / 2, patch_h / 2)
    out = {}
    for layer_name, geoms in nusc_map.get_map_geom(patch_box, patch_angle, list(layer_names)):
        mask = np.zeros(canvas_size, np.uint8)
        for line in geoms or []:
            line = line.intersection(local_patch)
            if line.is_empty:
                continue
            line = affinity.affine_transform(line, [1.0, 0.0, 0.0, 1.0, patch_w / 2, patch_h / 2])
            line = affinity.scale(line, xfact=canvas_w / patch_w, yfact=canvas_h / patch_h, origin=(0, 0))
            for part in getattr(line, "geoms", [line]):
                if part.geom_type != "LineString" or part.is_empty:
                    continue
                coords = np.asarray(part.coords, np.float64)[:, :2].astype(np.int32).reshape(-1, 2)
                cv2.polylines(mask, [coords], False, 1, 2)
        out[layer_name] = mask
    return out


class LoadBEVSegmentation:
    """Rasterise the map classes around the (augmented) LiDAR frame into `gt_masks_bev`.

    Args:
        dataset_root: folder with `maps/expansion/<location>.json` (falls back to
            `results["dataset_root"]` when None).
        xbound, ybound: [min, max, cell size] in metres; the canvas is X = (max - min) / size cells
            along x and Y along y (200 × 200 for the official [-50, 50, 0.5]).
        classes: map classes in output order; `divider` is road_divider ∪ lane_divider,
            `drivable_area*` road_segment ∪ lane, every other name is the devkit layer of that name.
    Reads `location`, `lidar2ego`, `ego2global`, `lidar_aug_matrix`; writes `gt_masks_bev`
    (len(classes), X, Y) uint8 0/1, cell [i, j] covering x ∈ [xmin + i·size, xmin + (i+1)·size) and the
    same for y. The devkit rounds polygon vertices to whole cells and fills cells whose corner is
    inside (edges included), so boundaries sit up to about one cell off; kept, as upstream.
    """

    def __init__(self, dataset_root: str | None, xbound: Sequence[float], ybound: Sequence[float],
                 classes: Sequence[str]):
        self.dataset_root = dataset_root
        self.xbound = [float(v) for v in xbound]
        self.ybound = [float(v) for v in ybound]
        self.classes = list(classes)
        patch_h = self.ybound[1] - self.ybound[0]
        patch_w = self.xbound[1] - self.xbound[0]
        self.patch_size = (patch_h, patch_w)
        self.canvas_size = (int(round(patch_h / self.ybound[2])), int(round(patch_w / self.xbound[2])))
        self.mappings = {name: map_layers_for_class(name) for name in self.classes}
        self.layer_names = list(dict.fromkeys(layer for name in self.classes for layer in self.mappings[name]))

    def __call__(self, results: dict) -> dict:
        location = results.get("location")
        token = results.get("token", "?")
        if not location:
            raise KeyError(f"sample {token}: no map location, needed by LoadBEVSegmentation")
        root = self.dataset_root if self.dataset_root is not None else results.get("dataset_root")
        if root is None:
            raise ValueError("LoadBEVSegmentation: dataset_root is not set")
        nusc_map = get_nuscenes_map(root, location)

        origin, angle, mirrored = patch_pose(results["lidar2ego"], results["ego2global"],
                                             results.get("lidar_aug_matrix", np.eye(4)))
        # the patch centre is the middle of the x/y bounds (the origin for the official symmetric ones)
        centre_local = np.array([sum(self.xbound[:2]) / 2, sum(self.ybound[:2]) / 2])
        if mirrored:
            centre_local[1] = -centre_local[1]
        t = np.deg2rad(angle)
        centre = origin + np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ centre_local
        patch_box = (float(centre[0]), float(centre[1]), self.patch_size[0], self.patch_size[1])

        polygon_layers = [n for n in self.layer_names if n not in _LINE_LAYERS]
        line_layers = [n for n in self.layer_names if n in _LINE_LAYERS]
        layer_masks: dict[str, np.ndarray] = {}
        if polygon_layers:
            masks = nusc_map.get_map_mask(patch_box, angle, polygon_layers, self.canvas_size)
            layer_masks.update(zip(polygon_layers, masks))
        if line_layers:
            layer_masks.update(_line_masks(nusc_map, patch_box, angle, line_layers, self.canvas_size))

        labels = np.zeros((len(self.classes), self.canvas_size[1], self.canvas_size[0]), np.uint8)  # (C, X, Y)
        for k, name in enumerate(self.classes):
            for layer in self.mappings[name]:
                labels[k] |= (np.asarray(layer_masks[layer]).T > 0).astype(np.uint8)  # (h=Y, w=X) → (X, Y)
        if mirrored:
            # the canvas was drawn in the unmirrored frame; the sample's y axis points the other way
            labels = np.ascontiguousarray(labels[:, :, ::-1])
        results["gt_masks_bev"] = labels
        return results

    def __repr__(self) -> str:
        return (f"LoadBEVSegmentation(dataset_root={self.dataset_root!r}, xbound={self.xbound}, "
                f"ybound={self.ybound}, classes={self.classes})")

"""Colours for the drive recordings: object and map classes, point colour maps, BEV map composites.

Everything here is plain numpy (no rerun), so it is cheap to test and to reuse elsewhere.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

__all__ = ["OBJECT_COLORS", "MAP_COLORS", "GT_COLOR", "EGO_COLOR", "class_color", "colormap", "point_colors",
           "bev_map_image"]

# RGB, one per nuScenes detection class (our own palette: vehicles warm, people and cycles cool,
# static objects grey and yellow).
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "car": (255, 158, 0),
    "truck": (255, 99, 71),
    "construction_vehicle": (233, 150, 70),
    "bus": (255, 69, 0),
    "trailer": (255, 140, 0),
    "barrier": (112, 128, 144),
    "motorcycle": (255, 61, 99),
    "bicycle": (220, 20, 60),
    "pedestrian": (0, 0, 230),
    "traffic_cone": (47, 79, 79),
}

# Ground truth is drawn thin in one neutral colour, predictions in their class colours: the two stay apart
# in every panel. The ego marker is white.
GT_COLOR: tuple[int, int, int] = (215, 215, 215)
EGO_COLOR: tuple[int, int, int] = (255, 255, 255)

MAP_COLORS: dict[str, tuple[int, int, int]] = {
    "drivable_area": (166, 206, 227),
    "drivable_area*": (166, 206, 227),
    "ped_crossing": (251, 154, 153),
    "walkway": (227, 26, 28),
    "stop_line": (253, 191, 111),
    "carpark_area": (255, 127, 0),
    "divider": (106, 61, 154),
}

# Anchors of a perceptually ordered blue → green → yellow → red ramp (sampled by eye, not copied from a
# library), interpolated linearly.
_RAMP = np.array([
    [48, 18, 59], [65, 105, 225], [30, 180, 230], [40, 220, 140], [160, 230, 50], [250, 190, 40],
    [240, 90, 30], [122, 4, 3]], dtype=np.float64)


def class_color(name: str) -> tuple[int, int, int]:
    """The colour of an object or map class; unknown names get a stable colour derived from the name."""
    if name in OBJECT_COLORS:
        return OBJECT_COLORS[name]
    if name in MAP_COLORS:
        return MAP_COLORS[name]
    h = zlib.crc32(name.encode("utf-8"))
    return (64 + h % 192, 64 + (h >> 8) % 192, 64 + (h >> 16) % 192)


def colormap(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(N,) values → (N, 3) uint8 RGB on the ramp; values outside [vmin, vmax] are clipped, NaN → vmin."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=vmin)
    t = np.clip((values - vmin) / max(vmax - vmin, 1e-9), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(t).astype(np.int64), len(_RAMP) - 2)
    frac = (t - lo)[:, None]
    return np.round(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def point_colors(points: np.ndarray, color_by: str = "height", height_range: tuple[float, float] = (-3.0, 3.0)
                 ) -> np.ndarray:
    """(N, 3+) LiDAR points → (N, 3) uint8 colours.

    Args:
        points: columns (x, y, z, intensity, ...) in metres, intensity as stored by nuScenes (0-255).
        color_by: "height" (z in the points' frame over `height_range`) or "intensity" (log-scaled).
    """
    points = np.asarray(points)
    if color_by == "height":
        return colormap(points[:, 2], *height_range)
    if color_by == "intensity":
        if points.shape[1] < 4:
            raise ValueError("colouring by intensity needs a 4th point column")
        return colormap(np.log1p(np.clip(points[:, 3], 0, None)), 0.0, np.log1p(255.0))
    raise ValueError(f"color_by must be 'height' or 'intensity', not {color_by!r}")


def bev_map_image(masks: np.ndarray, classes: Sequence[str], threshold: float = 0.5) -> np.ndarray:
    """Composite (C, X, Y) BEV map masks or probabilities into one (X, Y, 3) uint8 RGB image.

    Row r of the image is x index X-1-r and column c is y index Y-1-c, so with x forward and y left the
    image reads like a map seen from above, forward up. Masks in the nuScenes LiDAR frame (x right,
    y forward) must be turned onto the ego's axes first (`frames.BevCanvas.masks`). A cell takes the colour of the last
    class (in `classes` order) whose value is >= `threshold`; empty cells are dark grey.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != len(classes):
        raise ValueError(f"BEV masks of shape {masks.shape} do not match {len(classes)} map classes (C, X, Y)")
    image = np.full(masks.shape[1:] + (3,), 40, dtype=np.uint8)
    for k, name in enumerate(classes):
        image[masks[k] >= threshold] = class_color(name)
    return np.ascontiguousarray(image[::-1, ::-1])

"""Colour helpers of the drive recordings (plain numpy), and the lazy rerun import."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bevfusion.datasets.nuscenes import MAP_CLASSES, OBJECT_CLASSES
from bevfusion.visualization.colors import bev_map_image, class_color, colormap, point_colors


def test_colormap_ends_and_clipping():
    c = colormap(np.array([-10.0, 0.0, 1.0, 10.0, np.nan]), 0.0, 1.0)
    assert c.dtype == np.uint8 and c.shape == (5, 3)
    np.testing.assert_array_equal(c[0], c[1])  # clipped below
    np.testing.assert_array_equal(c[2], c[3])  # clipped above
    np.testing.assert_array_equal(c[4], c[1])  # NaN → vmin
    assert not np.array_equal(c[1], c[2])


def test_point_colors_by_height_and_intensity():
    pts = np.array([[0, 0, -3.0, 0, 0], [0, 0, 3.0, 255, 0]], dtype=np.float32)
    by_height = point_colors(pts, "height")
    by_intensity = point_colors(pts, "intensity")
    np.testing.assert_array_equal(by_height, by_intensity)  # both span the full ramp here
    with pytest.raises(ValueError, match="height' or 'intensity"):
        point_colors(pts, "range")


def test_class_colors_are_distinct_and_stable():
    colors = [class_color(n) for n in OBJECT_CLASSES]
    assert len(set(colors)) == len(colors)
    assert class_color("unicycle") == class_color("unicycle")
    assert all(len(class_color(n)) == 3 for n in MAP_CLASSES)


def test_bev_map_image_orientation():
    """x forward is up, y left is left: a cell at (x max, y max) lands in the top-left pixel."""
    masks = np.zeros((len(MAP_CLASSES), 200, 200), np.float32)
    masks[0, 199, 199] = 1.0  # drivable area, front-left corner
    masks[1, 0, 0] = 0.4  # ped crossing below the threshold, rear-right corner
    image = bev_map_image(masks, MAP_CLASSES, threshold=0.5)
    assert image.shape == (200, 200, 3)
    assert tuple(image[0, 0]) == class_color("drivable_area")
    assert tuple(image[199, 199]) == (40, 40, 40)
    with pytest.raises(ValueError, match="do not match 6 map classes"):
        bev_map_image(masks[:2], MAP_CLASSES)


def test_importing_the_package_does_not_import_rerun():
    code = ("import sys, bevfusion, bevfusion.visualization, bevfusion.visualization.frames, "
            "bevfusion.visualization.drive, bevfusion.visualization.recording; "
            "assert 'rerun' not in sys.modules, 'rerun imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

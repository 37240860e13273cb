"""Synthetic drives in the exact nuScenes on-disk layout: our embedded dataset and test fixture.

`generate(out_dir, seed=0, ...)` simulates a road grid on each of the four nuScenes maps, an ego car
driving along it with traffic of all ten detection classes, a ray-cast 32-beam LiDAR (keyframes at
2 Hz, sweeps at 20 Hz) and six z-buffer-rendered cameras, and writes the 13 nuScenes tables, the
sensor files and the map expansion so that nuscenes-devkit loads the result unchanged
(v1.0-mini layout with the official mini scene names up to 10 scenes).
"""
from .generate import SyntheticConfig, generate, split_scene_names
from .objects import CLASS_COLORS, CLASS_HUES, CLASS_NAMES
from .sensors import CAMERA_NAMES, build_rig
from .world import MAP_NAMES

__all__ = ["generate", "SyntheticConfig", "split_scene_names", "CLASS_NAMES", "CLASS_HUES", "CLASS_COLORS",
           "CAMERA_NAMES", "MAP_NAMES", "build_rig"]

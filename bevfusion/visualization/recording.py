"""Log drive frames to a rerun recording (rerun-sdk 0.23), with a blueprint.

Entity tree (every transform maps the child's frame into its parent's, as rerun expects):

    world                                   global frame, z up
    world/ego_trajectory                    LineStrips3D: the ego path of the scene so far (its last `view_range` m)
    world/ego                               Transform3D ego2global; the 3D view's origin, so the view follows the ego
    world/ego/body                          Boxes3D: the ego car (static; a Renault Zoe's size, placed approximately)
    world/ego/lidar                         Transform3D lidar2ego
    world/ego/lidar/points                  Points3D, the multi-sweep cloud within `view_range` of the LiDAR
    world/ego/lidar/{gt,pred}/boxes         Boxes3D within `view_range`: GT thin and grey (class on hover),
                                            predictions thick in class colours, labelled "class score"
    world/ego/lidar/{gt,pred}/velocity      Arrows3D from each of those box centres, the motion in `velocity_seconds`
    world/ego/lidar/CAM_*                   Transform3D camera2lidar + Pinhole (intrinsics, image size)
    world/ego/lidar/CAM_*/image             EncodedImage (the JPEG as stored)
    world/ego/lidar/CAM_*/{gt,pred}/boxes   LineStrips2D: every box's edges, cut at the near plane, projected
                                            and clipped to the image rectangle (pixels)
    world/ego/lidar/CAM_*/pred/labels       Points2D: "class score" at the top of each visible predicted box
    bev/{gt,pred}/map                       Image: the BEV map masks composited, forward up (see `BevCanvas`)
    bev/{gt,pred}/boxes                     LineStrips2D: box footprints with a heading tick, clipped to the map
    bev/{gt,pred}/ego                       LineStrips2D: the ego marker, a triangle pointing forward
    logs                                    TextLog: warnings (missing files)

Timelines: `timestamp` (the sample's nuScenes time) and `sample` (its index in the drive).

The 3D view frames what it shows (rerun 0.23 has no blueprint setting for the eye: its default eye looks
at the bounding box of the view's contents), so only what lies within `LogOptions.view_range` of the
LiDAR is logged into it; the BEV panels and the cameras show every box.

Rotations are passed as raw arrays (quaternions (x, y, z, w), 3x3 matrices) and blueprint ranges as
Arrow arrays, never rerun's helper classes, which some numpy 1.x combinations drop silently.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bevfusion.structures.boxes import box_corners
from bevfusion.utils.logging import get_logger
from bevfusion.visualization.colors import EGO_COLOR, GT_COLOR, bev_map_image, class_color, point_colors
from bevfusion.visualization.frames import BEV_XBOUND, BEV_YBOUND, BevCanvas, CameraView, Frame

__all__ = ["LogOptions", "DriveLogger", "make_blueprint", "write_rrd", "stream_live", "CAMERA_GRID_ORDER",
           "clip_segments", "clip_polylines", "camera_box_strips", "bev_box_strips", "bev_ego_marker", "on_bev_grid"]

# Cameras laid out as they sit on the car: front row left to right, then back row.
CAMERA_GRID_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")

EGO = "world/ego"
LIDAR = "world/ego/lidar"
log = get_logger("visualization")
BOX_GROUPS = ("gt", "pred")

# Line radii in UI points (rerun: a negative radius is in UI points, drawn the same at any zoom) and 2D
# draw orders (rerun's images sit at -10 by default): GT thin and below, predictions thick and on top.
RADIUS_3D = {"gt": -0.75, "pred": -2.0}
RADIUS_2D = {"gt": -1.0, "pred": -2.0}
DRAW_ORDER = {"gt": 20.0, "pred": 30.0, "labels": 35.0, "ego": 40.0}

# The ego car in the ego frame (origin at the rear axle, on the ground): 4.08 x 1.73 x 1.56 m.
EGO_BODY_CENTER = (1.35, 0.0, 0.78)
EGO_BODY_HALF_SIZE = (2.04, 0.865, 0.78)
# The BEV ego marker, a triangle in the ego frame (metres): tip ahead, base behind the rear axle.
EGO_MARKER = ((3.5, 0.0), (-1.0, 1.2), (-1.0, -1.2))

# A box's 12 edges as 4 polylines over the corners of `box_corners` (bottom 0-3, top 4-7).
_BOX_POLYLINES = ((0, 1, 2, 3, 0, 4, 5, 6, 7, 4), (1, 5), (2, 6), (3, 7))


@dataclass
class LogOptions:
    """How frames look.

    Args:
        color_by: colour LiDAR points by "height" or "intensity".
        map_threshold: predicted map probabilities at or above this count as the class.
        velocity_seconds: a velocity arrow's length is the distance travelled in this many seconds.
        point_radius: point radius in UI points (drawn the same size at any distance).
        trajectory_gap_s: without scene tables, a time gap longer than this starts a new trajectory.
        view_range: the 3D view shows points, boxes and the ego path within this many metres (in the
            ground plane) of the LiDAR, which is what its default eye frames; None shows everything.
        map_opacity: opacity of the BEV map images, below 1 to let the box outlines stand out.
        camera_near: box edges closer to a camera than this (metres, along its optical axis) are cut.
    """

    color_by: str = "height"
    map_threshold: float = 0.5
    velocity_seconds: float = 1.0
    point_radius: float = 1.5
    trajectory_gap_s: float = 5.0
    view_range: float | None = 30.0
    map_opacity: float = 0.6
    camera_near: float = 0.1


def camera_entity(name: str) -> str:
    return f"{LIDAR}/{name}"


def _yaw_quaternions(yaw: np.ndarray) -> np.ndarray:
    """(K,) yaw about +z → (K, 4) quaternions (x, y, z, w)."""
    q = np.zeros((len(yaw), 4), dtype=np.float32)
    q[:, 2] = np.sin(yaw / 2)
    q[:, 3] = np.cos(yaw / 2)
    return q


# ---------------------------------------------------------------------------------------------------
# Drawing geometry (plain numpy)


def clip_segments(p0: np.ndarray, p1: np.ndarray, lo: Sequence[float], hi: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Liang–Barsky: which part of each segment p0 → p1 lies in the box lo <= p <= hi.

    Args:
        p0, p1: (N, D) segment ends; lo, hi: (D,) box corners (±inf for an open side).
    Returns:
        (keep (N,) bool, t0 (N,), t1 (N,)): the part inside is p0 + t (p1 - p0) for t in [t0, t1];
        keep is False when the segment misses the box or only touches it in one point. Boundaries count
        as inside; a zero-length segment inside is kept (t0 = 0, t1 = 1), so polylines stay joined.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    d = np.asarray(p1, dtype=np.float64) - p0
    n = len(p0)
    keep = np.ones(n, dtype=bool)
    t0, t1 = np.zeros(n), np.ones(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(p0.shape[1]):
            # inside along this axis where p·t <= q, for both sides of the box
            for p, q in ((-d[:, axis], p0[:, axis] - lo[axis]), (d[:, axis], hi[axis] - p0[:, axis])):
                if np.isinf(q).all():
                    continue  # an open side
                r = q / p
                keep &= ~((p == 0) & (q < 0))  # parallel to this side and outside it
                t0 = np.where(p < 0, np.maximum(t0, r), t0)
                t1 = np.where(p > 0, np.minimum(t1, r), t1)
    keep &= t0 < t1
    return keep, t0, t1


def _cut(p0: np.ndarray, p1: np.ndarray, t0: np.ndarray, t1: np.ndarray, lo: Sequence[float],
         hi: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The ends of the pieces [t0, t1] of segments p0 → p1 clipped to the box lo..hi: exact where a
    segment keeps its own end, and a cut end never a rounding error outside the box."""
    d = p1 - p0
    with np.errstate(invalid="ignore"):  # dropped segments may have infinite ends
        a = np.where((t0 == 0)[:, None], p0, np.clip(p0 + t0[:, None] * d, lo, hi))
        b = np.where((t1 == 1)[:, None], p1, np.clip(p0 + t1[:, None] * d, lo, hi))
    return a, b


def _chains(keep: np.ndarray, a: np.ndarray, b: np.ndarray, whole_start: np.ndarray, whole_end: np.ndarray,
            continues: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Join kept pieces a → b into polylines: piece i extends the current one when segment i continues
    segment i-1 (`continues`), i-1 kept its end and i its start. Returns (strips, first segment of each)."""
    strips: list[np.ndarray] = []
    first: list[int] = []
    current: list[np.ndarray] | None = None
    for i in range(len(keep)):
        if not keep[i]:
            current = None
            continue
        if current is not None and continues[i] and whole_start[i] and whole_end[i - 1] and keep[i - 1]:
            current.append(b[i])
        else:
            current = [a[i], b[i]]
            strips.append(current)  # type: ignore[arg-type]
            first.append(i)
    return [np.asarray(s, dtype=np.float64) for s in strips], first


def _segments(polylines: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Polylines (n_i, D) → segment starts, ends (N, D), `continues` (N,) and the polyline of each segment."""
    starts, ends, continues, owner = [], [], [], []
    for k, line in enumerate(polylines):
        line = np.asarray(line, dtype=np.float64)
        if len(line) < 2:
            continue
        starts.append(line[:-1])
        ends.append(line[1:])
        cont = np.ones(len(line) - 1, dtype=bool)
        cont[0] = False
        continues.append(cont)
        owner.append(np.full(len(line) - 1, k))
    if not starts:
        return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, bool), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(continues), np.concatenate(owner)


def clip_polylines(polylines: Sequence[np.ndarray], size: tuple[float, float]) -> tuple[list[np.ndarray], np.ndarray]:
    """Clip 2D polylines to the rectangle [0, width] x [0, height].

    Returns (strips, source): the pieces inside, each (m >= 2, 2) float64 (a polyline that leaves and
    comes back gives several), and the index of the polyline each piece comes from.
    """
    a, b, continues, owner = _segments(polylines)
    lo, hi = (0.0, 0.0), (float(size[0]), float(size[1]))
    keep, t0, t1 = clip_segments(a, b, lo, hi)
    qa, qb = _cut(a, b, t0, t1, lo, hi)
    strips, first = _chains(keep, qa, qb, t0 == 0, t1 == 1, continues)
    return strips, owner[first] if first else np.zeros(0, np.int64)


def camera_box_strips(boxes: np.ndarray, camera: CameraView, near: float = 0.1
                      ) -> tuple[list[np.ndarray], np.ndarray]:
    """The edges of LiDAR-frame boxes as drawn on a camera image, in pixels.

    Each edge is cut at the plane `near` metres in front of the camera (the part behind is dropped),
    projected with the intrinsics (a straight edge in front of a pinhole stays straight) and clipped
    to the image [0, w] x [0, h]. Returns (strips, box index of each strip).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if len(boxes) == 0:
        return [], np.zeros(0, np.int64)
    lidar2camera = np.linalg.inv(np.asarray(camera.camera2lidar, dtype=np.float64))
    corners = box_corners(boxes[:, :7]) @ lidar2camera[:3, :3].T + lidar2camera[:3, 3]  # (K, 8, 3)
    polylines = [corners[k, list(idx)] for k in range(len(boxes)) for idx in _BOX_POLYLINES]
    a, b, continues, owner = _segments(polylines)
    # the near plane: z >= near
    lo, hi = (-np.inf, -np.inf, near), (np.inf, np.inf, np.inf)
    front, n0, n1 = clip_segments(a, b, lo, hi)
    ca, cb = _cut(a, b, n0, n1, lo, hi)
    K = np.asarray(camera.intrinsics, dtype=np.float64)[:3, :3]

    def project(p):
        z = np.where(front, p[:, 2], 1.0)[:, None]  # dropped edges are never used
        return (p @ K.T)[:, :2] / z

    ua, ub = project(ca), project(cb)
    lo, hi = (0.0, 0.0), (float(camera.size[0]), float(camera.size[1]))
    inside, s0, s1 = clip_segments(ua, ub, lo, hi)
    qa, qb = _cut(ua, ub, s0, s1, lo, hi)
    strips, first = _chains(front & inside, qa, qb, (n0 == 0) & (s0 == 0), (n1 == 1) & (s1 == 1), continues)
    source = owner[first] // len(_BOX_POLYLINES) if first else np.zeros(0, np.int64)
    return strips, source


def on_bev_grid(masks: np.ndarray) -> np.ndarray:
    """(C, X, Y) masks covering the BEV extent at any cell size → (C, 200, 200) on the grid of
    BEV_XBOUND / BEV_YBOUND (nearest cell), the grid `BevCanvas` and the box outlines refer to.

    Map heads trained at another resolution over the same extent (the synthetic config's 1 m cells)
    are shown on the same image as the official 0.5 m ones.
    """
    nx = int(round((BEV_XBOUND[1] - BEV_XBOUND[0]) / BEV_XBOUND[2]))
    ny = int(round((BEV_YBOUND[1] - BEV_YBOUND[0]) / BEV_YBOUND[2]))
    if masks.shape[1:] == (nx, ny):
        return masks
    ix = ((np.arange(nx) + 0.5) * masks.shape[1] / nx).astype(np.int64)
    iy = ((np.arange(ny) + 0.5) * masks.shape[2] / ny).astype(np.int64)
    return masks[:, ix][:, :, iy]


def bev_box_strips(boxes: np.ndarray, canvas: BevCanvas = BevCanvas()) -> np.ndarray:
    """(K, 7+) LiDAR-frame boxes → (K, 7, 2) float32 pixel polylines on `canvas` (not clipped): the
    footprint with a tick from the front edge to the centre."""
    # (K, 4, 2): front-left, rear-left, rear-right, front-right
    corners = box_corners(np.asarray(boxes, np.float64)[:, :7])[:, :4, :2]
    front = (corners[:, 0] + corners[:, 3]) / 2
    strip = np.stack([front, corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3], front,
                      np.asarray(boxes, np.float64)[:, :2]], axis=1)
    return canvas.pixels(strip).astype(np.float32)


def bev_ego_marker(lidar2ego: np.ndarray, canvas: BevCanvas) -> np.ndarray:
    """(4, 2) closed triangle in canvas pixels: the ego at its pose, pointing the way it drives."""
    tri = np.asarray(EGO_MARKER + EGO_MARKER[:1], dtype=np.float64)
    ego = np.concatenate([tri, np.zeros((len(tri), 1)), np.ones((len(tri), 1))], axis=1)  # (4, 4) homogeneous
    in_lidar = ego @ np.linalg.inv(np.asarray(lidar2ego, dtype=np.float64)).T
    return canvas.pixels(in_lidar[:, :2])


class DriveLogger:
    """Logs `Frame`s, in time order, to one rerun RecordingStream.

    Args:
        rec: the recording stream (any sink).
        map_classes: order of the BEV mask channels.
        options: appearance.
    """

    def __init__(self, rec, map_classes: Sequence[str], options: LogOptions | None = None):
        import rerun as rr

        self.rr = rr
        self.rec = rec
        self.map_classes = list(map_classes)
        self.options = options or LogOptions()
        self._trajectory: list[np.ndarray] = []
        self._last: tuple[str | None, int] | None = None
        self._count = 0
        rec.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
        # the 3D view's origin: rerun reads its up axis there (or at the closest ancestor)
        rec.log(EGO, rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
        rec.log(f"{EGO}/body", rr.Boxes3D(centers=[EGO_BODY_CENTER], half_sizes=[EGO_BODY_HALF_SIZE],
                                          colors=[(110, 130, 150)], fill_mode="solid"), static=True)

    def log(self, frame: Frame) -> None:
        rr, rec = self.rr, self.rec
        rec.set_time("sample", sequence=self._count)
        rec.set_time("timestamp", timestamp=np.datetime64(int(frame.timestamp_us), "us"))
        self._count += 1
        for message in frame.warnings:
            rec.log("logs", rr.TextLog(message if frame.token in message else f"sample {frame.token}: {message}",
                                          level="WARN"))

        groups = {"gt": (frame.gt_boxes, frame.gt_names, None),
                  "pred": (frame.pred_boxes, frame.pred_names, frame.pred_scores)}
        self._log_pose(frame)
        self._log_points(frame)
        for group, (boxes, names, scores) in groups.items():
            self._log_boxes(group, boxes, names, scores)
        for camera in frame.cameras:
            self._log_camera(camera, groups)
        canvas = BevCanvas.for_lidar(frame.lidar2ego)
        marker = bev_ego_marker(frame.lidar2ego, canvas)
        self._log_bev("gt", frame.gt_masks, frame.gt_boxes, frame.gt_names, 0.5, canvas, marker)
        self._log_bev("pred", frame.pred_masks, frame.pred_boxes, frame.pred_names, self.options.map_threshold,
                      canvas, marker)

    def _in_view(self, xy: np.ndarray) -> np.ndarray:
        if self.options.view_range is None:
            return np.ones(len(xy), dtype=bool)
        return np.hypot(xy[:, 0], xy[:, 1]) <= self.options.view_range

    @staticmethod
    def _colors(group: str, names: Sequence[str]) -> np.ndarray:
        if group == "gt":
            return np.tile(np.asarray(GT_COLOR, dtype=np.uint8), (len(names), 1))
        return np.array([class_color(n) for n in names], dtype=np.uint8).reshape(-1, 3)

    @staticmethod
    def _labels(names: Sequence[str], scores: np.ndarray | None) -> list[str]:
        return list(names) if scores is None else [f"{n} {s:.2f}" for n, s in zip(names, scores)]

    def _log_pose(self, frame: Frame) -> None:
        rr, rec = self.rr, self.rec
        rec.log(EGO, rr.Transform3D(translation=frame.ego2global[:3, 3], mat3x3=frame.ego2global[:3, :3],
                                    axis_length=2.0))
        rec.log(LIDAR, rr.Transform3D(translation=frame.lidar2ego[:3, 3], mat3x3=frame.lidar2ego[:3, :3]))
        position = frame.ego2global[:3, 3].copy()
        new_scene = self._last is None
        if self._last is not None:
            scene, last_us = self._last
            if frame.scene is not None or scene is not None:
                new_scene = frame.scene != scene
            else:
                new_scene = (frame.timestamp_us - last_us) / 1e6 > self.options.trajectory_gap_s
        if new_scene:
            self._trajectory = []
        self._trajectory.append(position)
        self._last = (frame.scene, frame.timestamp_us)
        path = np.asarray(self._trajectory, dtype=np.float64)
        if self.options.view_range is not None:  # the newest poses within range, so the 3D view stays framed
            far = np.flatnonzero(np.hypot(*(path[:, :2] - position[:2]).T) > self.options.view_range)
            path = path[far[-1] + 1:] if len(far) else path
        if len(path) == 1:  # a strip needs two points
            path = np.concatenate([path, path])
        rec.log("world/ego_trajectory", rr.LineStrips3D([path], colors=[(255, 255, 255)], radii=-2.0))

    def _log_points(self, frame: Frame) -> None:
        rr = self.rr
        pts = frame.points
        if pts is not None and len(pts):
            pts = pts[self._in_view(pts[:, :2])]
        if pts is None or len(pts) == 0:
            self.rec.log(f"{LIDAR}/points", rr.Clear(recursive=False))
            return
        self.rec.log(f"{LIDAR}/points", rr.Points3D(
            np.ascontiguousarray(pts[:, :3], dtype=np.float32),
            colors=point_colors(pts, self.options.color_by), radii=-self.options.point_radius))

    def _log_boxes(self, group: str, boxes: np.ndarray | None, names: list[str], scores: np.ndarray | None) -> None:
        rr, rec = self.rr, self.rec
        if boxes is not None and len(boxes):
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
            shown = self._in_view(boxes[:, :2])
            boxes, names = boxes[shown], [n for n, s in zip(names, shown) if s]
            scores = None if scores is None else np.asarray(scores)[shown]
        if boxes is None or len(boxes) == 0:
            # rerun drops empty batches, so an empty frame must clear the previous frame's boxes
            rec.log(f"{LIDAR}/{group}", rr.Clear(recursive=True))
            return
        colors = self._colors(group, names)
        rec.log(f"{LIDAR}/{group}/boxes", rr.Boxes3D(
            centers=boxes[:, :3].astype(np.float32), half_sizes=(boxes[:, 3:6] / 2).astype(np.float32),
            quaternions=_yaw_quaternions(boxes[:, 6]), colors=colors, radii=RADIUS_3D[group],
            labels=self._labels(names, scores), show_labels=group == "pred"))
        vectors = np.zeros((len(boxes), 3), dtype=np.float32)
        vectors[:, :2] = boxes[:, 7:9] * self.options.velocity_seconds
        rec.log(f"{LIDAR}/{group}/velocity", rr.Arrows3D(
            origins=boxes[:, :3].astype(np.float32), vectors=vectors, colors=colors, radii=RADIUS_3D[group]))

    def _log_camera(self, camera: CameraView, groups: Mapping[str, tuple]) -> None:
        rr, rec = self.rr, self.rec
        entity = camera_entity(camera.name)
        T = camera.camera2lidar
        rec.log(entity, rr.Transform3D(translation=T[:3, 3], mat3x3=T[:3, :3]))
        rec.log(entity, rr.Pinhole(image_from_camera=camera.intrinsics, resolution=list(camera.size),
                                   image_plane_distance=3.0))
        if camera.image_path is None:
            rec.log(f"{entity}/image", rr.Clear(recursive=False))
        else:
            rec.log(f"{entity}/image", rr.EncodedImage(path=camera.image_path))
        for group, (boxes, names, scores) in groups.items():
            strips, source = ([], np.zeros(0, np.int64)) if boxes is None else \
                camera_box_strips(boxes, camera, self.options.camera_near)
            if not strips:
                rec.log(f"{entity}/{group}", rr.Clear(recursive=True))
                continue
            colors = self._log_strips(f"{entity}/{group}/boxes", group, names, strips, source)
            if group == "pred":  # one label per visible box, at the top of what is drawn of it
                shown = np.unique(source)
                anchors = []
                for k in shown:
                    points = np.concatenate([s for s, j in zip(strips, source) if j == k])
                    anchors.append(points[np.argmin(points[:, 1])])
                shown_scores = None if scores is None else np.asarray(scores)[shown]
                labels = self._labels([names[k] for k in shown], shown_scores)
                rec.log(f"{entity}/pred/labels", rr.Points2D(
                    np.asarray(anchors, dtype=np.float32), colors=colors[shown], radii=-2.0, labels=labels,
                    show_labels=True, draw_order=DRAW_ORDER["labels"]))

    def _log_bev(self, group: str, masks: np.ndarray | None, boxes: np.ndarray | None, names: list[str],
                 threshold: float, canvas: BevCanvas, marker: np.ndarray) -> None:
        rr, rec = self.rr, self.rec
        if masks is None:
            rec.log(f"bev/{group}/map", rr.Clear(recursive=False))
        else:
            image = bev_map_image(canvas.masks(on_bev_grid(masks)), self.map_classes, threshold)
            rec.log(f"bev/{group}/map", rr.Image(image, opacity=self.options.map_opacity))
        ego, _ = clip_polylines([marker], canvas.size)
        rec.log(f"bev/{group}/ego", rr.LineStrips2D([s.astype(np.float32) for s in ego], colors=[EGO_COLOR],
                                                    radii=-1.5, draw_order=DRAW_ORDER["ego"]))
        strips, source = ([], None) if boxes is None or len(boxes) == 0 else \
            clip_polylines(list(bev_box_strips(boxes, canvas)), canvas.size)
        if not strips:
            rec.log(f"bev/{group}/boxes", rr.Clear(recursive=False))
            return
        self._log_strips(f"bev/{group}/boxes", group, names, strips, source)

    def _log_strips(self, entity: str, group: str, names: list[str], strips: list[np.ndarray],
                    source: np.ndarray) -> np.ndarray:
        """Box outlines (2D strips, `source[i]` the box of strip i) in the group's style; returns the box colours."""
        colors = self._colors(group, names)
        self.rec.log(entity, self.rr.LineStrips2D(
            [s.astype(np.float32) for s in strips], colors=colors[source], radii=RADIUS_2D[group],
            draw_order=DRAW_ORDER[group]))
        return colors


def _visual_bounds(width: float, height: float):
    """A VisualBounds2D of [0, width] x [0, height], built from an Arrow array: rerun 0.23's Range1D
    conversion fails under numpy 1.x (`asarray(copy=...)`) and would drop the bounds."""
    import pyarrow as pa
    import rerun.blueprint as rrb

    arr = pa.array([{"x_range": [0.0, float(width)], "y_range": [0.0, float(height)]}],
                   type=rrb.components.VisualBounds2DBatch._ARROW_DATATYPE)
    return rrb.VisualBounds2D.from_fields(range=arr)


def make_blueprint(camera_names: Iterable[str], camera_sizes: Mapping[str, tuple[int, int]] | None = None,
                   bev_size: tuple[int, int] | None = None):
    """The 3D view (following the ego) and the two BEV maps in the top row, the cameras in a 3 x 2 grid
    below; the blueprint, selection and time panels start collapsed.

    Args:
        camera_names: the cameras, laid out as on the car (CAMERA_GRID_ORDER first).
        camera_sizes: {camera: (width, height)}: each camera view then shows exactly its image.
        bev_size: (width, height) of the BEV canvas (default `BevCanvas().size`).
    """
    import rerun.blueprint as rrb

    names = list(camera_names)
    sizes = dict(camera_sizes or {})
    ordered = [c for c in CAMERA_GRID_ORDER if c in names] + [c for c in names if c not in CAMERA_GRID_ORDER]
    cameras = [rrb.Spatial2DView(name=c, origin=camera_entity(c), contents="$origin/**",
                                 visual_bounds=_visual_bounds(*sizes[c]) if c in sizes else None)
               for c in ordered]
    bev_bounds = _visual_bounds(*(bev_size or BevCanvas().size))
    # the predictions' camera labels would float on the image planes in 3D, where the boxes carry their own
    labels_2d = [f"- /{camera_entity(c)}/pred/labels" for c in ordered]
    top = rrb.Horizontal(
        rrb.Spatial3DView(name="3D", origin=EGO, contents=["/world/**", *labels_2d]),
        rrb.Spatial2DView(name="BEV GT", origin="bev/gt", contents="$origin/**", visual_bounds=bev_bounds),
        # the GT outlines (thin, grey) under the predictions show misses and false positives at a glance
        rrb.Spatial2DView(name="BEV pred", origin="bev/pred", contents=["$origin/**", "/bev/gt/boxes"],
                          visual_bounds=bev_bounds),
        column_shares=[2, 1, 1],
    )
    root = rrb.Vertical(top, rrb.Grid(*cameras, grid_columns=3), row_shares=[1, 1]) if cameras else top
    return rrb.Blueprint(root, rrb.BlueprintPanel(state="collapsed"), rrb.SelectionPanel(state="collapsed"),
                         rrb.TimePanel(state="collapsed"))


def _peek(frames: Iterable[Frame]) -> tuple[Frame | None, Iterable[Frame]]:
    """The first frame (for the blueprint's image sizes) and the frames, that one included."""
    it = iter(frames)
    first = next(it, None)
    return first, (chain([first], it) if first is not None else it)


def _blueprint_for(first: Frame | None, camera_names: Sequence[str]):
    if first is None:
        return make_blueprint(camera_names)
    return make_blueprint(camera_names, {c.name: c.size for c in first.cameras},
                          BevCanvas.for_lidar(first.lidar2ego).size)


def write_rrd(path: str | os.PathLike, frames: Iterable[Frame], map_classes: Sequence[str],
              camera_names: Sequence[str], options: LogOptions | None = None,
              application_id: str = "bevfusion", recording_name: str | None = None) -> Path:
    """Write `frames` to the .rrd file `path`, atomically.

    The recording goes to a temporary file beside `path`, is flushed and closed, and only then renamed
    to `path`; an error on the way removes the temporary file and leaves `path` as it was.
    Returns the path written.
    """
    import rerun as rr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    rec = rr.RecordingStream(application_id)
    try:
        first, frames = _peek(frames)
        rec.save(tmp, default_blueprint=_blueprint_for(first, camera_names))
        if recording_name:
            rec.send_recording_name(recording_name)
        logger = DriveLogger(rec, map_classes, options)
        for frame in frames:
            logger.log(frame)
        rec.flush(blocking=True)
        rec.disconnect()  # drops the file sink, which closes the file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private
        os.replace(tmp, path)
    except BaseException:
        rec.disconnect()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def stream_live(frames: Iterable[Frame], map_classes: Sequence[str], camera_names: Sequence[str],
                mode: str, options: LogOptions | None = None, application_id: str = "bevfusion") -> Any:
    """Send `frames` to a viewer: mode "spawn" starts a native viewer, "serve" a gRPC server with a web
    viewer. Returns the stream (keep the process alive while the viewer reads from a server)."""
    import rerun as rr

    first, frames = _peek(frames)
    blueprint = _blueprint_for(first, camera_names)
    rec = rr.RecordingStream(application_id)
    if mode == "spawn":
        rec.spawn(default_blueprint=blueprint)
    elif mode == "serve":
        url = rec.serve_grpc(default_blueprint=blueprint)
        rr.serve_web_viewer(connect_to=url, open_browser=False)
        log.info("serving at %s: open the web viewer on http://localhost:9090 or run `rerun --connect %s`", url, url)
    else:
        raise ValueError(f"mode must be 'spawn' or 'serve', not {mode!r}")
    logger = DriveLogger(rec, map_classes, options)
    for frame in frames:
        logger.log(frame)
    rec.flush(blocking=True)
    return rec

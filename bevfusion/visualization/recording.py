"""Log drive frames to a rerun recording (rerun-sdk 0.23), with a blueprint.

Entity tree (every transform maps the child's frame into its parent's, as rerun expects):

    world                               global frame, z up
    world/ego_trajectory                LineStrips3D: the ego path of the current scene so far
    world/ego                           Transform3D ego2global (axes drawn: the ego pose)
    world/ego/lidar                     Transform3D lidar2ego
    world/ego/lidar/points              Points3D, multi-sweep cloud in the LiDAR frame
    world/ego/lidar/{gt,pred}/boxes     Boxes3D, class colours, labels "class" / "class score"
    world/ego/lidar/{gt,pred}/velocity  Arrows3D from each box centre, the motion in `velocity_seconds`
    world/ego/lidar/CAM_*               Transform3D camera2lidar + Pinhole (intrinsics, image size)
    world/ego/lidar/CAM_*/image         EncodedImage (the JPEG as stored)
    bev/{gt,pred}/map                   Image: the BEV map masks composited (forward up, left on the left)
    bev/{gt,pred}/boxes                 LineStrips2D: the boxes drawn on the BEV map's pixel grid
    logs                                TextLog: warnings (missing files)

Timelines: `timestamp` (the sample's nuScenes time) and `sample` (its index in the drive).

Rotations are passed as raw arrays (quaternions (x, y, z, w), 3x3 matrices), never rerun's helper
classes, which some numpy 1.x combinations drop silently.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bevfusion.structures.boxes import box_corners
from bevfusion.utils.logging import get_logger
from bevfusion.visualization.colors import bev_map_image, class_color, point_colors
from bevfusion.visualization.frames import BEV_XBOUND, BEV_YBOUND, Frame

__all__ = ["LogOptions", "DriveLogger", "make_blueprint", "write_rrd", "stream_live", "CAMERA_GRID_ORDER"]

# Cameras laid out as they sit on the car: front row left to right, then back row.
CAMERA_GRID_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")

LIDAR = "world/ego/lidar"
log = get_logger("visualization")
BOX_GROUPS = ("gt", "pred")


@dataclass
class LogOptions:
    """How frames look.

    Args:
        color_by: colour LiDAR points by "height" or "intensity".
        map_threshold: predicted map probabilities at or above this count as the class.
        velocity_seconds: a velocity arrow's length is the distance travelled in this many seconds.
        point_radius: point radius in UI points (drawn the same size at any distance).
        trajectory_gap_s: without scene tables, a time gap longer than this starts a new trajectory.
    """

    color_by: str = "height"
    map_threshold: float = 0.5
    velocity_seconds: float = 1.0
    point_radius: float = 1.5
    trajectory_gap_s: float = 5.0


def camera_entity(name: str) -> str:
    return f"{LIDAR}/{name}"


def _yaw_quaternions(yaw: np.ndarray) -> np.ndarray:
    """(K,) yaw about +z → (K, 4) quaternions (x, y, z, w)."""
    q = np.zeros((len(yaw), 4), dtype=np.float32)
    q[:, 2] = np.sin(yaw / 2)
    q[:, 3] = np.cos(yaw / 2)
    return q


def _bev_pixels(xy: np.ndarray) -> np.ndarray:
    """LiDAR-frame (..., 2) x, y → pixel (u, v) of the BEV map image from `bev_map_image`."""
    u = (BEV_YBOUND[1] - xy[..., 1]) / BEV_YBOUND[2]
    v = (BEV_XBOUND[1] - xy[..., 0]) / BEV_XBOUND[2]
    return np.stack([u, v], axis=-1)


def on_bev_grid(masks: np.ndarray) -> np.ndarray:
    """(C, X, Y) masks covering the BEV extent at any cell size → (C, 200, 200) on the grid of
    BEV_XBOUND / BEV_YBOUND (nearest cell), the grid `_bev_pixels` and the box outlines refer to.

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


def bev_box_strips(boxes: np.ndarray) -> np.ndarray:
    """(K, 7+) boxes → (K, 7, 2) pixel polylines: the footprint with a tick from the front edge to the centre."""
    corners = box_corners(boxes)[:, :4, :2]  # (K, 4, 2): front-left, rear-left, rear-right, front-right
    front = (corners[:, 0] + corners[:, 3]) / 2
    strip = np.stack([front, corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3], front,
                      np.asarray(boxes, np.float64)[:, :2]], axis=1)
    return _bev_pixels(strip).astype(np.float32)


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

    def log(self, frame: Frame) -> None:
        rr, rec = self.rr, self.rec
        rec.set_time("sample", sequence=self._count)
        rec.set_time("timestamp", timestamp=np.datetime64(int(frame.timestamp_us), "us"))
        self._count += 1
        for message in frame.warnings:
            rec.log("logs", rr.TextLog(message if frame.token in message else f"sample {frame.token}: {message}",
                                          level="WARN"))

        self._log_pose(frame)
        self._log_points(frame)
        self._log_boxes("gt", frame.gt_boxes, frame.gt_names, None)
        self._log_boxes("pred", frame.pred_boxes, frame.pred_names, frame.pred_scores)
        for camera in frame.cameras:
            self._log_camera(camera)
        self._log_bev("gt", frame.gt_masks, frame.gt_boxes, frame.gt_names, 0.5)
        self._log_bev("pred", frame.pred_masks, frame.pred_boxes, frame.pred_names, self.options.map_threshold)

    def _log_pose(self, frame: Frame) -> None:
        rr, rec = self.rr, self.rec
        rec.log("world/ego", rr.Transform3D(translation=frame.ego2global[:3, 3], mat3x3=frame.ego2global[:3, :3],
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
        if len(path) == 1:  # a strip needs two points
            path = np.concatenate([path, path])
        rec.log("world/ego_trajectory", rr.LineStrips3D([path], colors=[(255, 255, 255)], radii=-2.0))

    def _log_points(self, frame: Frame) -> None:
        rr = self.rr
        if frame.points is None or len(frame.points) == 0:
            self.rec.log(f"{LIDAR}/points", rr.Clear(recursive=False))
            return
        pts = frame.points
        self.rec.log(f"{LIDAR}/points", rr.Points3D(
            np.ascontiguousarray(pts[:, :3], dtype=np.float32),
            colors=point_colors(pts, self.options.color_by), radii=-self.options.point_radius))

    def _log_boxes(self, group: str, boxes: np.ndarray | None, names: list[str], scores: np.ndarray | None) -> None:
        rr, rec = self.rr, self.rec
        if boxes is None or len(boxes) == 0:
            # rerun drops empty batches, so an empty frame must clear the previous frame's boxes
            rec.log(f"{LIDAR}/{group}", rr.Clear(recursive=True))
            return
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
        colors = np.array([class_color(n) for n in names], dtype=np.uint8).reshape(-1, 3)
        labels = list(names) if scores is None else [f"{n} {s:.2f}" for n, s in zip(names, scores)]
        rec.log(f"{LIDAR}/{group}/boxes", rr.Boxes3D(
            centers=boxes[:, :3].astype(np.float32), half_sizes=(boxes[:, 3:6] / 2).astype(np.float32),
            quaternions=_yaw_quaternions(boxes[:, 6]), colors=colors, labels=labels))
        vectors = np.zeros((len(boxes), 3), dtype=np.float32)
        vectors[:, :2] = boxes[:, 7:9] * self.options.velocity_seconds
        rec.log(f"{LIDAR}/{group}/velocity", rr.Arrows3D(
            origins=boxes[:, :3].astype(np.float32), vectors=vectors, colors=colors))

    def _log_camera(self, camera) -> None:
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

    def _log_bev(self, group: str, masks: np.ndarray | None, boxes: np.ndarray | None, names: list[str],
                 threshold: float) -> None:
        rr, rec = self.rr, self.rec
        if masks is None:
            rec.log(f"bev/{group}/map", rr.Clear(recursive=False))
        else:
            rec.log(f"bev/{group}/map", rr.Image(bev_map_image(on_bev_grid(masks), self.map_classes, threshold)))
        if boxes is None or len(boxes) == 0:
            rec.log(f"bev/{group}/boxes", rr.Clear(recursive=False))
            return
        colors = np.array([class_color(n) for n in names], dtype=np.uint8).reshape(-1, 3)
        rec.log(f"bev/{group}/boxes", rr.LineStrips2D(list(bev_box_strips(boxes)), colors=colors))


def make_blueprint(camera_names: Iterable[str]):
    """3D view of the world, the two BEV maps beside it, the cameras in a grid below (boxes projected)."""
    import rerun.blueprint as rrb

    names = list(camera_names)
    ordered = [c for c in CAMERA_GRID_ORDER if c in names] + [c for c in names if c not in CAMERA_GRID_ORDER]
    box_entities = [f"/{LIDAR}/{g}/boxes" for g in BOX_GROUPS]
    cameras = [rrb.Spatial2DView(name=c, origin=camera_entity(c), contents=["$origin/**", *box_entities])
               for c in ordered]
    return rrb.Blueprint(
        rrb.Vertical(
            rrb.Horizontal(
                rrb.Spatial3DView(name="3D", origin="world"),
                rrb.Vertical(rrb.Spatial2DView(name="BEV map (GT)", origin="bev/gt"),
                             rrb.Spatial2DView(name="BEV map (predicted)", origin="bev/pred")),
                column_shares=[3, 1],
            ),
            rrb.Grid(*cameras, grid_columns=3),
            row_shares=[3, 2],
        ),
        collapse_panels=False,
    )


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
        rec.save(tmp, default_blueprint=make_blueprint(camera_names))
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

    blueprint = make_blueprint(camera_names)
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

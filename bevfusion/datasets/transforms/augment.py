"""Augmentation and filter transforms (official `type` names), keeping the pipeline contract.

Every transform here keeps the geometry of a sample consistent (see bevfusion.datasets.pipeline):

- image transforms left-multiply `img_aug_matrix[i]`, so that augmented pixel =
  img_aug_matrix[i] @ (u, v, 1, 1) of the original pixel, in continuous pixel coordinates (the
  top-left corner of the image is (0, 0), pixel (i, j) covers [i, i+1) × [j, j+1), as PIL samples);
- LiDAR-frame transforms left-multiply `lidar_aug_matrix`, so that p_augmented = lidar_aug_matrix @
  p_lidar for every point and box centre, whatever ran before.

Randomness comes from `results["rng"]` (a numpy Generator the dataset seeds per sample) or, without
one, from a generator seeded from numpy's global state, so `np.random.seed` makes runs repeatable.
Boxes are (M, 9) in the internal convention (bevfusion.structures.boxes).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from bevfusion.structures.boxes import flip_boxes, limit_period, rotate_boxes, rotation_z, scale_boxes, \
    translate_boxes

__all__ = [
    "ImageAug3D",
    "GlobalRotScaleTrans",
    "RandomFlip3D",
    "PointsRangeFilter",
    "ObjectRangeFilter",
    "ObjectNameFilter",
    "PointShuffle",
    "ImageNormalize",
    "GridMask",
    "sample_rng",
]


def sample_rng(results: dict) -> np.random.Generator:
    """The sample's generator (`results["rng"]`), or one seeded from numpy's global state."""
    rng = results.get("rng")
    if rng is None:
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        results["rng"] = rng
    return rng


def _boxes(results: dict) -> np.ndarray:
    """`results["gt_bboxes_3d"]` as (M, k) float64; an empty one of any shape becomes (0, 9)."""
    boxes = np.asarray(results["gt_bboxes_3d"], np.float64)
    return np.zeros((0, 9)) if boxes.size == 0 else boxes.reshape(-1, boxes.shape[-1])


def _keep_boxes(results: dict, keep: np.ndarray) -> None:
    """Index gt_bboxes_3d, gt_labels_3d and gt_names with the same mask (those present)."""
    for key in ("gt_bboxes_3d", "gt_labels_3d", "gt_names"):
        if key in results:
            results[key] = np.asarray(results[key])[keep]


# ---------------------------------------------------------------------------------------------------
# Images


class ImageAug3D:
    """Resize, bottom-crop, horizontally flip and rotate each camera image; record `img_aug_matrix`.

    Parameters are drawn independently for every camera (as upstream). Train: r ~ U(resize_lim),
    resize to (int(W·r), int(H·r)) with PIL's default filter, crop the rows
    [int((1 - U(bot_pct_lim))·newH) - fH, ...) and the columns [crop_w, crop_w + fW) with
    crop_w = int(U(0, max(0, newW - fW))) (zero padding where the crop leaves the image), flip left-right
    when `rand_flip` and a fair coin says so, rotate by U(rot_lim) degrees counter-clockwise about the
    crop centre (PIL: nearest, no expansion). Test: r = mean(resize_lim), the crop centred horizontally,
    no flip, no rotation.

    The matrix uses the exact per-axis resize factors newW/W and newH/H; upstream writes r, which is
    off by up to one pixel at the far edge when W·r is not an integer (docs/COMPATIBILITY.md). At the
    test setting (0.48 on 1600×900) both are the same.

    Args:
        final_dim: (fH, fW) of the output images.
        resize_lim: (low, high) resize factor range.
        bot_pct_lim: (low, high) fraction of rows cut off at the bottom.
        rot_lim: (low, high) rotation range in degrees.
        rand_flip: allow the random horizontal flip.
        is_train: draw random parameters (else the fixed test transform).
    Input/output: `results["img"]` a list of PIL images (numpy HWC uint8 arrays are converted);
    `results["img_aug_matrix"]` (N, 4, 4) float64 composed with any earlier one.
    """

    def __init__(self, final_dim: Sequence[int], resize_lim: Sequence[float], bot_pct_lim: Sequence[float],
                 rot_lim: Sequence[float], rand_flip: bool, is_train: bool):
        self.final_dim = (int(final_dim[0]), int(final_dim[1]))
        self.resize_lim = tuple(float(v) for v in resize_lim)
        self.bot_pct_lim = tuple(float(v) for v in bot_pct_lim)
        self.rot_lim = tuple(float(v) for v in rot_lim)
        self.rand_flip = bool(rand_flip)
        self.is_train = bool(is_train)

    def sample_augmentation(self, size: tuple[int, int], rng: np.random.Generator
                            ) -> tuple[float, tuple[int, int], tuple[int, int, int, int], bool, float]:
        """(resize, (newW, newH), crop (x0, y0, x1, y1), flip, rotate degrees) for an image of (W, H)."""
        W, H = size
        fH, fW = self.final_dim
        if self.is_train:
            resize = float(rng.uniform(*self.resize_lim))
            newW, newH = int(W * resize), int(H * resize)
            crop_h = int((1 - rng.uniform(*self.bot_pct_lim)) * newH) - fH
            crop_w = int(rng.uniform(0, max(0, newW - fW)))
            flip = bool(self.rand_flip and rng.integers(0, 2))
            rotate = float(rng.uniform(*self.rot_lim))
        else:
            resize = float(np.mean(self.resize_lim))
            newW, newH = int(W * resize), int(H * resize)
            crop_h = int((1 - np.mean(self.bot_pct_lim)) * newH) - fH
            crop_w = int(max(0, newW - fW) / 2)
            flip, rotate = False, 0.0
        return resize, (newW, newH), (crop_w, crop_h, crop_w + fW, crop_h + fH), flip, rotate

    @staticmethod
    def aug_matrix(size: tuple[int, int], resize_dims: tuple[int, int], crop: Sequence[int], flip: bool,
                   rotate: float) -> np.ndarray:
        """4×4 map from original to augmented pixel coordinates for one image."""
        W, H = size
        newW, newH = resize_dims
        crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
        M = np.diag([newW / W, newH / H, 1.0])  # 3×3 homogeneous 2D
        M = np.array([[1.0, 0, -crop[0]], [0, 1, -crop[1]], [0, 0, 1]]) @ M
        if flip:
            M = np.array([[-1.0, 0, crop_w], [0, 1, 0], [0, 0, 1]]) @ M
        theta = np.deg2rad(rotate)
        c, s = np.cos(theta), np.sin(theta)
        A = np.array([[c, s], [-s, c]])  # counter-clockwise on screen (y points down)
        centre = np.array([crop_w, crop_h]) / 2
        R = np.eye(3)
        R[:2, :2] = A
        R[:2, 2] = centre - A @ centre
        M = R @ M
        out = np.eye(4)
        out[:2, :2] = M[:2, :2]
        out[:2, 3] = M[:2, 2]
        return out

    def __call__(self, results: dict) -> dict:
        from PIL import Image

        rng = sample_rng(results)
        images = results["img"]
        new_images, mats = [], []
        for img in images:
            if not isinstance(img, Image.Image):
                img = Image.fromarray(np.asarray(img))
            resize, dims, crop, flip, rotate = self.sample_augmentation(img.size, rng)
            mats.append(self.aug_matrix(img.size, dims, crop, flip, rotate))
            img = img.resize(dims).crop(crop)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if rotate != 0.0:
                img = img.rotate(rotate)
            new_images.append(img)
        previous = results.get("img_aug_matrix")
        if previous is None or len(previous) != len(mats):
            previous = np.tile(np.eye(4), (len(mats), 1, 1))
        results["img"] = new_images
        results["img_aug_matrix"] = np.stack(mats).reshape(-1, 4, 4) @ np.asarray(previous, dtype=np.float64)
        return results

    def __repr__(self) -> str:
        return (f"ImageAug3D(final_dim={self.final_dim}, resize_lim={self.resize_lim}, "
                f"bot_pct_lim={self.bot_pct_lim}, rot_lim={self.rot_lim}, rand_flip={self.rand_flip}, "
                f"is_train={self.is_train})")


class ImageNormalize:
    """RGB images → float32 tensor (N, 3, H, W): (pixel / 255 - mean) / std per channel.

    Accepts a list of PIL images or HWC uint8 arrays (as torchvision's ToTensor + Normalize, which
    upstream uses); float arrays are taken as already in [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def __call__(self, results: dict) -> dict:
        import torch

        arrays = []
        for img in results["img"]:
            a = np.asarray(img)
            a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
            arrays.append(a)
        if arrays:
            x = np.stack(arrays).transpose(0, 3, 1, 2)  # (N, 3, H, W)
        else:
            x = np.zeros((0, 3, 0, 0), np.float32)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        results["img"] = torch.from_numpy(np.ascontiguousarray((x - mean) / std, dtype=np.float32))
        results["img_norm_cfg"] = {"mean": self.mean, "std": self.std}
        return results

    def __repr__(self) -> str:
        return f"ImageNormalize(mean={self.mean}, std={self.std})"


class GridMask:
    """Zero a grid of stripes in every camera image (one mask shared by the cameras, as upstream).

    With probability `prob` a mask is drawn: period d ~ U{2, ..., min(H, W) - 1}, stripe width
    l = min(max(int(d·ratio + 0.5), 1), d - 1) (or l ~ U{1, ..., d - 1} when ratio == 1), random offsets
    in [0, d), horizontal stripes when `use_h`, vertical ones when `use_w`, on a 1.5× canvas rotated by
    U{0, ..., rotate - 1} degrees and centre-cropped. `mode` 1 inverts the mask (keeps the stripes).
    `offset` fills the masked pixels with U(-1, 1) noise instead of 0. Unless `fixed_prob`,
    `set_epoch(e)` sets prob = initial prob · e / max_epoch.

    Upstream reads H and W from `img[0].shape[:2]`, but at this point of the pipeline the images are
    already a (N, 3, H, W) tensor, so it reads (3, H) and builds a wrong-sized mask. Here H and W come
    from the last two axes of a tensor/array of CHW images (a (N, 3, H, W) tensor or a list of (3, H, W)
    tensors), or from PIL images / HWC arrays (docs/COMPATIBILITY.md). With prob 0 (every official
    config) it does nothing.
    """

    def __init__(self, use_h: bool, use_w: bool, max_epoch: int, rotate: int = 1, offset: bool = False,
                 ratio: float = 0.5, mode: int = 0, prob: float = 1.0, fixed_prob: bool = False):
        self.use_h, self.use_w = bool(use_h), bool(use_w)
        self.max_epoch = max_epoch
        self.rotate = int(rotate)
        self.offset = bool(offset)
        self.ratio = float(ratio)
        self.mode = int(mode)
        self.st_prob = self.prob = float(prob)
        self.fixed_prob = bool(fixed_prob)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if not self.fixed_prob:
            self.prob = self.st_prob * epoch / self.max_epoch

    def make_mask(self, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
        """(h, w) float32 mask (1 keeps a pixel) and the drawn parameters d, l, st_h, st_w, r."""
        from PIL import Image

        hh, ww = int(1.5 * h), int(1.5 * w)
        d = int(rng.integers(2, max(min(h, w), 3)))
        if self.ratio == 1:
            length = int(rng.integers(1, d))
        else:
            length = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        mask = np.ones((hh, ww), np.float32)
        st_h, st_w = int(rng.integers(d)), int(rng.integers(d))
        if self.use_h:
            for i in range(hh // d):
                s = d * i + st_h
                mask[s:min(s + length, hh), :] = 0
        if self.use_w:
            for i in range(ww // d):
                s = d * i + st_w
                mask[:, s:min(s + length, ww)] = 0
        r = int(rng.integers(max(self.rotate, 1)))
        if r:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).rotate(r), dtype=np.float32)
        top, left = (hh - h) // 2, (ww - w) // 2
        mask = np.ascontiguousarray(mask[top:top + h, left:left + w])
        if self.mode == 1:
            mask = 1 - mask
        return mask, {"d": d, "l": length, "st_h": st_h, "st_w": st_w, "r": r}

    def __call__(self, results: dict) -> dict:
        import torch

        if self.prob <= 0:
            return results
        rng = sample_rng(results)
        if rng.random() > self.prob:
            return results
        imgs = results["img"]
        chw = isinstance(imgs, torch.Tensor) or (len(imgs) > 0 and isinstance(imgs[0], torch.Tensor))
        if len(imgs) == 0:
            return results
        first = np.asarray(imgs[0]) if not chw else imgs[0]
        h, w = (first.shape[-2], first.shape[-1]) if chw else (first.shape[0], first.shape[1])
        mask, _ = self.make_mask(h, w, rng)
        noise = (2 * (rng.random((h, w)) - 0.5)).astype(np.float32) if self.offset else None
        if chw:
            m = torch.from_numpy(mask)
            off = torch.from_numpy((1 - mask) * noise) if noise is not None else None
            out = [x * m.to(x.dtype) + (off.to(x.dtype) if off is not None else 0) for x in imgs]
            results["img"] = torch.stack(out) if isinstance(imgs, torch.Tensor) else out
        else:
            from PIL import Image

            out = []
            for img in imgs:
                a = np.asarray(img)
                m = mask if a.ndim == 2 else mask[:, :, None]
                o = 0 if noise is None else ((1 - mask) * noise if a.ndim == 2 else ((1 - mask) * noise)[:, :, None])
                b = a.astype(np.float32) * m + o
                if isinstance(img, Image.Image):
                    out.append(Image.fromarray(np.clip(b, 0, 255).astype(np.uint8)))
                else:
                    out.append(b.astype(a.dtype) if a.dtype != np.uint8 else np.clip(b, 0, 255).astype(np.uint8))
            results["img"] = out
        return results

    def __repr__(self) -> str:
        return (f"GridMask(use_h={self.use_h}, use_w={self.use_w}, rotate={self.rotate}, ratio={self.ratio}, "
                f"mode={self.mode}, prob={self.prob}, fixed_prob={self.fixed_prob})")


# ---------------------------------------------------------------------------------------------------
# LiDAR frame


class GlobalRotScaleTrans:
    """Rotate, translate and scale points and boxes about the LiDAR origin (train), then record it.

    θ ~ U(rot_lim) rad, t ~ N(0, trans_lim²) on x, y and z, s ~ U(resize_lim); every point and box
    centre p becomes s·(R p + t), with R the rotation by θ **clockwise** about +z (upstream's box
    `rotate(θ)`, which adds θ to its yaw; in our convention the yaw decreases by θ). Box sizes and
    velocities are scaled by s, velocities rotated. `lidar_aug_matrix` becomes [[s·R, s·t], [0, 1]] @
    the previous one. With `is_train` false nothing changes (upstream writes the identity).

    Args:
        resize_lim: (low, high) scale range.
        rot_lim: (low, high) angle range in radians.
        trans_lim: standard deviation of the translation in metres.
        is_train: apply the random transform.
    """

    def __init__(self, resize_lim: Sequence[float], rot_lim: Sequence[float], trans_lim: float, is_train: bool):
        self.resize_lim = tuple(float(v) for v in resize_lim)
        self.rot_lim = tuple(float(v) for v in rot_lim)
        self.trans_lim = float(trans_lim)
        self.is_train = bool(is_train)

    def __call__(self, results: dict) -> dict:
        if "lidar_aug_matrix" not in results:
            results["lidar_aug_matrix"] = np.eye(4)
        if not self.is_train:
            return results
        rng = sample_rng(results)
        scale = float(rng.uniform(*self.resize_lim))
        theta = float(rng.uniform(*self.rot_lim))
        translation = rng.normal(0.0, self.trans_lim, size=3) if self.trans_lim > 0 else np.zeros(3)
        R = rotation_z(-theta)
        if "points" in results:
            points = np.asarray(results["points"])
            xyz = points[:, :3].astype(np.float64)
            out = points.copy()
            out[:, :3] = (scale * (xyz @ R.T + translation)).astype(points.dtype)
            results["points"] = out
        if "gt_bboxes_3d" in results:
            boxes = rotate_boxes(_boxes(results), -theta)
            results["gt_bboxes_3d"] = scale_boxes(translate_boxes(boxes, translation), scale)
        T = np.eye(4)
        T[:3, :3] = scale * R
        T[:3, 3] = scale * translation
        results["lidar_aug_matrix"] = T @ np.asarray(results["lidar_aug_matrix"], np.float64)
        return results

    def __repr__(self) -> str:
        return (f"GlobalRotScaleTrans(resize_lim={self.resize_lim}, rot_lim={self.rot_lim}, "
                f"trans_lim={self.trans_lim}, is_train={self.is_train})")


class RandomFlip3D:
    """Independent y-flip (y → -y) and x-flip (x → -x), each with probability 0.5 (train only).

    Flips points, boxes (yaw, velocity) and `gt_masks_bev` ([C, X, Y]: the y-flip reverses the last
    axis, the x-flip the middle one), and left-multiplies `lidar_aug_matrix` by the flip.
    """

    def __call__(self, results: dict) -> dict:
        rng = sample_rng(results)
        flip_y = bool(rng.integers(0, 2))
        flip_x = bool(rng.integers(0, 2))
        return self.apply(results, flip_y, flip_x)

    @staticmethod
    def apply(results: dict, flip_y: bool, flip_x: bool) -> dict:
        """Apply the given flips (the y-flip first, as upstream; they commute)."""
        F = np.eye(4)
        for flip, axis, col in ((flip_y, "y", 1), (flip_x, "x", 0)):
            if not flip:
                continue
            F[col, col] *= -1
            if "points" in results:
                points = np.array(results["points"], copy=True)
                points[:, col] *= -1
                results["points"] = points
            if "gt_bboxes_3d" in results:
                results["gt_bboxes_3d"] = flip_boxes(_boxes(results), axis)
            if results.get("gt_masks_bev") is not None:
                masks = np.asarray(results["gt_masks_bev"])
                masks = masks[:, :, ::-1] if axis == "y" else masks[:, ::-1, :]
                results["gt_masks_bev"] = np.ascontiguousarray(masks)
        results["lidar_aug_matrix"] = F @ np.asarray(results.get("lidar_aug_matrix", np.eye(4)), np.float64)
        return results

    def __repr__(self) -> str:
        return "RandomFlip3D()"


class PointsRangeFilter:
    """Keep points strictly inside point_cloud_range (x_min, y_min, z_min, x_max, y_max, z_max)."""

    def __init__(self, point_cloud_range: Sequence[float]):
        self.pcd_range = np.asarray(point_cloud_range, dtype=np.float64)

    def __call__(self, results: dict) -> dict:
        points = np.asarray(results["points"])
        lo, hi = self.pcd_range[:3], self.pcd_range[3:]
        xyz = points[:, :3]
        keep = np.all((xyz > lo) & (xyz < hi), axis=1)
        results["points"] = points[keep]
        return results

    def __repr__(self) -> str:
        return f"PointsRangeFilter(point_cloud_range={self.pcd_range.tolist()})"


class ObjectRangeFilter:
    """Keep boxes whose centre is strictly inside the x–y part of point_cloud_range; wrap yaw to [-π, π)."""

    def __init__(self, point_cloud_range: Sequence[float]):
        self.pcd_range = np.asarray(point_cloud_range, dtype=np.float64)

    def __call__(self, results: dict) -> dict:
        boxes = _boxes(results)
        results["gt_bboxes_3d"] = boxes
        r = self.pcd_range
        keep = (boxes[:, 0] > r[0]) & (boxes[:, 1] > r[1]) & (boxes[:, 0] < r[3]) & (boxes[:, 1] < r[4])
        _keep_boxes(results, keep)
        boxes = np.array(results["gt_bboxes_3d"], np.float64, copy=True)
        boxes[:, 6] = limit_period(boxes[:, 6], 0.5, 2 * np.pi)
        results["gt_bboxes_3d"] = boxes
        return results

    def __repr__(self) -> str:
        return f"ObjectRangeFilter(point_cloud_range={self.pcd_range.tolist()})"


class ObjectNameFilter:
    """Keep boxes whose label is one of the classes (0 ≤ label < len(classes)); drops -1 labels."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    def __call__(self, results: dict) -> dict:
        labels = np.asarray(results["gt_labels_3d"])
        _keep_boxes(results, (labels >= 0) & (labels < len(self.classes)))
        return results

    def __repr__(self) -> str:
        return f"ObjectNameFilter(classes={self.classes})"


class PointShuffle:
    """Shuffle the order of the points."""

    def __call__(self, results: dict) -> dict:
        points = np.asarray(results["points"])
        results["points"] = points[sample_rng(results).permutation(len(points))]
        return results

    def __repr__(self) -> str:
        return "PointShuffle()"

"""Camera → BEV view transforms (Lift-Splat-Shoot): `LSSTransform` and `DepthLSSTransform`.

Each image feature pixel is lifted to D depth samples along its camera ray (the frustum), each
sample's feature is the depth probability × the pixel feature, and the samples are summed into BEV
cells with `bevfusion.ops.bev_pool`. Geometry follows the official code (facts §3): the frustum holds
(u, v, d) in augmented-image pixels; the image augmentation is undone, points are lifted with K⁻¹ and
moved by camera2lidar, then by the LiDAR augmentation.

Parameter names match the official checkpoints (`dx`, `bx`, `nx`, `frustum`, `depthnet`, `dtransform`,
`downsample`). In eval mode the pooling plan (ranks, sort, intervals) is cached and reused while the
geometry inputs stay the same, so a fixed rig does no sort per frame.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from bevfusion.ops.bev_pool import bev_pool_plan, bev_pool_with_plan, grid_from_bounds, lift_bev_pool, \
    points_to_bev_coords

__all__ = ["BaseTransform", "LSSTransform", "DepthLSSTransform"]


def _fp32_geometry(fn):
    """Run `fn` with autocast off, as upstream's `force_fp32`: under fp16 autocast its matmuls would round
    frustum points and LiDAR projections to fp16 (0.03 m at 50 m), moving them across BEV cells and pixels."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class BaseTransform(nn.Module):
    """Frustum, geometry and pooling shared by the LSS variants.

    Args:
        in_channels: image feature channels (neck output).
        out_channels: BEV feature channels C.
        image_size: (H, W) of the network input images.
        feature_size: (fH, fW) of the image features.
        xbound, ybound, zbound: (lower, upper, step) of the BEV grid in metres.
        dbound: (first, end, step) of the depth samples (arange: 1.0, 1.5, ... for [1, 60, 0.5]).
        downsample: stride of the BEV output convs (1: none; 2: conv, strided conv, conv, each with BN, ReLU).
        fused_lift: pool with the fused lift+pool op, which never materialises the
            (B, N, D, fH, fW, C) frustum features (same result).
    """

    def __init__(self, in_channels: int, out_channels: int, image_size: Sequence[int],
                 feature_size: Sequence[int], xbound: Sequence[float], ybound: Sequence[float],
                 zbound: Sequence[float], dbound: Sequence[float], downsample: int = 1, fused_lift: bool = True):
        super().__init__()
        self.in_channels, self.C = in_channels, out_channels
        self.image_size, self.feature_size = tuple(image_size), tuple(feature_size)
        self.xbound, self.ybound, self.zbound, self.dbound = xbound, ybound, zbound, dbound
        self.fused_lift = fused_lift
        dx, bx_lower, nx = grid_from_bounds(xbound, ybound, zbound)
        self.dx = nn.Parameter(dx, requires_grad=False)
        self.bx = nn.Parameter(bx_lower + dx / 2, requires_grad=False)
        self.nx = nn.Parameter(torch.tensor(nx, dtype=torch.int64), requires_grad=False)
        self.frustum = nn.Parameter(self.create_frustum(), requires_grad=False)
        self.D = self.frustum.shape[0]
        self._plan_cache: tuple[torch.Tensor, object] | None = None
        self.build_depthnet()  # the subclass's layers, registered before `downsample` (the official order)
        self.downsample = _make_downsample(out_channels, downsample)

    def build_depthnet(self) -> None:
        """Create the layers that predict depth and features (`depthnet`, ...); see the subclasses."""
        raise NotImplementedError

    def create_frustum(self) -> torch.Tensor:
        """(D, fH, fW, 3) of (u, v, d): pixel samples spread from the first to the last pixel."""
        iH, iW = self.image_size
        fH, fW = self.feature_size
        ds = torch.arange(*self.dbound, dtype=torch.float32).view(-1, 1, 1).expand(-1, fH, fW)
        D = ds.shape[0]
        xs = torch.linspace(0, iW - 1, fW, dtype=torch.float32).view(1, 1, fW).expand(D, fH, fW)
        ys = torch.linspace(0, iH - 1, fH, dtype=torch.float32).view(1, fH, 1).expand(D, fH, fW)
        return torch.stack((xs, ys, ds), -1)

    @_fp32_geometry
    def get_geometry(self, camera2lidar: torch.Tensor, camera_intrinsics: torch.Tensor,
                     img_aug_matrix: torch.Tensor, lidar_aug_matrix: torch.Tensor) -> torch.Tensor:
        """Frustum points in the augmented LiDAR frame: (B, N, D, fH, fW, 3), float32."""
        B, N = camera2lidar.shape[:2]
        f32 = lambda t: t.float()  # noqa: E731  (fp16/bf16 inputs; autocast is off here)
        post_rots, post_trans = f32(img_aug_matrix[..., :3, :3]), f32(img_aug_matrix[..., :3, 3])
        points = self.frustum.float() - post_trans.view(B, N, 1, 1, 1, 3)
        points = torch.linalg.inv(post_rots).view(B, N, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)
        points = torch.cat((points[..., :2] * points[..., 2:3], points[..., 2:3]), -1)
        combine = f32(camera2lidar[..., :3, :3]).matmul(torch.linalg.inv(f32(camera_intrinsics[..., :3, :3])))
        points = combine.view(B, N, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)
        points = points + f32(camera2lidar[..., :3, 3]).view(B, N, 1, 1, 1, 3)
        extra_rots, extra_trans = f32(lidar_aug_matrix[..., :3, :3]), f32(lidar_aug_matrix[..., :3, 3])
        points = extra_rots.view(B, 1, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)
        return points + extra_trans.view(B, 1, 1, 1, 1, 3)

    def _plan(self, geometry_inputs: torch.Tensor, geom_fn, batch_size: int):
        """The pooling plan; cached in eval mode while the geometry inputs are unchanged."""
        cached = self._plan_cache
        if not self.training and cached is not None and cached[0].shape == geometry_inputs.shape \
                and cached[0].device == geometry_inputs.device and torch.equal(cached[0], geometry_inputs):
            return cached[1]
        geom = geom_fn()
        nx = [int(v) for v in self.nx.tolist()]
        coords = points_to_bev_coords(geom, self.dx, self.bx - self.dx / 2, nx)
        plan = bev_pool_plan(coords, batch_size, (nx[2], nx[0], nx[1]))
        if not self.training:
            self._plan_cache = (geometry_inputs.detach().clone(), plan)
        return plan

    def pool(self, depth: torch.Tensor, feats: torch.Tensor, camera2lidar, camera_intrinsics, img_aug_matrix,
             lidar_aug_matrix) -> torch.Tensor:
        """depth (B·N, D, fH, fW) probabilities, feats (B·N, C, fH, fW) → BEV (B, C·Z, X, Y)."""
        B, N = camera2lidar.shape[:2]
        key = torch.cat([t.reshape(B, -1).float() for t in (camera2lidar, camera_intrinsics, img_aug_matrix,
                                                            lidar_aug_matrix)], 1)
        plan = self._plan(key, lambda: self.get_geometry(camera2lidar, camera_intrinsics, img_aug_matrix,
                                                          lidar_aug_matrix), B)
        depth, feats = depth.float(), feats.float()  # the lift and pooling run in fp32, as upstream
        if self.fused_lift:
            out = lift_bev_pool(depth, feats.permute(0, 2, 3, 1), plan=plan)
        else:
            lifted = depth.unsqueeze(-1) * feats.permute(0, 2, 3, 1).unsqueeze(1)  # (BN, D, fH, fW, C)
            out = bev_pool_with_plan(lifted.reshape(-1, self.C), plan)
        # (B, C, Z, X, Y) → Z slices concatenated on channels: (B, C·Z, X, Y)
        return torch.cat(out.unbind(dim=2), 1).contiguous()


class LSSTransform(BaseTransform):
    """Plain LSS: a 1×1 depthnet predicts D depth logits and C features per pixel (official
    `LSSTransform`; it takes the same arguments as DepthLSSTransform, so the official LSS configs,
    which crash upstream on an extra argument, run here)."""

    def build_depthnet(self) -> None:
        self.depthnet = nn.Conv2d(self.in_channels, self.D + self.C, 1)

    def get_cam_feats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, Cin, fH, fW) → depth probabilities (B·N, D, fH, fW), features (B·N, C, fH, fW)."""
        B, N, C, fH, fW = x.shape
        x = self.depthnet(x.reshape(B * N, C, fH, fW))
        return x[:, :self.D].float().softmax(dim=1), x[:, self.D:self.D + self.C]

    def forward(self, img, points, camera2ego, lidar2ego, lidar2camera, lidar2image, camera_intrinsics,
                camera2lidar, img_aug_matrix, lidar_aug_matrix, metas=None) -> torch.Tensor:
        depth, feats = self.get_cam_feats(img)
        x = self.pool(depth, feats, camera2lidar, camera_intrinsics, img_aug_matrix, lidar_aug_matrix)
        return self.downsample(x)


class DepthLSSTransform(BaseTransform):
    """LSS with a sparse LiDAR depth image as extra input (official `DepthLSSTransform`).

    The depth image holds, per pixel of the augmented image, the camera-frame depth of a LiDAR point
    projecting there. Where several points land on one pixel, the nearest one is kept (upstream keeps
    the last written, which is not deterministic on GPU), and points behind the camera are dropped.
    """

    def build_depthnet(self) -> None:
        in_channels = self.in_channels
        self.dtransform = nn.Sequential(
            nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.ReLU(True),
            nn.Conv2d(8, 32, 5, stride=4, padding=2), nn.BatchNorm2d(32), nn.ReLU(True),
            nn.Conv2d(32, 64, 5, stride=2, padding=2), nn.BatchNorm2d(64), nn.ReLU(True),
        )
        self.depthnet = nn.Sequential(
            nn.Conv2d(in_channels + 64, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU(True),
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.BatchNorm2d(in_channels), nn.ReLU(True),
            nn.Conv2d(in_channels, self.D + self.C, 1),
        )

    @_fp32_geometry
    def depth_image(self, points: Sequence[torch.Tensor], lidar2image: torch.Tensor, img_aug_matrix: torch.Tensor,
                    lidar_aug_matrix: torch.Tensor) -> torch.Tensor:
        """(B, N, 1, H, W) sparse depth from the (augmented-frame) points; 0 where no point lands."""
        B, N = lidar2image.shape[:2]
        iH, iW = self.image_size
        depth = lidar2image.new_zeros(B, N, iH * iW, dtype=torch.float32)
        for b in range(B):
            xyz = points[b][:, :3].float()
            # Undo the LiDAR augmentation (without touching the caller's tensor).
            xyz = (xyz - lidar_aug_matrix[b, :3, 3].float()) @ torch.linalg.inv(lidar_aug_matrix[b, :3, :3].float()).T
            cam = torch.einsum("nij,pj->npi", lidar2image[b, :, :3, :3].float(), xyz) + \
                lidar2image[b, :, None, :3, 3].float()  # (N, P, 3)
            dist = cam[..., 2]
            uv = cam[..., :2] / cam[..., 2:3].clamp(1e-5, 1e5)
            aug = img_aug_matrix[b].float()
            uv1 = torch.cat([uv, torch.ones_like(dist)[..., None]], -1)
            uv = torch.einsum("nij,npj->npi", aug[:, :3, :3], uv1)[..., :2] + aug[:, None, :2, 3]
            row, col = uv[..., 1], uv[..., 0]
            on = (row >= 0) & (row < iH) & (col >= 0) & (col < iW) & (dist > 0)
            cam_idx = torch.arange(N, device=xyz.device)[:, None].expand_as(dist)[on]
            pix = row[on].long() * iW + col[on].long()
            nearest = torch.full((N * iH * iW,), float("inf"), device=xyz.device)
            nearest.scatter_reduce_(0, cam_idx * iH * iW + pix, dist[on], reduce="amin")
            depth[b] = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest).view(N, iH * iW)
        return depth.view(B, N, 1, iH, iW)

    def get_cam_feats(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C, fH, fW = x.shape
        d = self.dtransform(d.reshape(B * N, *d.shape[2:]).to(x.dtype))
        x = self.depthnet(torch.cat([d, x.reshape(B * N, C, fH, fW)], dim=1))
        return x[:, :self.D].float().softmax(dim=1), x[:, self.D:self.D + self.C]

    def forward(self, img, points, camera2ego, lidar2ego, lidar2camera, lidar2image, camera_intrinsics,
                camera2lidar, img_aug_matrix, lidar_aug_matrix, metas=None) -> torch.Tensor:
        d = self.depth_image(points, lidar2image, img_aug_matrix, lidar_aug_matrix)
        depth, feats = self.get_cam_feats(img, d)
        x = self.pool(depth, feats, camera2lidar, camera_intrinsics, img_aug_matrix, lidar_aug_matrix)
        return self.downsample(x)


def _make_downsample(channels: int, downsample: int) -> nn.Module:
    if downsample == 1:
        return nn.Identity()
    return nn.Sequential(*_conv_bn_relu(channels, channels), *_conv_bn_relu(channels, channels, downsample),
                         *_conv_bn_relu(channels, channels))

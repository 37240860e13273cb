"""What must stay in fp32 under fp16 / bf16 autocast (as upstream's force_fp32 and fp32 position tensors), checked
on the CPU: the LSS frustum geometry and the LiDAR depth image (their matmuls would otherwise round metric points
to half precision and move them across BEV cells and pixels), and TransFusion's query positions (a centre of a
180-cell grid would be rounded to 1/8 cell). The whole model under fp16 autocast on CUDA: tests/gpu."""
from __future__ import annotations

import pytest
import torch

from bevfusion.models.camera.vtransforms import DepthLSSTransform
from bevfusion.models.heads.transfusion import TransFusionHead

from test_vtransforms import _rig, _small_lss

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
def test_geometry_and_depth_image_ignore_autocast(dtype):
    vt = _small_lss(DepthLSSTransform, xbound=[-60.0, 60.0, 1.0], ybound=[-60.0, 60.0, 1.0], dbound=[1.0, 60.0, 1.0])
    rig = _rig(B=2, image_size=vt.image_size, seed=3)
    args = (rig["camera2lidar"], rig["camera_intrinsics"], rig["img_aug_matrix"], rig["lidar_aug_matrix"])
    gen = torch.Generator().manual_seed(4)
    points = [torch.cat([torch.randn(3000, 3, generator=gen) * torch.tensor([30.0, 30.0, 1.0]),
                         torch.rand(3000, 2, generator=gen)], 1) for _ in range(2)]
    depth_args = (points, rig["lidar2image"], rig["img_aug_matrix"], rig["lidar_aug_matrix"])
    geom, depth = vt.get_geometry(*args), vt.depth_image(*depth_args)
    with torch.autocast("cpu", dtype=dtype):
        geom_amp, depth_amp = vt.get_geometry(*args), vt.depth_image(*depth_args)
    assert geom_amp.dtype == depth_amp.dtype == torch.float32
    assert geom.abs().max() > 50 and (depth > 0).sum() > 1000  # far points and many projected ones
    assert torch.equal(geom_amp, geom) and torch.equal(depth_amp, depth)


@pytest.mark.parametrize("dtype", HALF)
def test_transfusion_query_positions_stay_fp32_under_autocast(dtype):
    """A head on a 180 x 180 grid whose centre branch predicts a constant offset of 0.3 cells: every centre is
    its cell centre (x + 0.5, y + 0.5) plus 0.3, to fp32 precision, also under autocast."""
    torch.manual_seed(0)
    head = TransFusionHead(num_proposals=100, in_channels=16, hidden_channel=32, num_classes=10,
                           num_decoder_layers=1, num_heads=2, ffn_channel=32, nms_kernel_size=3,
                           test_cfg={"dataset": "nuScenes", "grid_size": [1440, 1440, 41], "out_size_factor": 8},
                           bbox_coder={"type": "TransFusionBBoxCoder", "pc_range": [-54.0, -54.0],
                                       "out_size_factor": 8, "voxel_size": [0.075, 0.075], "code_size": 10}).eval()
    last = head.prediction_heads[0].center[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(0.3)
        x = torch.randn(1, 16, 180, 180)
        with torch.autocast("cpu", dtype=dtype):
            centre = head(x)["center"].float()
    assert centre.shape == (1, 2, 100) and centre.max() > 100  # cells where fp16 steps are 1/16 to 1/8
    offset = centre - 0.8  # minus the 0.5 of the cell centre and the predicted 0.3: integers
    assert (offset - offset.round()).abs().max() < 2e-3  # 0.3 in the conv's half precision: 1e-4 off

"""The fused model runs with a sensor missing: `camera_mask` zeroes the features of dropped views (they add
nothing to the BEV grid), and an empty point cloud gives an all-zero LiDAR BEV map."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures" / "whole_model"))
import cases  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    cfg = cases.case_config("transfusion")
    blob = cases.load("transfusion")
    model = cases.build(cfg)
    cases.fill_parameters(model)
    model.load_state_dict(blob["buffers"], strict=False)
    return model.eval(), blob["batch"]


def _camera_bev(model, batch, img, mask):
    from bevfusion.models.bevfusion import CAMERA_GEOMETRY

    with torch.no_grad():
        return model.encoders["camera"](img, batch["points"], batch["metas"], camera_mask=mask,
                                        **{k: batch[k] for k in CAMERA_GEOMETRY})


def test_masked_views_add_nothing(setup):
    model, batch = setup
    img = batch["img"]
    B, N = img.shape[:2]
    other = img.clone()
    other[:, 2] = torch.randn_like(other[:, 2])  # a different image in view 2 only
    mask = torch.ones(B, N, dtype=torch.bool)
    # control: without the mask, view 2's image changes the camera BEV features
    assert not torch.allclose(_camera_bev(model, batch, img, mask), _camera_bev(model, batch, other, mask))
    mask[:, 2] = False
    torch.testing.assert_close(_camera_bev(model, batch, img, mask), _camera_bev(model, batch, other, mask),
                               rtol=0, atol=0)
    # all views masked: equal to the output for all-zero neck features, whatever the images
    none = torch.zeros(B, N, dtype=torch.bool)
    noise = torch.randn_like(img)
    torch.testing.assert_close(_camera_bev(model, batch, img, none), _camera_bev(model, batch, noise, none),
                               rtol=0, atol=0)


def test_camera_mask_shape_is_checked(setup):
    model, batch = setup
    with pytest.raises(ValueError, match=r"camera_mask must be \(B, N\)"):
        _camera_bev(model, batch, batch["img"], torch.ones(1, 3, dtype=torch.bool))


def test_empty_point_cloud_gives_zero_lidar_features(setup):
    model, batch = setup
    empty = [p[:0] for p in batch["points"]]
    with torch.no_grad():
        bev = model.encoders["lidar"](empty)
        full = model.encoders["lidar"](batch["points"])
    assert bev.shape == full.shape and full.abs().sum() > 0
    assert torch.count_nonzero(bev) == 0
    with torch.no_grad():
        preds = model({**batch, "points": empty, "camera_mask": torch.zeros(2, 6, dtype=torch.bool)})
    assert len(preds) == 2
    for p in preds:
        assert torch.isfinite(p["boxes_3d"]).all() and torch.isfinite(p["masks_bev"]).all()

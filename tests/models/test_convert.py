"""Official checkpoint conversion: spconv-1/2 layouts, DDP prefixes, safe loading, key reports."""
from __future__ import annotations

import os

import pytest
import torch

from bevfusion.models.convert import load_converted, read_checkpoint
from bevfusion.models.lidar.sparse_encoder import SparseEncoder
from bevfusion.ops.sparse.convert import to_spconv1, to_spconv2

CFG = dict(in_channels=5, sparse_shape=[64, 64, 41], output_channels=32,
           encoder_channels=[[16, 16, 32], [32, 32]], encoder_paddings=[[0, 0, 1], [0, 0]],
           block_type="basicblock")


def _official_state(model, layout):
    """What an official checkpoint holds: sparse weights in spconv's 5-D layout."""
    from bevfusion.models.convert import _sparse_convs

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for key, conv in _sparse_convs(model).items():
        sd[key] = (to_spconv1 if layout == 1 else to_spconv2)(sd[key], conv.kernel_size)
    return sd


@pytest.mark.parametrize("layout", [1, 2])
def test_round_trip_through_official_layouts(tmp_path, layout):
    torch.manual_seed(0)
    src = SparseEncoder(**CFG)
    for p in src.parameters():
        p.data.normal_()
    sd = _official_state(src, layout)
    assert sd["conv_input.0.weight"].shape == ((3, 3, 3, 5, 16) if layout == 1 else (16, 3, 3, 3, 5))
    path = tmp_path / "official.pth"
    torch.save({"meta": {"mmcv_version": "1.4.0", "CLASSES": ("car",)},
                "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    dst = SparseEncoder(**CFG)
    report = load_converted(dst, read_checkpoint(path)["state_dict"])
    assert report.clean
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_mismatches_are_listed(tmp_path):
    model = SparseEncoder(**CFG)
    sd = _official_state(model, 1)
    del sd["conv_out.1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing: conv_out.1.weight; unexpected: extra.weight"):
        load_converted(SparseEncoder(**CFG), sd)
    report = load_converted(SparseEncoder(**CFG), sd, strict=False)
    assert report.missing == ["conv_out.1.weight"] and report.unexpected == ["extra.weight"]
    bad = _official_state(model, 1)
    bad["conv_input.0.weight"] = torch.zeros(3, 3, 3, 4, 16)
    with pytest.raises(ValueError, match=r"conv_input.0.weight: sparse conv weight of shape"):
        load_converted(SparseEncoder(**CFG), bad)


def test_unsafe_checkpoints_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "none.pth")

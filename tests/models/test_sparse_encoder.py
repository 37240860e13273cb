"""SparseEncoder: official key set and shapes (facts §2.4), output shape at official resolution."""
from __future__ import annotations

import torch

from bevfusion.models.lidar.sparse_encoder import SparseEncoder

OFFICIAL = dict(  # nuScenes 0.075 m fusion/LiDAR det config (facts §1.6.1)
    in_channels=5, sparse_shape=[1440, 1440, 41], output_channels=128, order=["conv", "norm", "act"],
    encoder_channels=[[16, 16, 32], [32, 32, 64], [64, 64, 128], [128, 128]],
    encoder_paddings=[[0, 0, 1], [0, 0, 1], [0, 0, [1, 1, 0]], [0, 0]], block_type="basicblock")


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _expected_keys():
    """The official table (kx, ky, kz, Cin, Cout) reshaped to our (kx*ky*kz, Cin, Cout)."""
    exp = {"conv_input.0.weight": (27, 5, 16), **_bn("conv_input.1", 16)}
    stages = [(16, 32), (32, 64), (64, 128), (128, None)]
    for i, (c, down) in enumerate(stages, 1):
        p = f"encoder_layers.encoder_layer{i}"
        for j in (0, 1):
            exp[f"{p}.{j}.conv1.weight"] = (27, c, c)
            exp[f"{p}.{j}.conv2.weight"] = (27, c, c)
            exp.update(_bn(f"{p}.{j}.bn1", c))
            exp.update(_bn(f"{p}.{j}.bn2", c))
        if down:
            exp[f"{p}.2.0.weight"] = (27, c, down)
            exp.update(_bn(f"{p}.2.1", down))
    exp["conv_out.0.weight"] = (3, 128, 128)
    exp.update(_bn("conv_out.1", 128))
    return exp


def test_state_dict_matches_the_official_table():
    enc = SparseEncoder(**OFFICIAL)
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == _expected_keys()
    n_params = sum(p.numel() for p in enc.parameters())
    expected = sum(torch.Size(s).numel() for k, s in _expected_keys().items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == expected
    bn = enc.encoder_layers.encoder_layer1[0].bn1
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)
    down3 = enc.encoder_layers.encoder_layer3[2][0]
    assert down3.padding == (1, 1, 0) and down3.stride == (2, 2, 2)


def test_output_shape_at_official_resolution():
    torch.manual_seed(0)
    enc = SparseEncoder(**OFFICIAL).eval()
    # A few thousand occupied voxels spread over the grid (the real scene has ~110k; shapes only here).
    n = 3000
    coords = torch.stack([torch.zeros(n, dtype=torch.int64), torch.randint(0, 1440, (n,)),
                          torch.randint(0, 1440, (n,)), torch.randint(0, 41, (n,))], 1)
    coords = torch.unique(coords, dim=0)
    feats = torch.randn(len(coords), 5)
    with torch.no_grad():
        bev = enc(feats, coords, batch_size=1)
    assert bev.shape == (1, 256, 180, 180)
    assert bev.abs().sum() > 0

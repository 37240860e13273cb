"""BEV decoders: SECOND, SECONDFPN, GeneralizedResNet, LSSFPN.

Key/shape tables are written out from the facts sheet §2.4 (official constructors) and compared with
our state_dict exactly; numerics are checked against F.conv2d / explicit formulas.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bevfusion.models.decoder.resnet import GeneralizedResNet, LSSFPN
from bevfusion.models.decoder.second import SECOND
from bevfusion.models.decoder.secondfpn import SECONDFPN


BN_EPS3 = {"type": "BN", "eps": 1e-3, "momentum": 0.01}
SECOND_CFG = dict(in_channels=256, out_channels=[128, 256], layer_nums=[5, 5], layer_strides=[1, 2],
                  norm_cfg=BN_EPS3, conv_cfg={"type": "Conv2d", "bias": False})
SECONDFPN_CFG = dict(in_channels=[128, 256], out_channels=[256, 256], upsample_strides=[1, 2], norm_cfg=BN_EPS3,
                     upsample_cfg={"type": "deconv", "bias": False}, use_conv_for_no_stride=True)


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_second() -> dict[str, tuple[int, ...]]:
    exp = {}
    for i, (cin, c) in enumerate(((256, 128), (128, 256))):
        for j, idx in enumerate((0, 3, 6, 9, 12, 15)):
            exp[f"blocks.{i}.{idx}.weight"] = (c, cin if j == 0 else c, 3, 3)
            exp.update(bn(f"blocks.{i}.{idx + 1}", c))
    return exp


def expected_secondfpn() -> dict[str, tuple[int, ...]]:
    return {"deblocks.0.0.weight": (256, 128, 1, 1), **bn("deblocks.0.1", 256),
            "deblocks.1.0.weight": (256, 256, 2, 2), **bn("deblocks.1.1", 256)}


def expected_generalized_resnet(cin: int, blocks) -> dict[str, tuple[int, ...]]:
    exp = {}
    for s, (n, c, stride) in enumerate(blocks):
        for b in range(n):
            exp[f"{s}.{b}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            exp.update(bn(f"{s}.{b}.bn1", c))
            exp[f"{s}.{b}.conv2.weight"] = (c, c, 3, 3)
            exp.update(bn(f"{s}.{b}.bn2", c))
        if stride != 1 or cin != c:
            exp[f"{s}.0.downsample.0.weight"] = (c, cin, 1, 1)
            exp.update(bn(f"{s}.0.downsample.1", c))
        cin = c
    return exp


def expected_lssfpn(cin: int) -> dict[str, tuple[int, ...]]:
    return {"fuse.0.weight": (256, cin, 1, 1), **bn("fuse.1", 256), "fuse.3.weight": (256, 256, 3, 3),
            **bn("fuse.4", 256), "upsample.1.weight": (256, 256, 3, 3), **bn("upsample.2", 256)}


def param_count(table: dict[str, tuple[int, ...]]) -> int:
    """Trainable parameters in a key/shape table (BN running stats excluded)."""
    skip = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index")
    total = 0
    for k, shape in table.items():
        if not k.endswith(skip):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


# ---------------------------------------------------------------------------------------------- SECOND
def test_second_keys_shapes_and_bn():
    m = SECOND(**SECOND_CFG)
    exp = expected_second()
    assert shapes(m) == exp
    assert n_params(m) == param_count(exp) == 4_280_832
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert len(bns) == 12 and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert all(c.bias is None for c in m.modules() if isinstance(c, torch.nn.Conv2d))
    assert m.blocks[1][0].stride == (2, 2) and m.blocks[0][0].stride == (1, 1)


@torch.no_grad()
def test_second_secondfpn_official_resolution():
    """Fusion det shapes (facts §2.2): [1, 256, 180, 180] → SECOND → SECONDFPN → [1, 512, 180, 180]."""
    second, fpn = SECOND(**SECOND_CFG).eval(), SECONDFPN(**SECONDFPN_CFG).eval()
    outs = second(torch.randn(1, 256, 180, 180))
    assert isinstance(outs, tuple) and [tuple(o.shape) for o in outs] == [(1, 128, 180, 180), (1, 256, 90, 90)]
    y = fpn(outs)
    assert isinstance(y, list) and len(y) == 1 and tuple(y[0].shape) == (1, 512, 180, 180)


@torch.no_grad()
def test_second_matches_conv_composition():
    torch.manual_seed(0)
    m = SECOND(in_channels=4, out_channels=[6, 8], layer_nums=[1, 2], layer_strides=[2, 2]).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 16, 12)
    ref, outs = x, []
    for block in m.blocks:
        convs = [l for l in block if isinstance(l, torch.nn.Conv2d)]
        norms = [l for l in block if isinstance(l, torch.nn.BatchNorm2d)]
        for c, b in zip(convs, norms):
            ref = F.conv2d(ref, c.weight, None, c.stride, 1)
            ref = (ref - b.running_mean[:, None, None]) / torch.sqrt(b.running_var[:, None, None] + 1e-3)
            ref = F.relu(ref * b.weight[:, None, None] + b.bias[:, None, None])
        outs.append(ref)
    got = m(x)
    assert [tuple(o.shape) for o in got] == [(2, 6, 8, 6), (2, 8, 4, 3)]
    for g, r in zip(got, outs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- SECONDFPN
def test_secondfpn_keys_shapes():
    m = SECONDFPN(**SECONDFPN_CFG)
    exp = expected_secondfpn()
    assert shapes(m) == exp
    assert n_params(m) == param_count(exp) == 295_936
    assert isinstance(m.deblocks[0][0], torch.nn.Conv2d) and isinstance(m.deblocks[1][0], torch.nn.ConvTranspose2d)
    assert m.deblocks[1][0].bias is None and m.deblocks[0][0].bias is None
    assert all(b.eps == 1e-3 and b.momentum == 0.01 for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))


@torch.no_grad()
def test_secondfpn_transposed_conv_matches_formula():
    """Stride-2 ConvTranspose2d (kernel 2): out[o, 2i+a, 2j+b] = Σ_c x[c, i, j] W[c, o, a, b]."""
    torch.manual_seed(1)
    m = SECONDFPN(in_channels=[3, 5], out_channels=[4, 4], upsample_strides=[1, 2], use_conv_for_no_stride=True).eval()
    x0, x1 = torch.randn(2, 3, 6, 8), torch.randn(2, 5, 3, 4)
    w = m.deblocks[1][0].weight  # (Cin, Cout, 2, 2)
    up = torch.einsum("bcij,coxy->boixjy", x1, w).reshape(2, 4, 6, 8)
    bn1 = m.deblocks[1][1]
    ref1 = F.relu((up - bn1.running_mean[:, None, None]) / torch.sqrt(bn1.running_var[:, None, None] + 1e-3)
                  * bn1.weight[:, None, None] + bn1.bias[:, None, None])
    c0, bn0 = m.deblocks[0][0], m.deblocks[0][1]
    ref0 = F.relu(F.conv2d(x0, c0.weight) / (1 + 1e-3) ** 0.5)
    (y,) = m([x0, x1])
    assert tuple(y.shape) == (2, 8, 6, 8)
    torch.testing.assert_close(y[:, :4], ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 4:], ref1, rtol=1e-5, atol=1e-5)


def test_secondfpn_fractional_stride_and_deconv_for_stride_one():
    m = SECONDFPN(in_channels=[4, 4], out_channels=[2, 2], upsample_strides=[0.5, 1], use_conv_for_no_stride=False)
    assert isinstance(m.deblocks[0][0], torch.nn.Conv2d) and m.deblocks[0][0].stride == (2, 2)
    assert isinstance(m.deblocks[1][0], torch.nn.ConvTranspose2d) and m.deblocks[1][0].kernel_size == (1, 1)


# ---------------------------------------------------------------------------------------------- ResNet / LSSFPN
CAM_DET_BLOCKS = [[2, 128, 2], [2, 256, 2], [2, 512, 1]]
CAM_SEG_BLOCKS = [[2, 160, 2], [2, 320, 2], [2, 640, 1]]


@pytest.mark.parametrize("blocks,lss_in,count_resnet,count_lss", [
    (CAM_DET_BLOCKS, 640, 11_039_488, 1_345_024),
    (CAM_SEG_BLOCKS, 800, 17_214_400, 1_385_984),
])
def test_generalized_resnet_lssfpn_keys_shapes(blocks, lss_in, count_resnet, count_lss):
    net = GeneralizedResNet(in_channels=80, blocks=blocks)
    exp = expected_generalized_resnet(80, blocks)
    assert shapes(net) == exp and n_params(net) == param_count(exp) == count_resnet
    assert shapes(net)["0.0.conv1.weight"] == (blocks[0][1], 80, 3, 3)
    assert "2.0.downsample.0.weight" in exp  # stride 1 but 256 != 512: still a shortcut conv
    c = blocks[-1][1]
    neck = LSSFPN(in_indices=[-1, 0], in_channels=[c, blocks[0][1]], out_channels=256, scale_factor=2)
    exp = expected_lssfpn(lss_in)
    assert shapes(neck) == exp and n_params(neck) == param_count(exp) == count_lss


@torch.no_grad()
def test_camera_det_decoder_official_resolution():
    """Camera-only det (facts §2.3): [1, 80, 128, 128] → [1, 128, 64, 64], [1, 256, 32, 32], [1, 512, 32, 32]
    → LSSFPN → [1, 256, 128, 128]."""
    net = GeneralizedResNet(in_channels=80, blocks=CAM_DET_BLOCKS).eval()
    neck = LSSFPN(in_indices=[-1, 0], in_channels=[512, 128], out_channels=256, scale_factor=2).eval()
    outs = net(torch.randn(1, 80, 128, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 64, 64), (1, 256, 32, 32), (1, 512, 32, 32)]
    y = neck(outs)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (1, 256, 128, 128)


def _bn_eval(x, b):
    return (x - b.running_mean[:, None, None]) / torch.sqrt(b.running_var[:, None, None] + b.eps) \
        * b.weight[:, None, None] + b.bias[:, None, None]


def _randomize_bn(module):
    for mod in module.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)


@torch.no_grad()
def test_basic_block_and_lssfpn_match_manual_composition():
    torch.manual_seed(2)
    net = GeneralizedResNet(in_channels=3, blocks=[[2, 4, 2], [1, 6, 1]]).eval()
    neck = LSSFPN(in_indices=[-1, 0], in_channels=[6, 4], out_channels=5, scale_factor=2).eval()
    _randomize_bn(net)
    _randomize_bn(neck)
    x = torch.randn(2, 3, 10, 14)

    def block(x, blk, stride):
        out = F.relu(_bn_eval(F.conv2d(x, blk.conv1.weight, stride=stride, padding=1), blk.bn1))
        out = _bn_eval(F.conv2d(out, blk.conv2.weight, padding=1), blk.bn2)
        if blk.downsample is not None:
            x = _bn_eval(F.conv2d(x, blk.downsample[0].weight, stride=stride), blk.downsample[1])
        return F.relu(out + x)

    s0 = block(block(x, net[0][0], 2), net[0][1], 1)
    s1 = block(s0, net[1][0], 1)
    got = net(x)
    torch.testing.assert_close(got[0], s0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], s1, rtol=1e-5, atol=1e-5)
    # LSSFPN: same size here, so the first interpolation is the identity
    y = torch.cat([s1, s0], 1)
    y = F.relu(_bn_eval(F.conv2d(y, neck.fuse[0].weight), neck.fuse[1]))
    y = F.relu(_bn_eval(F.conv2d(y, neck.fuse[3].weight, padding=1), neck.fuse[4]))
    y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
    y = F.relu(_bn_eval(F.conv2d(y, neck.upsample[1].weight, padding=1), neck.upsample[2]))
    torch.testing.assert_close(neck(got), y, rtol=1e-5, atol=1e-5)

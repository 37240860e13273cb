"""ResNet camera backbone (mmdet / torchvision names): keys and shapes of ResNet-50, official input size,
Bottleneck vs an F.conv2d composition, freezing / norm_eval, local-only pretrained loading."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from bevfusion.models.camera.backbones import resnet as resnet_mod
from bevfusion.models.camera.backbones.resnet import Bottleneck, ResNet


R50 = dict(depth=50, num_stages=4, out_indices=[1, 2, 3], frozen_stages=-1,
           norm_cfg={"type": "BN2d", "requires_grad": True}, norm_eval=False)


def bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def expected_r50() -> dict[str, tuple[int, ...]]:
    exp = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin = 64
    for i, n in enumerate((3, 4, 6, 3)):
        p = 64 * 2 ** i
        for j in range(n):
            k = f"layer{i + 1}.{j}."
            exp.update({k + "conv1.weight": (p, cin if j == 0 else 4 * p, 1, 1), **bn(k + "bn1", p),
                        k + "conv2.weight": (p, p, 3, 3), **bn(k + "bn2", p),
                        k + "conv3.weight": (4 * p, p, 1, 1), **bn(k + "bn3", 4 * p)})
        exp.update({f"layer{i + 1}.0.downsample.0.weight": (4 * p, cin, 1, 1),
                    **bn(f"layer{i + 1}.0.downsample.1", 4 * p)})
        cin = 4 * p
    return exp


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    m = ResNet(**R50)
    m.init_weights()
    return m.eval()


def test_r50_keys_shapes_count(r50):
    exp = expected_r50()
    assert {k: tuple(v.shape) for k, v in r50.state_dict().items()} == exp
    count = sum(torch.Size(s).numel() for k, s in exp.items()
                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    # torchvision resnet50 has 25,557,032 parameters; its fc layer (2048·1000 + 1000) is not a backbone part
    assert sum(p.numel() for p in r50.parameters()) == count == 25_557_032 - 2_049_000
    assert all(float(b.bn3.weight.detach().abs().max()) == 0 for b in r50.modules() if isinstance(b, Bottleneck))


@torch.no_grad()
def test_r50_official_input_size(r50):
    """One camera at 256×704 (the 6-camera batch is the same computation six times)."""
    outs = r50(torch.randn(1, 3, 256, 704))
    assert [tuple(o.shape) for o in outs] == [(1, 512, 32, 88), (1, 1024, 16, 44), (1, 2048, 8, 22)]


def _bn(x, b):
    return (x - b.running_mean[:, None, None]) / torch.sqrt(b.running_var[:, None, None] + b.eps) \
        * b.weight[:, None, None] + b.bias[:, None, None]


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
@torch.no_grad()
def test_bottleneck_matches_conv_composition(style):
    torch.manual_seed(1)
    net = ResNet(depth=50, base_channels=4, stem_channels=6, out_indices=[0, 1], num_stages=2, style=style).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 37, 45)
    y = F.max_pool2d(F.relu(_bn(F.conv2d(x, net.conv1.weight, stride=2, padding=3), net.bn1)), 3, 2, 1)
    refs = []
    for li, layer in enumerate((net.layer1, net.layer2)):
        for j, b in enumerate(layer):
            stride = 2 if (li == 1 and j == 0) else 1
            s1, s2 = (1, stride) if style == "pytorch" else (stride, 1)
            out = F.relu(_bn(F.conv2d(y, b.conv1.weight, stride=s1), b.bn1))
            out = F.relu(_bn(F.conv2d(out, b.conv2.weight, stride=s2, padding=1), b.bn2))
            out = _bn(F.conv2d(out, b.conv3.weight), b.bn3)
            short = y if b.downsample is None else _bn(F.conv2d(y, b.downsample[0].weight, stride=stride),
                                                       b.downsample[1])
            y = F.relu(out + short)
        refs.append(y)
    got = net(x)
    assert [tuple(g.shape) for g in got] == [(2, 16, 10, 12), (2, 32, 5, 6)]
    for g, r in zip(got, refs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_frozen_stages_and_norm_eval():
    m = ResNet(depth=18, frozen_stages=1, norm_eval=True).train()
    assert not any(p.requires_grad for p in m.conv1.parameters()) and not m.bn1.training
    assert not any(p.requires_grad for p in m.layer1.parameters())
    assert all(p.requires_grad for p in m.layer2.parameters())
    assert not any(b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    m = ResNet(depth=18, norm_eval=False).train()
    assert all(b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    assert ResNet(depth=18, norm_cfg={"type": "BN", "requires_grad": False}).bn1.weight.requires_grad is False


def test_pretrained_local_and_url(tmp_path, monkeypatch, caplog):
    torch.manual_seed(2)
    src = ResNet(depth=18)
    for p in src.parameters():
        p.data.normal_()
    sd = {**src.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}  # torchvision file
    torch.save(sd, tmp_path / "r18.pth")
    dst = ResNet(depth=18, out_indices=[3], init_cfg={"type": "Pretrained", "checkpoint": str(tmp_path / "r18.pth")})
    dst.init_weights()
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    torch.save({"state_dict": {"backbone." + k: v for k, v in src.state_dict().items()}}, tmp_path / "det.pth")
    dst = ResNet(depth=18, pretrained=str(tmp_path / "det.pth"))
    dst.init_weights()
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(resnet_mod, "_warned_urls", set())
    caplog.set_level(logging.WARNING, logger="bevfusion")
    for _ in range(2):
        ResNet(depth=18, init_cfg={"type": "Pretrained", "checkpoint": "torchvision://resnet18"}).init_weights()
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1 and "init_cfg.checkpoint=PATH" in msgs[0]
    with pytest.raises(FileNotFoundError):
        ResNet(depth=18, pretrained=str(tmp_path / "missing.pth")).init_weights()


def test_pretrained_and_init_cfg_are_one_setting():
    from bevfusion.models.camera.backbones.swin import SwinTransformer

    from bevfusion.models.layers import Pretrained

    assert ResNet(depth=18, pretrained="w.pth").init_cfg == Pretrained("w.pth")
    assert ResNet(depth=18, init_cfg={"type": "Pretrained", "checkpoint": "w.pth"}).init_cfg == Pretrained("w.pth")
    assert ResNet(depth=18).init_cfg is None
    for build, name in ((lambda **kw: ResNet(depth=18, **kw), "ResNet"),
                        (lambda **kw: SwinTransformer(embed_dims=12, depths=[1], num_heads=[1], strides=[4],
                                                      out_indices=[0], **kw), "SwinTransformer")):
        with pytest.raises(ValueError, match=f"{name}: give init_cfg or pretrained, not both"):
            build(pretrained="a.pth", init_cfg={"type": "Pretrained", "checkpoint": "b.pth"})

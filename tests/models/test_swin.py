"""SwinTransformer (mmdet 2.20 layout, facts §2.4): keys and shapes, official output shapes, shifted
window attention vs a naive full attention with a per-pixel mask, PatchMerging order vs explicit
slicing, original-Swin checkpoint conversion, local-only pretrained loading."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from bevfusion.models.camera.backbones import swin as swin_mod
from bevfusion.models.camera.backbones.swin import (PatchMerging, ShiftWindowMSA, SwinTransformer,
                                                    convert_original_swin, relative_position_index)


SWIN_T = dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4,
              qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=True,
              out_indices=[1, 2, 3], with_cp=False, convert_weights=True)
URL = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth"


def expected_swin_t() -> dict[str, tuple[int, ...]]:
    """The facts-sheet table for Swin-T: per stage C = 96·2^i, nH = 3·2^i, (2, 2, 6, 2) blocks."""
    exp = {"patch_embed.projection.weight": (96, 3, 4, 4), "patch_embed.projection.bias": (96,),
           "patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,)}
    for i, depth in enumerate((2, 2, 6, 2)):
        C, nH = 96 * 2 ** i, 3 * 2 ** i
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            exp.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,), p + "norm2.weight": (C,),
                        p + "norm2.bias": (C,),
                        p + "attn.w_msa.relative_position_bias_table": (169, nH),
                        p + "attn.w_msa.relative_position_index": (49, 49),
                        p + "attn.w_msa.qkv.weight": (3 * C, C), p + "attn.w_msa.qkv.bias": (3 * C,),
                        p + "attn.w_msa.proj.weight": (C, C), p + "attn.w_msa.proj.bias": (C,),
                        p + "ffn.layers.0.0.weight": (4 * C, C), p + "ffn.layers.0.0.bias": (4 * C,),
                        p + "ffn.layers.1.weight": (C, 4 * C), p + "ffn.layers.1.bias": (C,)})
        if i < 3:
            exp.update({f"stages.{i}.downsample.norm.weight": (4 * C,), f"stages.{i}.downsample.norm.bias": (4 * C,),
                        f"stages.{i}.downsample.reduction.weight": (2 * C, 4 * C)})
    for k, c in ((1, 192), (2, 384), (3, 768)):
        exp.update({f"norm{k}.weight": (c,), f"norm{k}.bias": (c,)})
    return exp


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    m = SwinTransformer(**SWIN_T, init_cfg=None)
    m.init_weights()
    return m.eval()


def test_swin_t_keys_shapes_count(swin_t):
    exp = expected_swin_t()
    got = {k: tuple(v.shape) for k, v in swin_t.state_dict().items()}
    assert got == exp
    count = sum(n for k, s in exp.items() if not k.endswith("relative_position_index")
                for n in [torch.Size(s).numel()])
    assert sum(p.numel() for p in swin_t.parameters()) == count == 27_520_506
    assert swin_t.state_dict()["stages.0.blocks.0.attn.w_msa.relative_position_index"].dtype == torch.int64


def test_swin_t_structure_facts(swin_t):
    blocks = [b for s in swin_t.stages for b in s.blocks]
    assert len(blocks) == 12
    dpr = [b.attn.drop.drop_prob for b in blocks]
    assert dpr == pytest.approx(torch.linspace(0, 0.2, 12).tolist())
    assert [b.ffn.dropout_layer.drop_prob for b in blocks] == pytest.approx(dpr)
    assert [b.attn.shift_size for b in blocks] == [0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0, 3]
    assert all(b.attn.w_msa.scale == pytest.approx(32 ** -0.5) for b in blocks)  # head dim 32 everywhere
    assert all(isinstance(b.ffn.layers[0][1], torch.nn.GELU) for b in blocks)
    assert all(m.eps == 1e-5 for m in swin_t.modules() if isinstance(m, torch.nn.LayerNorm))
    assert swin_t.stages[3].downsample is None


@torch.no_grad()
def test_swin_t_official_resolution(swin_t):
    """One camera at the official 256×704 (the batch of 6 is the same computation 6 times, ~12 s on one
    CPU core: see the slow test below) → [1, 192, 32, 88], [1, 384, 16, 44], [1, 768, 8, 22]."""
    outs = swin_t(torch.randn(1, 3, 256, 704))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 32, 88), (1, 384, 16, 44), (1, 768, 8, 22)]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.slow
@torch.no_grad()
def test_swin_t_six_cameras(swin_t):
    outs = swin_t(torch.randn(6, 3, 256, 704))
    assert [tuple(o.shape) for o in outs] == [(6, 192, 32, 88), (6, 384, 16, 44), (6, 768, 8, 22)]


def test_relative_position_index_matches_mmdet_construction():
    """mmdet builds it as (13·h + w) summed with its transpose, then flips the columns."""
    seq = (torch.arange(0, 13 * 7, 13)[:, None] + torch.arange(7)[None, :]).reshape(1, -1)
    mmdet = (seq + seq.T).flip(1)
    assert torch.equal(relative_position_index((7, 7)), mmdet)


def _naive_window_attention(x, H, W, ws, shift, nH, qkv_w, qkv_b, proj_w, proj_b, table, scale):
    """Full attention over the padded, rolled map; a token pair is allowed only inside one window, gets
    the table bias of its (dh, dw), and −100 when the two pixels lie in different shift regions."""
    B, L, C = x.shape
    d = C // nH
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    grid = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    grid[:, :H, :W] = x.view(B, H, W, C)
    grid = torch.roll(grid, (-shift, -shift), (1, 2))
    tokens = grid.reshape(B, Hp * Wp, C)

    def region(i: int, n: int) -> int:  # the official slices: [0, n-ws), [n-ws, n-shift), [n-shift, n)
        if shift == 0:
            return 0
        return 0 if i < n - ws else (1 if i < n - shift else 2)

    N = Hp * Wp
    bias = torch.full((nH, N, N), float("-inf"), dtype=x.dtype)
    for p in range(N):
        hp, wp = divmod(p, Wp)
        for q in range(N):
            hq, wq = divmod(q, Wp)
            if hp // ws != hq // ws or wp // ws != wq // ws:
                continue  # other window
            idx = ((hp % ws) - (hq % ws) + ws - 1) * (2 * ws - 1) + ((wp % ws) - (wq % ws) + ws - 1)
            value = table[idx]
            if (region(hp, Hp), region(wp, Wp)) != (region(hq, Hp), region(wq, Wp)):
                value = value - 100.0
            bias[:, p, q] = value
    qkv = F.linear(tokens, qkv_w, qkv_b).view(B, N, 3, nH, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * scale, qkv[1], qkv[2]
    att = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    out = (att @ v).transpose(1, 2).reshape(B, N, C)
    out = F.linear(out, proj_w, proj_b).view(B, Hp, Wp, C)
    out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :H, :W].reshape(B, H * W, C)


def _naive_shift_window_attention(msa: ShiftWindowMSA, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    w = msa.w_msa
    return _naive_window_attention(x, H, W, msa.window_size, msa.shift_size, w.num_heads, w.qkv.weight, w.qkv.bias,
                                   w.proj.weight, w.proj.bias, w.relative_position_bias_table, w.scale)


@pytest.mark.parametrize("shift,H,W", [(0, 6, 6), (1, 6, 6), (1, 7, 8), (2, 10, 5)])
@torch.no_grad()
def test_shift_window_attention_vs_naive(shift, H, W):
    torch.manual_seed(shift * 100 + H)
    msa = ShiftWindowMSA(embed_dims=8, num_heads=2, window_size=3 if shift < 2 else 5, shift_size=shift).double()
    msa.eval()
    msa.w_msa.relative_position_bias_table.normal_(0, 1.0)
    x = torch.randn(2, H * W, 8, dtype=torch.float64)
    torch.testing.assert_close(msa(x, (H, W)), _naive_shift_window_attention(msa, x, H, W), rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_patch_merging_unfold_order_vs_slicing():
    """Input channel c·4 + k of the reduction, k = (h0w0, h0w1, h1w0, h1w1)."""
    torch.manual_seed(0)
    C, H, W = 5, 6, 8
    pm = PatchMerging(C, 2 * C).double().eval()
    pm.norm.weight.normal_()
    pm.norm.bias.normal_()
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    g = x.view(2, H, W, C)
    parts = [g[:, kh::2, kw::2] for kh, kw in ((0, 0), (0, 1), (1, 0), (1, 1))]  # (B, H/2, W/2, C) each
    v = torch.stack(parts, dim=-1).reshape(2, (H // 2) * (W // 2), 4 * C)  # index c·4 + k
    ref = F.linear(F.layer_norm(v, (4 * C,), pm.norm.weight, pm.norm.bias, 1e-5), pm.reduction.weight)
    out, hw = pm(x, (H, W))
    assert hw == (3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # odd sizes pad bottom/right with zeros
    out, hw = pm(torch.randn(1, 5 * 7, C, dtype=torch.float64), (5, 7))
    assert hw == (3, 4) and out.shape == (1, 12, 2 * C)


@torch.no_grad()
def test_original_swin_patch_merging_converts_to_identical_math():
    """Swin-repo PatchMerging: cat(x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]) → LN → Linear."""
    torch.manual_seed(1)
    C, H, W = 6, 4, 6
    red_w, n_w, n_b = torch.randn(2 * C, 4 * C, dtype=torch.float64), torch.randn(4 * C, dtype=torch.float64), \
        torch.randn(4 * C, dtype=torch.float64)
    x = torch.randn(3, H * W, C, dtype=torch.float64)
    g = x.view(3, H, W, C)
    cat = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1).view(3, -1, 4 * C)
    ref = F.linear(F.layer_norm(cat, (4 * C,), n_w, n_b, 1e-5), red_w)
    conv = convert_original_swin({"layers.0.downsample.reduction.weight": red_w,
                                  "layers.0.downsample.norm.weight": n_w, "layers.0.downsample.norm.bias": n_b})
    pm = PatchMerging(C, 2 * C).double()
    pm.load_state_dict({k.replace("stages.0.downsample.", ""): v for k, v in conv.items()})
    torch.testing.assert_close(pm(x, (H, W))[0], ref, rtol=1e-12, atol=1e-12)


def _to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (mmdet) keys → Swin-repo keys, written independently of the converter (explicit index maps)."""
    out = {}
    for k, v in state.items():
        if k.startswith("norm") and not k.startswith("norm."):
            continue  # per-output norms do not exist in the Swin repo
        n = k.replace("stages.", "layers.").replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.")
        n = n.replace("ffn.layers.1.", "mlp.fc2.").replace("patch_embed.projection.", "patch_embed.proj.")
        if ".downsample." in k:
            c = v.shape[-1] // 4
            # original index k_orig·C + c holds our index c·4 + k_unfold, with k_orig order (00, 10, 01, 11)
            unfold_of_orig = [0, 2, 1, 3]
            src = torch.tensor([ch * 4 + unfold_of_orig[ko] for ko in range(4) for ch in range(c)])
            v = v[..., src]
        out[n] = v.clone()
    out["head.weight"], out["head.bias"] = torch.zeros(10, 8 * 16), torch.zeros(10)
    out["norm.weight"], out["norm.bias"] = torch.ones(8 * 16), torch.zeros(8 * 16)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 9, 9)
    return out


SMALL = dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3, drop_path_rate=0.1,
             out_indices=[0, 1, 2, 3])


@pytest.mark.parametrize("layout", ["original", "mmdet_detector", "bevfusion"])
@torch.no_grad()
def test_pretrained_local_file_layouts_round_trip(tmp_path, layout):
    torch.manual_seed(3)
    src = SwinTransformer(**SMALL).eval()
    for p in src.parameters():
        p.normal_()
    ours = src.state_dict()
    if layout == "original":
        ckpt = {"model": _to_original_layout(ours)}
    elif layout == "mmdet_detector":
        ckpt = {"state_dict": {**{"backbone." + k: v for k, v in ours.items()}, "neck.fpn.weight": torch.zeros(1)}}
    else:
        ckpt = {"state_dict": {**{"encoders.camera.backbone." + k: v for k, v in ours.items()},
                               "fuser.0.weight": torch.zeros(1)}, "meta": {"epoch": 6}}
    path = tmp_path / "swin.pth"
    torch.save(ckpt, path)
    dst = SwinTransformer(**SMALL, convert_weights=True, init_cfg={"type": "Pretrained", "checkpoint": str(path)})
    dst.init_weights()
    dst.eval()
    got = dst.state_dict()
    for k, v in ours.items():
        if layout == "original" and k.startswith("norm"):
            continue  # not in Swin-repo files: keep their init
        assert torch.equal(got[k], v), k
    if layout != "original":
        x = torch.randn(1, 3, 40, 52)
        for a, b in zip(src(x), dst(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_url_checkpoint_warns_once_and_never_downloads(monkeypatch, caplog):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(swin_mod, "_warned_urls", set())
    caplog.set_level(logging.WARNING, logger="bevfusion")
    torch.manual_seed(0)
    for _ in range(2):
        m = SwinTransformer(**SMALL, init_cfg={"type": "Pretrained", "checkpoint": URL})
        m.init_weights()
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1
    assert URL in msgs[0] and "--set model.encoders.camera.backbone.init_cfg.checkpoint=PATH" in msgs[0]
    w = m.stages[0].blocks[0].ffn.layers[1].weight
    assert float(w.detach().abs().max()) <= 2.0 and 0.01 < float(w.detach().std()) < 0.03  # trunc normal 0.02


def test_missing_local_checkpoint_is_an_error(tmp_path):
    m = SwinTransformer(**SMALL, init_cfg={"type": "Pretrained", "checkpoint": str(tmp_path / "nope.pth")})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        m.init_weights()
    torch.save({"state_dict": {"head.fc.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    m = SwinTransformer(**SMALL, init_cfg={"type": "Pretrained", "checkpoint": str(tmp_path / "other.pth")})
    with pytest.raises(ValueError, match="no Swin weights"):
        m.init_weights()


def test_bias_table_of_another_window_is_resized(tmp_path):
    src = SwinTransformer(**{**SMALL, "window_size": 2})
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w2.pth")
    dst = SwinTransformer(**SMALL)  # window 3: table 25 × nH instead of 9 × nH
    missing, _ = dst.load_pretrained(tmp_path / "w2.pth")
    assert dst.stages[0].blocks[0].attn.w_msa.relative_position_bias_table.shape == (25, 1)
    assert not any("bias_table" in k for k in missing)


def test_frozen_stages_and_with_cp():
    m = SwinTransformer(**SMALL, frozen_stages=1, with_cp=True).train()
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    assert not any(p.requires_grad for p in m.stages[0].parameters()) and not m.stages[0].training
    assert not any(p.requires_grad for p in m.norm0.parameters())
    assert all(p.requires_grad for p in m.stages[1].parameters()) and m.stages[1].training
    x = torch.randn(1, 3, 24, 24)
    sum(o.sum() for o in m(x)).backward()
    assert m.stages[1].blocks[0].attn.w_msa.qkv.weight.grad is not None


def _naive_original_swin(sd, x, depths, heads, ws, out_norms):
    """Swin-repo forward written from its own layout: slice-concatenated PatchMerging (x0, x1, x2, x3 =
    [0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2]), `mlp.fc1/fc2`, `attn.*`, exact GELU."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, C, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (C,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    outs = []
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
            h = _naive_window_attention(h, H, W, ws, 0 if j % 2 == 0 else ws // 2, heads[i], sd[p + "attn.qkv.weight"],
                                        sd[p + "attn.qkv.bias"], sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"],
                                        sd[p + "attn.relative_position_bias_table"], (C // heads[i]) ** -0.5)
            x = x + h
            h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            x = x + h
        outs.append(F.layer_norm(x, (C,), *out_norms[i]).view(B, H, W, C).permute(0, 3, 1, 2))
        if i < len(depths) - 1:
            g = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))  # the Swin repo pads odd sizes too
            H, W = g.shape[1], g.shape[2]
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            H, W = H // 2, W // 2
            g = g.reshape(B, H * W, 4 * C)
            g = F.layer_norm(g, (4 * C,), sd[f"layers.{i}.downsample.norm.weight"],
                             sd[f"layers.{i}.downsample.norm.bias"])
            x = F.linear(g, sd[f"layers.{i}.downsample.reduction.weight"])
            C = 2 * C
    return outs


@torch.no_grad()
def test_original_swin_file_gives_naive_swin_outputs(tmp_path):
    """A Swin-repo checkpoint loaded through init_cfg reproduces a naive forward of the Swin-repo layout
    (float64; maps that need padding and shifted windows at every stage)."""
    torch.manual_seed(4)
    cfg = dict(embed_dims=8, depths=[2, 2, 2], num_heads=[1, 2, 2], strides=(4, 2, 2), window_size=3,
               drop_path_rate=0.0, out_indices=[0, 1, 2])
    src = SwinTransformer(**cfg).double()
    for prm in src.parameters():
        prm.normal_(0, 0.5)
    original = _to_original_layout(src.state_dict())
    torch.save({"model": original}, tmp_path / "swin_repo.pth")
    ours = SwinTransformer(**cfg, init_cfg={"type": "Pretrained", "checkpoint": str(tmp_path / "swin_repo.pth")})
    ours = ours.double()
    ours.init_weights()
    ours.eval()
    x = torch.randn(2, 3, 28, 44, dtype=torch.float64)  # tokens 7×11 → 4×6 (pad) → 2×3
    norms = [(getattr(ours, f"norm{i}").weight, getattr(ours, f"norm{i}").bias) for i in range(3)]
    ref = _naive_original_swin(original, x, cfg["depths"], cfg["num_heads"], 3, norms)
    got = ours(x)
    assert [tuple(g.shape) for g in got] == [(2, 8, 7, 11), (2, 16, 4, 6), (2, 32, 2, 3)]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)

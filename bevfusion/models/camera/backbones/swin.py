"""Swin Transformer camera backbone with the mmdet 2.20 module tree (official `SwinTransformer`).

Keys follow mmdet: `patch_embed.projection`, `stages.{i}.blocks.{j}.attn.w_msa.{qkv,proj,
relative_position_bias_table,relative_position_index}`, `ffn.layers.0.0` / `ffn.layers.1`,
`stages.{i}.downsample.{norm,reduction}` (2×2 Unfold channel order c·4 + k, k = h0w0, h0w1, h1w0,
h1w1) and one `norm{i}` per output index, so BEVFusion checkpoints load unchanged.

Behaviour kept from mmdet: features are zero-padded (bottom / right, after norm1) to a multiple of the
window before the cyclic shift, padded tokens take part in attention (only the shift regions are
masked, with −100), stochastic depth grows linearly over all blocks.

Pretrained weights come from a LOCAL file only (`init_cfg: {type: Pretrained, checkpoint: PATH}`):
original Swin-repo checkpoints (`layers.*`, `attn.*`, `mlp.fc1/fc2`, `patch_embed.proj`, slice-ordered
PatchMerging), mmdet detector checkpoints (`backbone.*`) and BEVFusion checkpoints
(`encoders.camera.backbone.*`) are recognised by their keys. A URL is never downloaded: the backbone
logs one warning and keeps its random init.
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from bevfusion.models.common import (DropPath, backbone_state_dict, build_activation, freeze_module, init_from_cfg,
                                     merge_pretrained, read_local_checkpoint, trunc_normal_)
from bevfusion.models.layers import LN, NormSpec, as_spec

__all__ = ["SwinTransformer", "WindowMSA", "ShiftWindowMSA", "SwinBlock", "PatchMerging", "PatchEmbed",
           "swin_state_dict", "convert_original_swin", "relative_position_index"]

logger = logging.getLogger("bevfusion.models.swin")
_warned_urls: set[str] = set()


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def _layer_norm(norm_cfg: NormSpec | Mapping[str, Any] | None, dim: int) -> nn.Module:
    norm = as_spec(norm_cfg, NormSpec, {"type": "LN"}, "norm_cfg")
    if not isinstance(norm, LN):
        raise ValueError(f"SwinTransformer: norm_cfg type must be LN, got {norm.type_name}")
    return norm(dim)  # eps 1e-5 by default, as mmcv's LN


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """(Wh·Ww, Wh·Ww) int64: (dh + Wh − 1)·(2Ww − 1) + (dw + Ww − 1) for token pairs in row-major order."""
    wh, ww = window_size
    hs, ws = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    hs, ws = hs.flatten(), ws.flatten()
    dh = hs[:, None] - hs[None, :] + wh - 1
    dw = ws[:, None] - ws[None, :] + ww - 1
    return (dh * (2 * ww - 1) + dw).contiguous()


def _adaptive_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """mmdet AdaptivePadding('corner'): pad bottom/right so that a k/s window tiles (B, C, H, W)."""
    H, W = x.shape[-2:]
    pad_h = max((math.ceil(H / stride[0]) - 1) * stride[0] + kernel[0] - H, 0)
    pad_w = max((math.ceil(W / stride[1]) - 1) * stride[1] + kernel[1] - W, 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: `projection` Conv2d(k = s = patch) → tokens → `norm` (LN)."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int,
                 norm_cfg: Mapping[str, Any] | None):
        super().__init__()
        self.kernel, self.stride = _pair(kernel_size), _pair(stride)
        self.projection = nn.Conv2d(in_channels, embed_dims, kernel_size, stride=stride)
        self.norm = _layer_norm(norm_cfg, embed_dims) if norm_cfg is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(_adaptive_pad(x, self.kernel, self.stride))
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw


class PatchMerging(nn.Module):
    """mmdet PatchMerging: 2×2 Unfold (channel c·4 + k, k = h0w0, h0w1, h1w0, h1w1) → `norm` → `reduction`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2,
                 norm_cfg: Mapping[str, Any] | None = {"type": "LN"}):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel = self.stride = _pair(stride)
        self.sampler = nn.Unfold(kernel_size=self.kernel, stride=self.stride)
        dim = self.kernel[0] * self.kernel[1] * in_channels
        self.norm = _layer_norm(norm_cfg, dim) if norm_cfg is not None else None
        self.reduction = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        B, L, C = x.shape
        H, W = hw_shape
        assert L == H * W, "input size does not match hw_shape"
        x = _adaptive_pad(x.reshape(B, H, W, C).permute(0, 3, 1, 2), self.kernel, self.stride)
        H, W = x.shape[-2:]
        out_hw = ((H - self.kernel[0]) // self.stride[0] + 1, (W - self.kernel[1]) // self.stride[1] + 1)
        x = self.sampler(x).transpose(1, 2)  # (B, H/2·W/2, 4C)
        if self.norm is not None:
            x = self.norm(x)
        return self.reduction(x), out_hw


class WindowMSA(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Forward: x (B·nW, N, C) with N = Wh·Ww, mask None or (nW, N, N) additive → (B·nW, N, C).
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0):
        super().__init__()
        self.embed_dims, self.num_heads, self.window_size = embed_dims, num_heads, _pair(window_size)
        head_dims = embed_dims // num_heads
        self.scale = qk_scale or head_dims ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop_rate = attn_drop_rate
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def relative_bias(self) -> torch.Tensor:
        """(nH, N, N) additive bias gathered from the table."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B·nW, nH, N, d)
        bias = self.relative_bias().to(q.dtype)
        if mask is not None:
            nW = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)  # (nW, nH, N, N)
            q, k, v = (t.view(Bw // nW, nW, self.num_heads, N, -1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.attn_drop_rate if self.training else 0.0)
        out = out.reshape(Bw, self.num_heads, N, -1).transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(out))


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) → (B·H/ws·W/ws, ws, ws, C), windows in row-major order per image."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: (B·nW, ws, ws, C) → (B, H, W, C)."""
    ws = windows.shape[1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.reshape(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, -1)


def shift_window_mask(H: int, W: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """(nW, ws², ws²) mask for a (H, W) padded map rolled by −shift: 0 within a region, −100 across."""
    def regions(n: int) -> torch.Tensor:
        ids = torch.zeros(n, dtype=torch.long, device=device)
        ids[n - ws:n - shift] = 1
        ids[n - shift:] = 2
        return ids

    img = (regions(H)[:, None] * 3 + regions(W)[None, :]).view(1, H, W, 1)
    win = window_partition(img, ws).reshape(-1, ws * ws)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros(diff.shape, device=device).masked_fill(diff != 0, -100.0)


class ShiftWindowMSA(nn.Module):
    """(Shifted) window attention on a token map: pad → roll → partition → WindowMSA → reverse → unpad."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 qkv_bias: bool = True, qk_scale: float | None = None, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError("shift_size must be in [0, window_size)")
        self.window_size, self.shift_size = window_size, shift_size
        self.w_msa = WindowMSA(embed_dims, num_heads, _pair(window_size), qkv_bias, qk_scale, attn_drop_rate,
                               proj_drop_rate)
        self.drop = DropPath(drop_path_rate)

    def forward(self, query: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        B, L, C = query.shape
        H, W = hw_shape
        ws, shift = self.window_size, self.shift_size
        x = query.reshape(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros take part in attention, as upstream
        Hp, Wp = x.shape[1], x.shape[2]
        mask = None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shift_window_mask(Hp, Wp, ws, shift, device=x.device)
        windows = window_partition(x, ws).reshape(-1, ws * ws, C)
        x = window_reverse(self.w_msa(windows, mask=mask).reshape(-1, ws, ws, C), Hp, Wp)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W, :].reshape(B, H * W, C)
        return self.drop(x)


class FFN(nn.Module):
    """mmcv FFN with two fcs: `layers` = Sequential(Sequential(Linear, act, Dropout), Linear, Dropout)."""

    def __init__(self, embed_dims: int, feedforward_channels: int, ffn_drop: float = 0.0,
                 drop_path_rate: float = 0.0, act_cfg: Mapping[str, Any] | None = {"type": "GELU"}):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), build_activation(act_cfg),
                          nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )
        self.dropout_layer = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return identity + self.dropout_layer(self.layers(x))


class SwinBlock(nn.Module):
    """x + attn(norm1(x)), then + ffn(norm2(x)); odd blocks use shifted windows (shift = window // 2)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, window_size: int = 7,
                 shift: bool = False, qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_cfg: Mapping[str, Any] | None = {"type": "GELU"},
                 norm_cfg: Mapping[str, Any] | None = {"type": "LN"}, with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = _layer_norm(norm_cfg, embed_dims)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size, window_size // 2 if shift else 0, qkv_bias,
                                   qk_scale, attn_drop_rate, drop_rate, drop_path_rate)
        self.norm2 = _layer_norm(norm_cfg, embed_dims)
        self.ffn = FFN(embed_dims, feedforward_channels, drop_rate, drop_path_rate, act_cfg)

    def _inner(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw_shape)
        return self.ffn(self.norm2(x), identity=x)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._inner, x, hw_shape, use_reentrant=False)
        return self._inner(x, hw_shape)


class SwinBlockSequence(nn.Module):
    """One stage: `blocks` then an optional `downsample` (PatchMerging)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, depth: int, window_size: int,
                 qkv_bias: bool, qk_scale: float | None, drop_rate: float, attn_drop_rate: float,
                 drop_path_rates: Sequence[float], downsample: nn.Module | None, act_cfg, norm_cfg, with_cp: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(embed_dims, num_heads, feedforward_channels, window_size, shift=j % 2 == 1, qkv_bias=qkv_bias,
                      qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                      drop_path_rate=drop_path_rates[j], act_cfg=act_cfg, norm_cfg=norm_cfg, with_cp=with_cp)
            for j in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]):
        for block in self.blocks:
            x = block(x, hw_shape)
        if self.downsample is not None:
            x_down, down_hw = self.downsample(x, hw_shape)
            return x_down, down_hw, x, hw_shape
        return x, hw_shape, x, hw_shape


class SwinTransformer(nn.Module):
    """mmdet 2.20 `SwinTransformer` (the official camera backbone, Swin-T in every released model).

    Args (official config keys):
        embed_dims, depths, num_heads, window_size, mlp_ratio, qkv_bias, qk_scale: the architecture.
        drop_rate, attn_drop_rate: dropout after projections / on attention weights.
        drop_path_rate: stochastic depth, linspace(0, rate, sum(depths)) over the blocks.
        patch_norm: LayerNorm after patch embedding and inside PatchMerging.
        out_indices: stages whose outputs are returned, each after its own `norm{i}`.
        with_cp: gradient checkpointing per block (saves memory in training).
        convert_weights: accepted for compatibility; the checkpoint layout is recognised from its keys
            (original Swin repo vs mmdet) and converted when needed, whatever this flag says.
        init_cfg: None (random init) or {type: Pretrained, checkpoint: local path}; a URL is not
            downloaded (one warning, random init).
        frozen_stages: freeze the patch embedding and the first `frozen_stages` stages (−1: none).
        pretrain_img_size, in_channels, patch_size, strides, use_abs_pos_embed, act_cfg, norm_cfg,
        pretrained: as in mmdet (use_abs_pos_embed is not supported: no official config uses it).

    Forward: (B, 3, H, W) → list of (B, embed_dims·2^i, H/(4·2^i), W/(4·2^i)) for i in out_indices;
    Swin-T on 256×704 gives [B, 192, 32, 88], [B, 384, 16, 44], [B, 768, 8, 22].
    """

    def __init__(self, pretrain_img_size: int | Sequence[int] = 224, in_channels: int = 3, embed_dims: int = 96,
                 patch_size: int = 4, window_size: int = 7, mlp_ratio: float = 4, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), strides: Sequence[int] = (4, 2, 2, 2),
                 out_indices: Sequence[int] = (0, 1, 2, 3), qkv_bias: bool = True, qk_scale: float | None = None,
                 patch_norm: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, use_abs_pos_embed: bool = False,
                 act_cfg: Mapping[str, Any] | None = {"type": "GELU"},
                 norm_cfg: Mapping[str, Any] | None = {"type": "LN"}, with_cp: bool = False,
                 pretrained: str | None = None, convert_weights: bool = False, frozen_stages: int = -1,
                 init_cfg: Mapping[str, Any] | None = None):
        super().__init__()
        if use_abs_pos_embed:
            raise NotImplementedError("SwinTransformer: use_abs_pos_embed is not supported (no official "
                                      "BEVFusion config uses it)")
        if len(depths) != len(num_heads) or len(strides) != len(depths):
            raise ValueError("SwinTransformer: depths, num_heads and strides need the same length")
        if strides[0] != patch_size:
            raise ValueError("SwinTransformer: strides[0] must equal patch_size (non-overlapping patch embed)")
        self.init_cfg = merge_pretrained("SwinTransformer", init_cfg, pretrained)
        self.convert_weights, self.frozen_stages = convert_weights, frozen_stages
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, strides[0],
                                      norm_cfg if patch_norm else None)
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = [float(x) for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList()
        channels = embed_dims
        for i, depth in enumerate(depths):
            downsample = None
            if i < len(depths) - 1:
                downsample = PatchMerging(channels, 2 * channels, stride=strides[i + 1],
                                          norm_cfg=norm_cfg if patch_norm else None)
            start = sum(depths[:i])
            self.stages.append(SwinBlockSequence(
                channels, num_heads[i], int(mlp_ratio * channels), depth, window_size, qkv_bias, qk_scale,
                drop_rate, attn_drop_rate, dpr[start:start + depth], downsample, act_cfg, norm_cfg, with_cp))
            if downsample is not None:
                channels = downsample.out_channels
        self.num_features = [int(embed_dims * 2 ** i) for i in range(len(depths))]
        for i in self.out_indices:
            self.add_module(f"norm{i}", _layer_norm(norm_cfg, self.num_features[i]))

    # ------------------------------------------------------------------ init / freezing
    def train(self, mode: bool = True) -> "SwinTransformer":
        super().train(mode)
        self._freeze_stages()
        return self

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            freeze_module(self.patch_embed)
            self.drop_after_pos.eval()
        for i in range(1, self.frozen_stages + 1):
            if (i - 1) in self.out_indices:
                freeze_module(getattr(self, f"norm{i - 1}"))
            freeze_module(self.stages[i - 1])

    def _random_init(self) -> None:
        """mmdet's from-scratch init: Linear trunc-normal(0.02) with zero bias, LayerNorm 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """Random init, or load `init_cfg.checkpoint` from a local file (never downloads)."""
        init_from_cfg(self, self.init_cfg, "SwinTransformer", logger, _warned_urls)

    def load_pretrained(self, path: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Load a local Swin checkpoint (original-repo, mmdet or BEVFusion layout); returns (missing, unexpected)."""
        path = os.fspath(path)
        ckpt = read_local_checkpoint(path, "Swin")
        state = swin_state_dict(ckpt)
        # the index buffers follow from the window size; ours are kept (a checkpoint's are equal or unusable)
        state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("relative_position_index"))
        own = self.state_dict()
        for key in [k for k in state if k.endswith("relative_position_bias_table") and k in own]:
            state[key] = _resize_bias_table(state[key], own[key], key)
        matched = [k for k in state if k in own]
        if not matched:
            raise ValueError(f"{path}: no Swin weights found (first keys: {', '.join(list(state)[:5])})")
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("relative_position_index")]
        if missing or unexpected:
            logger.info("SwinTransformer: loaded %s (%d tensors); missing %s; unexpected %s", path, len(matched),
                        _summary(missing), _summary(unexpected))
        else:
            logger.info("SwinTransformer: loaded %s (%d tensors)", path, len(matched))
        return list(missing), list(unexpected)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, hw = self.patch_embed(x)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.reshape(-1, *out_hw, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return outs


def _summary(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _resize_bias_table(table: torch.Tensor, current: torch.Tensor, key: str) -> torch.Tensor:
    """Bicubic resize of a pretrained (L1, nH) bias table to the current (L2, nH) (other window sizes)."""
    (l1, h1), (l2, h2) = table.shape, current.shape
    if h1 != h2:
        logger.warning("SwinTransformer: %s has %d heads in the checkpoint, %d here; not loaded", key, h1, h2)
        return current
    if l1 == l2:
        return table
    s1, s2 = int(l1 ** 0.5), int(l2 ** 0.5)
    resized = F.interpolate(table.permute(1, 0).reshape(1, h1, s1, s1).float(), size=(s2, s2), mode="bicubic")
    return resized.view(h2, l2).permute(1, 0).contiguous().to(table.dtype)


def _unfold_order_from_slices(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Original-Swin PatchMerging order (k·C + c, k = h0w0, h1w0, h0w1, h1w1) → Unfold order (c·4 + k',
    k' = h0w0, h0w1, h1w0, h1w1) along `dim` (the 4C axis)."""
    v = v.movedim(dim, 0)
    c4 = v.shape[0]
    v = v.reshape(4, c4 // 4, *v.shape[1:])[[0, 2, 1, 3]]  # slice blocks in Unfold's k' order
    v = v.transpose(0, 1).reshape(c4, *v.shape[2:])  # index c·4 + k'
    return v.movedim(0, dim).contiguous()


def convert_original_swin(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Swin-repo keys → mmdet keys (and PatchMerging weights → Unfold order); the classifier is dropped."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, v in state.items():
        if key.startswith("head.") or key.endswith("attn_mask") or key.startswith("norm."):
            continue  # classifier, cached masks, final classification norm: nothing to load them into
        new = key
        if key.startswith("layers."):
            if ".attn." in key:
                new = key.replace(".attn.", ".attn.w_msa.")
            elif ".mlp.fc1." in key:
                new = key.replace(".mlp.fc1.", ".ffn.layers.0.0.")
            elif ".mlp.fc2." in key:
                new = key.replace(".mlp.fc2.", ".ffn.layers.1.")
            elif ".downsample.reduction." in key:
                v = _unfold_order_from_slices(v, 1)
            elif ".downsample.norm." in key:
                v = _unfold_order_from_slices(v, 0)
            new = "stages." + new[len("layers."):]
        elif key.startswith("patch_embed.proj."):
            new = "patch_embed.projection." + key[len("patch_embed.proj."):]
        out[new] = v
    return out


def swin_state_dict(ckpt: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """The Swin backbone weights of a checkpoint, with our (mmdet) keys.

    Accepts `{state_dict: ...}` (mmcv), `{model: ...}` (Swin repo) or a plain state dict; keeps the
    `encoders.camera.backbone.` (BEVFusion) or `backbone.` (mmdet detector) part when present, strips a
    DDP `module.` prefix, and converts original Swin-repo keys (`layers.*`).
    """
    state = backbone_state_dict(ckpt)
    if any(k.startswith("layers.") for k in state):
        state = convert_original_swin(state)
    return state

"""Functional sparse convolutions with autograd, and the dataflow dispatch.

impl names:
  "auto"           CPU: rule-based choice between "gather" and "im2col"; CUDA: the autotuner (tune.py)
  "gather"         torch gather-GEMM-scatter per kernel offset (any device)
  "im2col"         torch blocked output-stationary im2col + GEMM (any device)
  "reference"      the pair-loop oracle (reference.py)
  "triton_igemm"   Triton implicit GEMM (fwd and dgrad) + Triton wgrad
  "triton_gather"  Triton gather-GEMM-scatter (fwd and dgrad) + Triton wgrad
  "triton"         the autotuner restricted to Triton dataflows on CUDA; implicit GEMM elsewhere
                   (e.g. CPU tensors under TRITON_INTERPRET=1)
"""
from __future__ import annotations

import torch

from . import cpu, tune
from .kmap import KernelMap, build_conv_kmap, build_subm_kmap, find_inverse, register_inverse
from .reference import pair_loop_conv
from .tensor import SparseTensor, _triple

IMPLS = ("auto", "gather", "im2col", "reference", "triton_igemm", "triton_gather", "triton")


def _run(name: str, cfg, feats, weight, kmap):
    if name == "gather":
        return cpu.gather_gemm_scatter(feats, weight, kmap)
    if name == "im2col":
        return cpu.im2col_gemm(feats, weight, kmap)
    if name == "reference":
        return pair_loop_conv(feats, weight, kmap)
    from . import triton as tk

    if name == "triton_igemm":
        return tk.igemm(feats, weight, kmap, cfg)
    if name == "triton_gather":
        return tk.gather_scatter(feats, weight, kmap, cfg)
    raise ValueError(f"sparse conv: unknown impl {name!r} (expected one of {IMPLS})")


def _run_wgrad(name: str, cfg, feats, grad_out, kmap):
    if name in ("gather", "reference"):
        return cpu.wgrad_gather(feats, grad_out, kmap)
    if name == "im2col":
        return cpu.wgrad_im2col(feats, grad_out, kmap)
    from . import triton as tk

    return tk.wgrad(feats, grad_out, kmap, cfg)


def _resolve(direction: str, impl: str, feats, weight, kmap, wgrad_of=None):
    """Pick (name, config) for one call."""
    if impl not in IMPLS:
        raise ValueError(f"sparse conv: unknown impl {impl!r} (expected one of {IMPLS})")
    if impl in ("gather", "im2col", "reference", "triton_igemm", "triton_gather"):
        if direction == "wgrad" and impl.startswith("triton"):
            return "triton_wgrad", None
        return impl, None
    on_cuda = feats.device.type == "cuda"
    if impl == "triton" and not on_cuda:
        return ("triton_wgrad" if direction == "wgrad" else "triton_igemm"), None
    if direction == "wgrad":
        g = wgrad_of

        def run(name, cfg):
            return _run_wgrad(name, cfg, feats, g, kmap)
    else:
        def run(name, cfg):
            return _run(name, cfg, feats, weight, kmap)
    name, cfg = tune.choose(direction, feats, weight, kmap, run)
    if impl == "triton" and not name.startswith("triton"):
        name, cfg = ("triton_wgrad", None) if direction == "wgrad" else ("triton_igemm", None)
    return name, cfg


def _forward(feats, weight, kmap, impl):
    name, cfg = _resolve("fwd", impl, feats, weight, kmap)
    return _run(name, cfg, feats, weight, kmap)


class SparseConvFunction(torch.autograd.Function):
    """out = conv(feats) along `kmap` with weight (K, Cin, Cout); grads for feats and weight."""

    @staticmethod
    def forward(ctx, feats, weight, kmap: KernelMap, impl: str):
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        ctx.impl = impl
        return _forward(feats, weight, kmap, impl)

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        kmap, impl = ctx.kmap, ctx.impl
        grad_out = grad_out.contiguous()
        gf = gw = None
        if ctx.needs_input_grad[0]:
            kt = kmap.transposed()
            wt = weight.transpose(1, 2)  # (K, Cout, Cin) view
            name, cfg = _resolve("dgrad", impl, grad_out, wt, kt)
            gf = _run(name, cfg, grad_out, wt, kt)
        if ctx.needs_input_grad[1]:
            name, cfg = _resolve("wgrad", impl, feats, weight, kmap, wgrad_of=grad_out)
            gw = _run_wgrad(name, cfg, feats, grad_out, kmap)
        return gf, gw, None, None


def conv_features(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, impl: str = "auto") -> torch.Tensor:
    """Apply weight (K, Cin, Cout) along a kernel map: (n_in, Cin) -> (n_out, Cout)."""
    if weight.dim() != 3 or weight.shape[0] != kmap.kernel_volume or weight.shape[1] != feats.shape[1]:
        raise ValueError(f"sparse conv: weight {tuple(weight.shape)} does not fit kernel volume "
                         f"{kmap.kernel_volume} and {feats.shape[1]} input channels")
    dev = feats.device.type
    if feats.is_floating_point() and torch.is_autocast_enabled(dev):
        # Like F.conv3d under autocast: compute in the autocast dtype (e.g. fp16 on CUDA), whatever the
        # dtype of the voxel features and of the (fp32 master) weight.
        feats = feats.to(torch.get_autocast_dtype(dev))
    if weight.dtype != feats.dtype:
        weight = weight.to(feats.dtype)
    with torch.autocast(dev, enabled=False):  # every dataflow then computes in feats' dtype, none re-casts
        return SparseConvFunction.apply(feats, weight, kmap, impl)


def _bias(out: torch.Tensor, bias):
    return out if bias is None else out + bias.to(out.dtype)


def subm_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size, dilation=1, bias=None,
                impl: str = "auto") -> SparseTensor:
    """Submanifold conv: outputs exactly at x's sites, kernel centred. weight (K, Cin, Cout)."""
    kmap = build_subm_kmap(x, kernel_size, dilation)
    out = _bias(conv_features(x.feats, weight, kmap, impl), bias)
    return x.replace_feature(out)


def sparse_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, bias=None,
                  impl: str = "auto") -> SparseTensor:
    """Strided/padded sparse conv with spconv's active-site rule; outputs sorted by (batch, x, y, z)."""
    kmap, coords, shape, cid = build_conv_kmap(x, kernel_size, stride, padding, dilation)
    out = _bias(conv_features(x.feats, weight, kmap, impl), bias)
    st = tuple(a * b for a, b in zip(x.stride, _triple(stride)))
    y = SparseTensor(out, coords, shape, st, x.batch_size, check=False, _cache=x.cache, _coord_id=cid)
    register_inverse(x, y, kernel_size, stride, padding, dilation, kmap)
    return y


def sparse_inverse_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                          bias=None, impl: str = "auto") -> SparseTensor:
    """Inverse of the SparseConv3d (same kernel_size/stride/padding/dilation) that produced x: outputs at
    that conv's input sites, out[i] += x[o] @ weight[k] for each of its pairs (i, o, k), i.e. a
    transposed conv restricted to the finer sites."""
    kmap, coords, shape, cid, st = find_inverse(x, kernel_size, stride, padding, dilation)
    out = _bias(conv_features(x.feats, weight, kmap, impl), bias)
    return SparseTensor(out, coords, shape, st, x.batch_size, check=False, _cache=x.cache, _coord_id=cid)

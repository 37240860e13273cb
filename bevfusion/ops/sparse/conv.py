"""Functional sparse convolutions with autograd, and the choice of backend and dataflow.

Every conv takes two names:

impl (the backend, as every op: `bevfusion.ops._dispatch`):
  "auto"       "triton" for CUDA tensors, "cpu" otherwise
  "reference"  the pair-loop oracle (reference.py), any device
  "cpu"        the torch dataflows of dataflows.py on CPU tensors
  "triton"     the Triton kernels of triton.py (CUDA; CPU tensors under TRITON_INTERPRET=1)

dataflow (how the pairs are walked; `DATAFLOWS[impl]` lists what each backend has):
  "auto"       cpu: the rule in tune.py (im2col, or gather for a 1x1x1 kernel); triton: the CUDA
               autotuner (tune.py), implicit GEMM on CPU tensors (interpreter)
  "gather"     gather-GEMM-scatter per kernel offset (cpu: torch ops; triton: fp32 atomics)
  "im2col"     output-stationary blocked im2col over the sorted map (cpu)
  "igemm"      implicit GEMM over the neighbour table (triton)

impl="auto" with dataflow="auto" on CUDA lets the autotuner also time the torch gather dataflow (the only
candidate for float64, which the Triton kernels do not take); impl="triton" keeps to Triton kernels. The
weight gradient of a Triton dataflow is the Triton wgrad kernel; of a torch dataflow, its torch twin.
An unknown name, or a dataflow the backend does not have, raises ValueError naming both lists.

Kernel maps are built with impl="auto" (kmap.py), whatever the conv's impl: they are cached on the input's
`KernelMapCache` and shared by every layer of the same geometry.
"""
from __future__ import annotations

import torch

from .._dispatch import BACKENDS, resolve_impl
from . import dataflows, tune
from .kmap import KernelMap, build_conv_kmap, build_subm_kmap, find_inverse, register_inverse
from .reference import pair_loop_conv, pair_loop_wgrad
from .tensor import SparseTensor, _triple

__all__ = ["IMPLS", "DATAFLOWS", "conv_features", "subm_conv3d", "sparse_conv3d", "sparse_inverse_conv3d"]

IMPLS = BACKENDS
DATAFLOWS = {"auto": ("auto", "gather", "im2col", "igemm"), "reference": ("auto",),
             "cpu": ("auto", "gather", "im2col"), "triton": ("auto", "igemm", "gather")}


def _run(kernel: str, cfg, feats, weight, kmap):
    """Forward (and dgrad, on the transposed map) of one kernel: "reference", "torch.<dataflow>" or
    "triton.<dataflow>"."""
    if kernel == "reference":
        return pair_loop_conv(feats, weight, kmap)
    if kernel == "torch.gather":
        return dataflows.gather_gemm_scatter(feats, weight, kmap)
    if kernel == "torch.im2col":
        return dataflows.im2col_gemm(feats, weight, kmap)
    from . import triton as tk

    if kernel == "triton.igemm":
        return tk.igemm(feats, weight, kmap, cfg)
    if kernel == "triton.gather":
        return tk.gather_scatter(feats, weight, kmap, cfg)
    raise AssertionError(f"sparse conv: no forward kernel {kernel!r}")


def _run_wgrad(kernel: str, cfg, feats, grad_out, kmap):
    if kernel == "reference":
        return pair_loop_wgrad(feats, grad_out, kmap)
    if kernel == "torch.gather":
        return dataflows.wgrad_gather(feats, grad_out, kmap)
    if kernel == "torch.im2col":
        return dataflows.wgrad_im2col(feats, grad_out, kmap)
    from . import triton as tk

    return tk.wgrad(feats, grad_out, kmap, cfg)


def check_names(impl: str, dataflow: str) -> None:
    """ValueError unless `impl` is a backend and `dataflow` one of its dataflows (device not checked)."""
    if impl not in IMPLS:
        raise ValueError(f"sparse conv: impl must be one of {IMPLS}, got {impl!r}")
    if dataflow not in DATAFLOWS[impl]:
        known = sorted({d for flows in DATAFLOWS.values() for d in flows})
        what = "unknown dataflow" if dataflow not in known else f"impl={impl!r} has no dataflow"
        raise ValueError(f"sparse conv: {what} {dataflow!r}; dataflows per impl: "
                         + ", ".join(f"{b}: {flows}" for b, flows in DATAFLOWS.items()))


def _resolve(direction: str, impl: str, dataflow: str, feats, weight, kmap, wgrad_of=None):
    """(kernel, config) for one call: direction "fwd", "dgrad" or "wgrad" (names checked by the caller)."""
    backend = resolve_impl("sparse conv", impl, feats.device)
    if dataflow not in DATAFLOWS[backend]:  # impl="auto" resolved to a backend without this dataflow
        raise ValueError(f"sparse conv: impl={impl!r} runs {backend!r} on {feats.device.type} tensors, which has no "
                         f"dataflow {dataflow!r} (its dataflows: {DATAFLOWS[backend]})")
    if backend == "reference":
        return "reference", None
    if backend == "cpu":
        flow = tune.cpu_choice(direction, feats, weight, kmap) if dataflow == "auto" else dataflow
        return f"torch.{flow}", None
    if dataflow != "auto":
        return ("triton.wgrad" if direction == "wgrad" else f"triton.{dataflow}"), None
    if feats.device.type != "cuda":  # the interpreter: no timing
        return ("triton.wgrad" if direction == "wgrad" else "triton.igemm"), None
    if direction == "wgrad":
        def run(name, cfg):
            return _run_wgrad(name, cfg, feats, wgrad_of, kmap)
    else:
        def run(name, cfg):
            return _run(name, cfg, feats, weight, kmap)
    return tune.choose(direction, feats, weight, kmap, run, with_torch=impl == "auto")


class SparseConvFunction(torch.autograd.Function):
    """out = conv(feats) along `kmap` with weight (K, Cin, Cout); grads for feats and weight."""

    @staticmethod
    def forward(ctx, feats, weight, kmap: KernelMap, impl: str, dataflow: str):
        ctx.save_for_backward(feats, weight)
        ctx.kmap, ctx.impl, ctx.dataflow = kmap, impl, dataflow
        name, cfg = _resolve("fwd", impl, dataflow, feats, weight, kmap)
        return _run(name, cfg, feats, weight, kmap)

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        kmap, impl, dataflow = ctx.kmap, ctx.impl, ctx.dataflow
        grad_out = grad_out.contiguous()
        gf = gw = None
        if ctx.needs_input_grad[0]:
            kt = kmap.transposed()
            wt = weight.transpose(1, 2)  # (K, Cout, Cin) view
            name, cfg = _resolve("dgrad", impl, dataflow, grad_out, wt, kt)
            gf = _run(name, cfg, grad_out, wt, kt)
        if ctx.needs_input_grad[1]:
            name, cfg = _resolve("wgrad", impl, dataflow, feats, weight, kmap, wgrad_of=grad_out)
            gw = _run_wgrad(name, cfg, feats, grad_out, kmap)
        return gf, gw, None, None, None


def conv_features(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, impl: str = "auto",
                  dataflow: str = "auto") -> torch.Tensor:
    """Apply weight (K, Cin, Cout) along a kernel map: (n_in, Cin) -> (n_out, Cout). impl and dataflow:
    see the module docstring."""
    check_names(impl, dataflow)
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
        return SparseConvFunction.apply(feats, weight, kmap, impl, dataflow)


def _bias(out: torch.Tensor, bias):
    return out if bias is None else out + bias.to(out.dtype)


def subm_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size, dilation=1, bias=None,
                impl: str = "auto", dataflow: str = "auto") -> SparseTensor:
    """Submanifold conv: outputs exactly at x's sites, kernel centred. weight (K, Cin, Cout)."""
    check_names(impl, dataflow)
    kmap = build_subm_kmap(x, kernel_size, dilation)
    out = _bias(conv_features(x.feats, weight, kmap, impl, dataflow), bias)
    return x.replace_feature(out)


def sparse_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, bias=None,
                  impl: str = "auto", dataflow: str = "auto") -> SparseTensor:
    """Strided/padded sparse conv with spconv's active-site rule; outputs sorted by (batch, x, y, z)."""
    check_names(impl, dataflow)
    kmap, coords, shape, cid = build_conv_kmap(x, kernel_size, stride, padding, dilation)
    out = _bias(conv_features(x.feats, weight, kmap, impl, dataflow), bias)
    st = tuple(a * b for a, b in zip(x.stride, _triple(stride)))
    y = SparseTensor(out, coords, shape, st, x.batch_size, check=False, _cache=x.cache, _coord_id=cid)
    register_inverse(x, y, kernel_size, stride, padding, dilation, kmap)
    return y


def sparse_inverse_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                          bias=None, impl: str = "auto", dataflow: str = "auto") -> SparseTensor:
    """Inverse of the SparseConv3d (same kernel_size/stride/padding/dilation) that produced x: outputs at
    that conv's input sites, out[i] += x[o] @ weight[k] for each of its pairs (i, o, k), i.e. a
    transposed conv restricted to the finer sites."""
    check_names(impl, dataflow)
    kmap, coords, shape, cid, st = find_inverse(x, kernel_size, stride, padding, dilation)
    out = _bias(conv_features(x.feats, weight, kmap, impl, dataflow), bias)
    return SparseTensor(out, coords, shape, st, x.batch_size, check=False, _cache=x.cache, _coord_id=cid)

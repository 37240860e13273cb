"""Triton kernels: implicit GEMM (output-stationary, reads the neighbour table) and
gather-GEMM-scatter (pair blocks, fp32 atomics), plus the weight-gradient kernel.

All accumulate in fp32; inputs may be fp16, bf16 or fp32 (fp32 uses IEEE products, like spconv's
default, not TF32). Dataflow names: "igemm", "gather" (forward and dgrad) and "wgrad". `candidates`
lists the configs the CUDA autotuner (tune.py) times. This module imports triton at import time;
`bevfusion.ops.sparse` imports it only when a Triton path is requested.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kmap import KernelMap

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _igemm_kernel(x_ptr, w_ptr, nb_ptr, rows_ptr, out_ptr, N, K, CIN, COUT,
                  stride_wk, stride_wc, stride_wn,
                  USE_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    mmask = m < N
    if USE_ROWS:
        rows = tl.load(rows_ptr + m, mask=mmask, other=0).to(tl.int64)
    else:
        rows = m.to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < COUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K):
        nb = tl.load(nb_ptr + rows * K + k, mask=mmask, other=-1)
        if tl.max(nb, axis=0) >= 0:  # skip offsets that no row of this block uses
            valid = nb >= 0
            src = nb.to(tl.int64)
            for c0 in range(0, CIN, BK):
                c = c0 + tl.arange(0, BK)
                cmask = c < CIN
                a = tl.load(x_ptr + src[:, None] * CIN + c[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
                b = tl.load(w_ptr + k * stride_wk + c[:, None] * stride_wc + n[None, :] * stride_wn,
                            mask=cmask[:, None] & nmask[None, :], other=0.0)
                acc += tl.dot(a, b, input_precision=PREC)
    tl.store(out_ptr + rows[:, None] * COUT + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gather_scatter_kernel(x_ptr, w_ptr, in_ptr, outi_ptr, blk_k_ptr, blk_s_ptr, blk_e_ptr, out_ptr, CIN, COUT,
                           stride_wk, stride_wc, stride_wn,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = tl.load(blk_k_ptr + pid).to(tl.int64)
    start = tl.load(blk_s_ptr + pid)
    end = tl.load(blk_e_ptr + pid)
    p = start + tl.arange(0, BM)
    pmask = p < end
    src = tl.load(in_ptr + p, mask=pmask, other=0).to(tl.int64)
    dst = tl.load(outi_ptr + p, mask=pmask, other=0).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < COUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, CIN, BK):
        c = c0 + tl.arange(0, BK)
        cmask = c < CIN
        a = tl.load(x_ptr + src[:, None] * CIN + c[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
        b = tl.load(w_ptr + k * stride_wk + c[:, None] * stride_wc + n[None, :] * stride_wn,
                    mask=cmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PREC)
    tl.atomic_add(out_ptr + dst[:, None] * COUT + n[None, :], acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _wgrad_kernel(x_ptr, g_ptr, in_ptr, outi_ptr, blk_k_ptr, blk_s_ptr, blk_e_ptr, dw_ptr, CIN, COUT,
                  BP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_n = tl.program_id(2)
    k = tl.load(blk_k_ptr + pid).to(tl.int64)
    start = tl.load(blk_s_ptr + pid)
    end = tl.load(blk_e_ptr + pid)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < CIN
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < COUT
    acc = tl.zeros((BC, BN), dtype=tl.float32)
    for p0 in range(start, end, BP):
        p = p0 + tl.arange(0, BP)
        pmask = p < end
        src = tl.load(in_ptr + p, mask=pmask, other=0).to(tl.int64)
        dst = tl.load(outi_ptr + p, mask=pmask, other=0).to(tl.int64)
        a = tl.load(x_ptr + src[:, None] * CIN + c[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
        g = tl.load(g_ptr + dst[:, None] * COUT + n[None, :], mask=pmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(a), g, input_precision=PREC)
    tl.atomic_add(dw_ptr + k * CIN * COUT + c[:, None] * COUT + n[None, :], acc,
                  mask=cmask[:, None] & nmask[None, :])


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


def block_k(cin: int, dtype) -> int:
    """K chunk of the implicit GEMM and gather-scatter. float32 runs `tl.dot` as IEEE FMAs (no tensor
    cores): each thread holds its rows and columns of the whole chunk in registers, and BK=32 spills
    (up to 56 B per thread in the implicit GEMM, ~1 KB in gather-scatter, see docs/PERFORMANCE.md), so
    float32 takes 16; fp16 / bf16 (tensor cores) take up to 32."""
    return 16 if dtype == torch.float32 else _pow2(cin, 16, 32)


def default_config(dataflow: str, cin: int, cout: int, dtype=torch.float32) -> dict:
    """A reasonable config without tuning (also what the interpreter uses), for inputs of `dtype`.
    Implicit GEMM in float32: one stage (with 2 the sm_90 / triton 3.6 build of the transposed-weight
    dgrad tile spills); every config here compiles without spills for sm_80 and sm_90 with triton 3.6
    and 3.9 (tests/ops/test_triton_compile.py)."""
    if dataflow == "wgrad":
        return dict(BP=64, BC=_pow2(cin, 16, 64), BN=_pow2(cout, 16, 64), CHUNK=4096, num_warps=4, num_stages=2)
    stages = 1 if dataflow == "igemm" and dtype == torch.float32 else 2
    cfg = dict(BM=64, BN=_pow2(cout, 16, 64), BK=block_k(cin, dtype), num_warps=4, num_stages=stages)
    if dataflow == "igemm":
        cfg["SORTED"] = False
    return cfg


# Implicit-GEMM candidates (BM, num_warps, num_stages, SORTED) per input dtype. Which launch spills is
# ptxas's register allocation on each triton version's code, not a smooth function of the tile: these are
# the configs that compile without spills for sm_80 and sm_90 with triton 3.6 and 3.9 for every block size
# (tests/ops/test_triton_compile.py; docs/PERFORMANCE.md). float32 (FMA, BK=16): BM=64 on 4 warps spills
# with 2 or 3 stages somewhere, so 8 warps or BM=32; fp16 / bf16 (tensor cores): as measured on the H200.
_IGEMM_FP32 = ((64, 8, 2, True), (64, 8, 3, False), (64, 4, 1, False), (32, 4, 1, True), (32, 4, 3, True),
               (32, 4, 2, False))
_IGEMM_HALF = tuple((bm, warps, stages, srt) for bm, warps, stages in ((64, 4, 2), (128, 4, 3), (128, 8, 3))
                    for srt in (False, True))


def candidates(direction: str, cin: int, cout: int, dtype=torch.float32) -> list[tuple[str, dict]]:
    """(dataflow, config) candidates for a layer (Cin, Cout) in `direction` ("fwd", "dgrad" or "wgrad") on
    inputs of `dtype` (for dgrad: the transposed weight, Cin and Cout of the GEMM it runs)."""
    if direction == "wgrad":
        base = default_config("wgrad", cin, cout, dtype)
        out = [("wgrad", base)]
        for chunk, bp, warps in ((2048, 64, 4), (8192, 128, 8)):
            out.append(("wgrad", dict(base, CHUNK=chunk, BP=bp, num_warps=warps)))
        return out
    out = []
    bn = default_config("igemm", cin, cout, dtype)["BN"]
    bk = block_k(cin, dtype)
    for bm, warps, stages, srt in (_IGEMM_FP32 if dtype == torch.float32 else _IGEMM_HALF):
        k = bk
        if direction == "dgrad" and (bm, warps, bn, bk) == (128, 4, 64, 32):
            k = 16  # fp16 / bf16 dgrad, transposed weight: the 128 x 32 x 64 tile on 4 warps spills on sm_80 (3.9)
        out.append(("igemm", dict(BM=bm, BN=bn, BK=k, SORTED=srt, num_warps=warps, num_stages=stages)))
    for bm, stages in ((64, 2), (128, 1 if dtype == torch.float32 else 2)):  # float32 BM=128: 2 stages spill (3.6)
        out.append(("gather", dict(BM=bm, BN=bn, BK=bk, num_warps=4, num_stages=stages)))
    return out


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else None


# Kernel keyword arguments (constexprs, num_warps, num_stages) from a config: read by the launchers
# and by `aot_variants`.
def _igemm_meta(cfg: dict, dtype) -> dict:
    return dict(USE_ROWS=bool(cfg.get("SORTED")), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], PREC=_prec(dtype),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _gather_meta(cfg: dict, dtype) -> dict:
    return dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], PREC=_prec(dtype), num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _wgrad_meta(cfg: dict, dtype) -> dict:
    return dict(BP=cfg["BP"], BC=cfg["BC"], BN=cfg["BN"], PREC=_prec(dtype), num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _aot_channels() -> list[int]:
    """Channel counts that reach every distinct block size of `default_config` as Cin or as Cout: per
    distinct set of block sizes, its smallest power of two from 16 up (as the SparseEncoder's widths)."""
    groups: dict = {}
    for c in (2**k for k in range(4, 11)):
        key = tuple(tuple(sorted(default_config(flow, c, c, dtype).items()))
                    for flow in ("igemm", "wgrad") for dtype in SUPPORTED_DTYPES)
        groups.setdefault(key, c)
    return sorted(groups.values())


# The SparseEncoder's input layer: 5 LiDAR point features (a count that is not a multiple of 16) -> 16.
AOT_INPUT_LAYER = (5, 16)


def _aot_launches(direction: str, cin: int, cout: int, dtype) -> list[tuple[str, dict]]:
    """(dataflow, config) pairs a layer (Cin, Cout) can run in `direction` on `dtype` inputs: the
    autotuner's candidates and the untuned defaults (dataflow="igemm" / "gather" pass no config)."""
    if direction == "wgrad":
        return candidates("wgrad", cin, cout, dtype) + [("wgrad", default_config("wgrad", cin, cout, dtype))]
    return candidates(direction, cin, cout, dtype) + [("igemm", default_config("igemm", cin, cout, dtype)),
                                                      ("gather", default_config("gather", cin, cout, dtype))]


def aot_variants() -> list:
    """Every launch the launchers below can make on a GPU, for `bevfusion.ops.triton_aot`: each supported
    dtype x forward / dgrad / wgrad x channel pairs reaching every block size x each config of
    `_aot_launches`. dgrad runs the forward kernels on (grad_out, weight.transpose(1, 2)): Cin and Cout
    swap and the weight is a transposed view (unit stride along Cin instead of Cout)."""
    from ..triton_aot import I32, I64, launch, ptr

    chans = _aot_channels()
    pairs = [(a, b) for a in chans for b in chans] + [AOT_INPUT_LAYER]
    out = []
    for dtype in SUPPORTED_DTYPES:
        f = ptr(dtype)
        for cin, cout in pairs:
            for direction in ("fwd", "dgrad", "wgrad"):
                if direction == "fwd":  # weight (K, Cin, Cout), contiguous
                    kin, kout, strides = cin, cout, (cin * cout, cout, 1)
                else:  # dgrad: weight.transpose(1, 2), (K, Cout, Cin) with strides (Cin*Cout, 1, Cin)
                    kin, kout, strides = cout, cin, (cin * cout, 1, cin)
                w = dict(stride_wk=strides[0], stride_wc=strides[1], stride_wn=strides[2])
                for name, cfg in _aot_launches(direction, kin, kout, dtype):
                    tag = f"{f[1:]} {direction} {cin}->{cout} " + " ".join(
                        f"{k}={v}" for k, v in cfg.items() if k != "CHUNK")
                    if name == "igemm":
                        v = launch("sparse", _igemm_kernel, tag, hot=True, meta=_igemm_meta(cfg, dtype),
                                   args=dict(x_ptr=f, w_ptr=f, nb_ptr=I32, rows_ptr=I32, out_ptr=f, N="i32", K=27,
                                             CIN=kin, COUT=kout, **w))
                    elif name == "gather":
                        v = launch("sparse", _gather_scatter_kernel, tag, hot=False, meta=_gather_meta(cfg, dtype),
                                   args=dict(x_ptr=f, w_ptr=f, in_ptr=I64, outi_ptr=I64, blk_k_ptr=I64,
                                             blk_s_ptr=I64, blk_e_ptr=I64, out_ptr="*fp32", CIN=kin, COUT=kout,
                                             **w))
                    elif name == "wgrad":
                        v = launch("sparse", _wgrad_kernel, tag, hot=False, meta=_wgrad_meta(cfg, dtype),
                                   args=dict(x_ptr=f, g_ptr=f, in_ptr=I64, outi_ptr=I64, blk_k_ptr=I64,
                                             blk_s_ptr=I64, blk_e_ptr=I64, dw_ptr="*fp32", CIN=cin, COUT=cout))
                    else:
                        raise ValueError(f"sparse aot_variants: unknown dataflow {name!r} from _aot_launches")
                    out.append(v)
    return out


def _block_table(kmap: KernelMap, block: int, device):
    """Per-program (offset, start, end) over the pair list, blocks never straddling two offsets."""
    key = ("blocks", block, str(device))
    hit = kmap._lazy.get(key)
    if hit is None:
        import numpy as np

        ptr = np.asarray(kmap.ptr, dtype=np.int64)
        nblk = -(-(ptr[1:] - ptr[:-1]) // block)  # blocks per offset
        ks = np.repeat(np.arange(kmap.kernel_volume, dtype=np.int64), nblk)
        first = np.repeat(np.cumsum(nblk) - nblk, nblk)  # index of each offset's first block
        ss = ptr[:-1][ks] + (np.arange(ks.size, dtype=np.int64) - first) * block
        es = np.minimum(ss + block, ptr[1:][ks])
        t = torch.from_numpy(np.stack([ks, ss, es]))
        if torch.device(device).type == "cuda":  # pinned + non_blocking: no stream sync
            t = t.pin_memory().to(device, non_blocking=True)
        hit = (t[0].contiguous(), t[1].contiguous(), t[2].contiguous())
        kmap._lazy[key] = hit
    return hit


def _check(feats: torch.Tensor, weight: torch.Tensor) -> None:
    if feats.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton sparse conv supports {SUPPORTED_DTYPES}, got {feats.dtype}")


def igemm(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, config: dict | None = None) -> torch.Tensor:
    """Implicit GEMM forward: out (n_out, Cout) in feats' dtype, no (N, K, C) intermediate."""
    _check(feats, weight)
    cin, cout = weight.shape[1], weight.shape[2]
    cfg = config or default_config("igemm", cin, cout, feats.dtype)
    feats = feats.contiguous()
    out = feats.new_empty(kmap.n_out, cout)
    if kmap.n_out == 0:
        return out
    if kmap.n_in == 0 or kmap.num_pairs == 0:
        return out.zero_()
    nb = kmap.nbmap()
    rows = kmap.sorted_rows(torch.int32) if cfg.get("SORTED") else nb
    grid = (triton.cdiv(kmap.n_out, cfg["BM"]), triton.cdiv(cout, cfg["BN"]))
    _igemm_kernel[grid](feats, weight, nb, rows, out, kmap.n_out, kmap.kernel_volume, cin, cout,
                        weight.stride(0), weight.stride(1), weight.stride(2),
                        **_igemm_meta(cfg, feats.dtype))
    return out


def gather_scatter(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
                   config: dict | None = None) -> torch.Tensor:
    """Gather-GEMM-scatter forward over pair blocks, fp32 atomics into the output."""
    _check(feats, weight)
    cin, cout = weight.shape[1], weight.shape[2]
    cfg = config or default_config("gather", cin, cout, feats.dtype)
    feats = feats.contiguous()
    acc = torch.zeros(kmap.n_out, cout, dtype=torch.float32, device=feats.device)
    if kmap.num_pairs:
        bk, bs, be = _block_table(kmap, cfg["BM"], feats.device)
        grid = (bk.numel(), triton.cdiv(cout, cfg["BN"]))
        _gather_scatter_kernel[grid](feats, weight, kmap.in_idx, kmap.out_idx, bk, bs, be, acc, cin, cout,
                                     weight.stride(0), weight.stride(1), weight.stride(2),
                                     **_gather_meta(cfg, feats.dtype))
    return acc.to(feats.dtype)


def wgrad(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap, config: dict | None = None) -> torch.Tensor:
    """dW (K, Cin, Cout) in feats' dtype, fp32 accumulation over pair chunks."""
    _check(feats, feats)
    cin, cout = feats.shape[1], grad_out.shape[1]
    cfg = config or default_config("wgrad", cin, cout, feats.dtype)
    feats = feats.contiguous()
    grad_out = grad_out.contiguous()
    dw = torch.zeros(kmap.kernel_volume, cin, cout, dtype=torch.float32, device=feats.device)
    if kmap.num_pairs:
        bk, bs, be = _block_table(kmap, cfg["CHUNK"], feats.device)
        grid = (bk.numel(), triton.cdiv(cin, cfg["BC"]), triton.cdiv(cout, cfg["BN"]))
        _wgrad_kernel[grid](feats, grad_out, kmap.in_idx, kmap.out_idx, bk, bs, be, dw, cin, cout,
                            **_wgrad_meta(cfg, feats.dtype))
    return dw.to(feats.dtype)

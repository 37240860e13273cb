"""Triton kernels: implicit GEMM (output-stationary, reads the neighbour table) and
gather-GEMM-scatter (pair blocks, fp32 atomics), plus the weight-gradient kernel.

All accumulate in fp32; inputs may be fp16, bf16 or fp32 (fp32 uses IEEE products, like spconv's
default, not TF32). This module imports triton at import time; `bevfusion.ops.sparse` imports it only
when a Triton path is requested.
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


def default_config(dataflow: str, cin: int, cout: int) -> dict:
    """A reasonable config without tuning (also what the interpreter uses)."""
    if dataflow == "wgrad":
        return dict(BP=64, BC=_pow2(cin, 16, 64), BN=_pow2(cout, 16, 64), CHUNK=4096, num_warps=4, num_stages=2)
    cfg = dict(BM=64, BN=_pow2(cout, 16, 64), BK=_pow2(cin, 16, 32), num_warps=4, num_stages=2)
    if dataflow == "igemm":
        cfg["SORTED"] = False
    return cfg


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else None


def _block_table(kmap: KernelMap, block: int, device):
    """Per-program (offset, start, end) over the pair list, blocks never straddling two offsets."""
    key = ("blocks", block, str(device))
    hit = kmap._lazy.get(key)
    if hit is None:
        ks, ss, es = [], [], []
        for k in range(kmap.kernel_volume):
            a, b = kmap.ptr[k], kmap.ptr[k + 1]
            for s in range(a, b, block):
                ks.append(k)
                ss.append(s)
                es.append(min(s + block, b))
        t = torch.tensor([ks, ss, es], dtype=torch.int64).to(device)
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
    cfg = config or default_config("igemm", cin, cout)
    feats = feats.contiguous()
    out = feats.new_empty(kmap.n_out, cout)
    if kmap.n_out == 0:
        return out
    if kmap.n_in == 0 or kmap.num_pairs == 0:
        return out.zero_()
    nb = kmap.nbmap()
    rows = kmap.sorted_rows() if cfg.get("SORTED") else nb
    grid = (triton.cdiv(kmap.n_out, cfg["BM"]), triton.cdiv(cout, cfg["BN"]))
    _igemm_kernel[grid](feats, weight, nb, rows, out, kmap.n_out, kmap.kernel_volume, cin, cout,
                        weight.stride(0), weight.stride(1), weight.stride(2),
                        USE_ROWS=bool(cfg.get("SORTED")), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                        PREC=_prec(feats.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def gather_scatter(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
                   config: dict | None = None) -> torch.Tensor:
    """Gather-GEMM-scatter forward over pair blocks, fp32 atomics into the output."""
    _check(feats, weight)
    cin, cout = weight.shape[1], weight.shape[2]
    cfg = config or default_config("gather", cin, cout)
    feats = feats.contiguous()
    acc = torch.zeros(kmap.n_out, cout, dtype=torch.float32, device=feats.device)
    if kmap.num_pairs:
        bk, bs, be = _block_table(kmap, cfg["BM"], feats.device)
        grid = (bk.numel(), triton.cdiv(cout, cfg["BN"]))
        _gather_scatter_kernel[grid](feats, weight, kmap.in_idx, kmap.out_idx, bk, bs, be, acc, cin, cout,
                                     weight.stride(0), weight.stride(1), weight.stride(2),
                                     BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], PREC=_prec(feats.dtype),
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return acc.to(feats.dtype)


def wgrad(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap, config: dict | None = None) -> torch.Tensor:
    """dW (K, Cin, Cout) in feats' dtype, fp32 accumulation over pair chunks."""
    _check(feats, feats)
    cin, cout = feats.shape[1], grad_out.shape[1]
    cfg = config or default_config("wgrad", cin, cout)
    feats = feats.contiguous()
    grad_out = grad_out.contiguous()
    dw = torch.zeros(kmap.kernel_volume, cin, cout, dtype=torch.float32, device=feats.device)
    if kmap.num_pairs:
        bk, bs, be = _block_table(kmap, cfg["CHUNK"], feats.device)
        grid = (bk.numel(), triton.cdiv(cin, cfg["BC"]), triton.cdiv(cout, cfg["BN"]))
        _wgrad_kernel[grid](feats, grad_out, kmap.in_idx, kmap.out_idx, bk, bs, be, dw, cin, cout,
                            BP=cfg["BP"], BC=cfg["BC"], BN=cfg["BN"], PREC=_prec(feats.dtype),
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw.to(feats.dtype)

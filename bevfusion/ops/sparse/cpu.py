"""Torch dataflows (CPU fast path; they also run on CUDA as a fallback).

Both are race-free and deterministic at any thread count: within one kernel offset every output row
receives at most one input row, so the per-offset scatter never writes a row twice, and the blocked
im2col path writes disjoint row blocks.
"""
from __future__ import annotations

import torch

from .kmap import KernelMap

# bytes of the per-block im2col buffer; about the size of a core's L2 slice
_IM2COL_BLOCK_BYTES = 1 << 21


def gather_gemm_scatter(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """out[o] = sum over pairs (i, o, k) of feats[i] @ weight[k]; weight (K, Cin, Cout), may be a view."""
    out = feats.new_zeros(kmap.n_out, weight.shape[2])
    ident = kmap.identity_offset
    if ident is not None and kmap.n_out:
        torch.mm(feats, weight[ident], out=out)
    for k in range(kmap.kernel_volume):
        a, b = kmap.ptr[k], kmap.ptr[k + 1]
        if b == a or k == ident:
            continue
        buf = feats.index_select(0, kmap.in_idx[a:b]) @ weight[k]
        out.index_add_(0, kmap.out_idx[a:b], buf)
    return out


def _im2col_plan(kmap: KernelMap):
    """Active offsets and the (n_out, K') neighbour table with missing entries pointing at a zero row."""
    plan = kmap._lazy.get("im2col")
    if plan is None:
        active = [k for k, c in enumerate(kmap.counts()) if c > 0]
        nb = kmap.nbmap()[:, active].long()
        nb = torch.where(nb < 0, torch.full_like(nb, kmap.n_in), nb)
        plan = (active, nb.contiguous())
        kmap._lazy["im2col"] = plan
    return plan


def _block_rows(width: int, elsize: int) -> int:
    return max(64, _IM2COL_BLOCK_BYTES // max(1, width * elsize))


def im2col_gemm(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Output-stationary blocked im2col: per block of output rows gather (rows, K'*Cin), one GEMM."""
    active, nb = _im2col_plan(kmap)
    cin, cout = weight.shape[1], weight.shape[2]
    out = feats.new_empty(kmap.n_out, cout)
    if not active:
        return out.zero_()
    w = weight[active].reshape(len(active) * cin, cout)
    fpad = torch.cat([feats, feats.new_zeros(1, cin)])
    rows = _block_rows(len(active) * cin, feats.element_size())
    for s in range(0, kmap.n_out, rows):
        idx = nb[s:s + rows]
        cols = fpad.index_select(0, idx.reshape(-1)).view(idx.shape[0], -1)
        torch.mm(cols, w, out=out[s:s + rows])
    return out


def wgrad_gather(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """dW[k] = feats[in_k]^T @ grad_out[out_k]; returns (K, Cin, Cout)."""
    K = kmap.kernel_volume
    dw = feats.new_zeros(K, feats.shape[1], grad_out.shape[1])
    for k in range(K):
        a, b = kmap.ptr[k], kmap.ptr[k + 1]
        if b == a:
            continue
        if k == kmap.identity_offset:
            torch.mm(feats.t(), grad_out, out=dw[k])
        else:
            torch.mm(feats.index_select(0, kmap.in_idx[a:b]).t(), grad_out.index_select(0, kmap.out_idx[a:b]),
                     out=dw[k])
    return dw


def wgrad_im2col(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Same as `wgrad_gather`, accumulated over im2col row blocks."""
    active, nb = _im2col_plan(kmap)
    K, cin, cout = kmap.kernel_volume, feats.shape[1], grad_out.shape[1]
    dw = feats.new_zeros(K, cin, cout)
    if not active:
        return dw
    acc = feats.new_zeros(len(active) * cin, cout)
    fpad = torch.cat([feats, feats.new_zeros(1, cin)])
    rows = _block_rows(len(active) * cin, feats.element_size())
    for s in range(0, kmap.n_out, rows):
        idx = nb[s:s + rows]
        cols = fpad.index_select(0, idx.reshape(-1)).view(idx.shape[0], -1)
        acc.addmm_(cols.t(), grad_out[s:s + rows])
    dw[active] = acc.view(len(active), cin, cout)
    return dw

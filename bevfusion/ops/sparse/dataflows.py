"""Torch dataflows of the sparse conv: plain torch ops, so they run on any device. The "cpu" backend of
`conv.py` runs them on CPU tensors; on CUDA the autotuner (impl="auto") may pick the gather dataflow.

  gather   per kernel offset: gather the input rows, one GEMM, scatter-add into the output rows
  im2col   output-stationary: blocks of output rows in neighbour-bitmask order
           (`KernelMap.sorted_blocks`), per block one gather of the offsets the block uses and one GEMM

Both are race-free and deterministic at any thread count: within one kernel offset every output row
receives at most one input row, so the per-offset scatter never writes a row twice, and the im2col
blocks write disjoint rows (the weight gradient sums the blocks in order).

Threads: both run in the calling thread; each GEMM and gather uses torch's intra-op threads (never changed
here). Splitting the im2col blocks over Python threads (each running torch ops) was 1.5x slower for the whole
model on 2 cores (issue 15, docs/PERFORMANCE.md): every such thread gets its own OpenMP team, whose spinning
threads then slow down the dense layers that follow.
"""
from __future__ import annotations

import torch

from .kmap import KernelMap

__all__ = ["gather_gemm_scatter", "wgrad_gather", "im2col_gemm", "wgrad_im2col", "BLOCK_ROWS"]

# Rows per im2col block. Measured on the LiDAR scene (1 thread, Cin 16..128): 256 is best or within a
# few percent at every level; smaller blocks pay per-block overhead and weight gathers, larger ones gather
# offsets that few of their rows use.
BLOCK_ROWS = 256


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


def im2col_gemm(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Output-stationary blocked im2col over the sorted map: per block, gather (rows, |A|*Cin) for the
    block's active offsets A and run one GEMM with weight[A]. Every block writes its own rows."""
    K, cin, cout = weight.shape
    out_sorted = feats.new_empty(kmap.n_out, cout)
    if kmap.n_out == 0:
        return out_sorted
    order, blocks = kmap.sorted_blocks(BLOCK_ROWS)
    fpad = torch.cat([feats, feats.new_zeros(1, cin)])
    weight = weight.contiguous()
    wflat = weight.view(K * cin, cout)

    def work(lo, hi):
        wsub: dict = {}
        for s, e, act, act_t, idx in blocks[lo:hi]:
            if idx is None:
                out_sorted[s:e].zero_()
                continue
            w = wsub.get(act)
            if w is None:
                w = wflat if len(act) == K else weight.index_select(0, act_t).view(-1, cout)
                wsub[act] = w
            cols = fpad.index_select(0, idx).view(e - s, -1)
            torch.mm(cols, w, out=out_sorted[s:e])

    work(0, len(blocks))
    out = torch.empty_like(out_sorted)
    out.index_copy_(0, order, out_sorted)
    return out


def wgrad_im2col(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Same as `wgrad_gather`, accumulated over the sorted im2col blocks in order."""
    K, cin, cout = kmap.kernel_volume, feats.shape[1], grad_out.shape[1]
    dw = feats.new_zeros(K, cin, cout)
    if kmap.n_out == 0:
        return dw
    order, blocks = kmap.sorted_blocks(BLOCK_ROWS)
    fpad = torch.cat([feats, feats.new_zeros(1, cin)])
    gs = grad_out.index_select(0, order)

    def work(lo, hi):
        acc: dict = {}
        for s, e, act, act_t, idx in blocks[lo:hi]:
            if idx is None:
                continue
            cols = fpad.index_select(0, idx).view(e - s, -1)
            a = acc.get(act)
            if a is None:
                acc[act] = (act_t, torch.mm(cols.t(), gs[s:e]))
            else:
                a[1].addmm_(cols.t(), gs[s:e])
        part = feats.new_zeros(K, cin, cout)
        for act_t, a in acc.values():
            part.index_add_(0, act_t, a.view(-1, cin, cout))
        return part

    dw += work(0, len(blocks))
    return dw

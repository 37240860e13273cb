"""CPU fast path: numba kernels for the plan and for the reductions, which walk the plan's intervals
in parallel (one cell per loop iteration, so no two threads ever write the same output row: no atomics,
no locks).

Parallelism comes from the ops' thread pool (`bevfusion.ops._threads`) running `nogil` numba kernels on
disjoint chunks, not from numba's `parallel=True`: numba's OpenMP layer and torch's OpenMP runtime are
two thread pools whose spinning workers fight over the cores (10-100x slowdowns measured on the 2-core
dev machine).

numba is imported with this module (through `bevfusion.ops._numba`), which `bevfusion.ops.bev_pool`
imports only when the CPU path is used. fp16 / bf16 inputs are widened to fp32 first (numba has no bf16
on CPU); accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _threads
from .._numba import jit, jit_reassoc
from .plan import BevPoolPlan


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _run_chunks(kernel, bounds, *args) -> None:
    """kernel(lo, hi, *args) over consecutive chunks [bounds[i], bounds[i + 1]) on the ops' thread pool."""
    _threads.run_chunks(lambda lo, hi: kernel(lo, hi, *args), [int(b) for b in bounds])


def _balanced_bounds(starts: np.ndarray, total: int, chunks: int) -> np.ndarray:
    """Interval-index boundaries of `chunks` chunks holding about the same number of points."""
    m = starts.shape[0]
    if m == 0:
        return np.zeros(1, dtype=np.int64)
    targets = np.linspace(0, total, chunks + 1)[1:-1]
    inner = np.searchsorted(starts, targets)
    return np.unique(np.concatenate([[0], inner, [m]])).astype(np.int64)


def _chunks() -> int:
    """Chunks per call: 4 per thread, so that a thread finishing early takes another."""
    threads = _threads.num_threads()
    return 1 if threads == 1 else 4 * threads


def _even_bounds(n: int) -> list[int]:
    return _threads.even_bounds(n, _chunks())


# ----------------------------------------------------------------------------- plan
@jit
def _plan(coords, batch_size, d, h, w):
    """One pass for cells and counts, a prefix sum, one scatter pass (stable bucket sort), then the
    intervals and the longest-first launch order (a bucket sort by length)."""
    n = coords.shape[0]
    g = batch_size * d * h * w
    cells = np.empty(n, dtype=np.int64)
    ptr = np.zeros(g + 1, dtype=np.int64)
    for i in range(n):
        x = np.int64(coords[i, 0])
        y = np.int64(coords[i, 1])
        z = np.int64(coords[i, 2])
        b = np.int64(coords[i, 3])
        if 0 <= x < h and 0 <= y < w and 0 <= z < d and 0 <= b < batch_size:
            c = ((b * d + z) * h + x) * w + y
            cells[i] = c
            ptr[c + 1] += 1
        else:
            cells[i] = -1
    m = 0
    max_len = 0
    for c in range(g):
        length = ptr[c + 1]
        if length > 0:
            m += 1
            if length > max_len:
                max_len = length
        ptr[c + 1] += ptr[c]
    k = ptr[g]
    order = np.empty(k, dtype=np.int64)
    ranks = np.empty(k, dtype=np.int64)
    fill = ptr[:-1].copy()
    for i in range(n):
        c = cells[i]
        if c >= 0:
            order[fill[c]] = i
            ranks[fill[c]] = c
            fill[c] += 1
    starts = np.empty(m, dtype=np.int64)
    lengths = np.empty(m, dtype=np.int64)
    icells = np.empty(m, dtype=np.int64)
    by_len = np.zeros(max_len + 2, dtype=np.int64)  # bucket pointers, longest first
    j = 0
    for c in range(g):
        length = ptr[c + 1] - ptr[c]
        by_len[max_len - length + 1] += 1
        if length > 0:
            starts[j] = ptr[c]
            lengths[j] = length
            icells[j] = c
            j += 1
    for t in range(max_len + 1):
        by_len[t + 1] += by_len[t]
    launch = np.empty(g, dtype=np.int64)
    for c in range(g):
        t = max_len - (ptr[c + 1] - ptr[c])
        launch[by_len[t]] = c
        by_len[t] += 1
    return cells, order, ranks, starts, lengths, icells, ptr, launch


def plan_arrays(coords: torch.Tensor, batch_size: int, grid):
    """The plan's tensors for CPU coords, in `BevPoolPlan` field order after num_points:
    (point_cells, order, ranks, interval_starts, interval_lengths, interval_cells, cell_ptr, launch_cells)."""
    if coords.dtype not in (torch.int32, torch.int64):
        coords = coords.long()
    d, h, w = grid
    return tuple(torch.from_numpy(a) for a in _plan(_np(coords), batch_size, d, h, w))


# ----------------------------------------------------------------------------- bev_pool
@jit
def _pool_fwd(lo, hi, feats, order, starts, lengths, cells, out):
    c_dim = feats.shape[1]
    for k in range(lo, hi):
        s = starts[k]
        e = s + lengths[k]
        cell = cells[k]
        for j in range(s, e):
            row = order[j]
            for c in range(c_dim):
                out[cell, c] += feats[row, c]


def pool_forward(feats: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """(N, C) features -> (G, C) cell sums in the features' dtype (accumulated in fp32 / fp64)."""
    acc = _acc_dtype(feats.dtype)
    out = torch.zeros(plan.num_cells, feats.shape[1], dtype=acc)
    if plan.num_intervals:
        starts = _np(plan.interval_starts)
        _run_chunks(_pool_fwd, _balanced_bounds(starts, plan.num_kept, _chunks()), _np(feats.to(acc)),
                    _np(plan.order), starts, _np(plan.interval_lengths), _np(plan.interval_cells), out.numpy())
    return out.to(feats.dtype)


@jit
def _gather_rows(lo, hi, src, cells, out):
    c_dim = src.shape[1]
    for i in range(lo, hi):
        cell = cells[i]
        if cell >= 0:
            for c in range(c_dim):
                out[i, c] = src[cell, c]
        else:
            for c in range(c_dim):
                out[i, c] = 0


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def pool_backward(grad_cells: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """(G, C) output gradient -> (N, C) feature gradient: every kept point receives its cell's
    gradient unchanged (derivative of a sum), dropped points receive zero. A pure copy, done on the
    bit patterns so that every float dtype (bf16 included) takes the same kernel."""
    bits = _BITS[grad_cells.dtype]
    out = torch.empty(plan.num_points, grad_cells.shape[1], dtype=grad_cells.dtype)
    if plan.num_points and grad_cells.shape[1]:
        _run_chunks(_gather_rows, _even_bounds(plan.num_points), _np(grad_cells.view(bits)),
                    _np(plan.point_cells), out.view(bits).numpy())
    return out


# ----------------------------------------------------------------------------- fused lift + pool
@jit
def _lift_fwd(lo, hi, depth, feats, order, starts, lengths, cells, dp, p, out):
    # depth: (BN*D*P,) flat; feats: (BN*P, C); point i -> camera n = i // dp, pixel i % p.
    c_dim = feats.shape[1]
    for k in range(lo, hi):
        s = starts[k]
        e = s + lengths[k]
        cell = cells[k]
        for j in range(s, e):
            i = order[j]
            w = depth[i]
            row = (i // dp) * p + i % p
            for c in range(c_dim):
                out[cell, c] += w * feats[row, c]


# Reassociation lets LLVM vectorise the dot product over channels (no NaN/inf assumptions).
@jit_reassoc
def _lift_bwd(lo, hi, grad, depth, feats, point_cells, d_bins, p, grad_depth, grad_feats):
    # grad: (G, C); grad_depth: (BN*D*P,); grad_feats: (BN*P, C), zero-initialised.
    c_dim = feats.shape[1]
    for q in range(lo, hi):
        cam = q // p
        pix = q - cam * p
        for d in range(d_bins):
            i = (cam * d_bins + d) * p + pix
            cell = point_cells[i]
            if cell >= 0:
                w = depth[i]
                dot = grad[cell, 0] * 0  # accumulator in the arrays' dtype
                for c in range(c_dim):
                    dot += grad[cell, c] * feats[q, c]
                for c in range(c_dim):
                    grad_feats[q, c] += w * grad[cell, c]
                grad_depth[i] = dot


def lift_forward(depth: torch.Tensor, feats: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """depth (BN, D, fH, fW), feats (BN, fH, fW, C) -> (G, C) in the features' dtype."""
    acc = _acc_dtype(feats.dtype)
    bn, d_bins, fh, fw = depth.shape
    c_dim = feats.shape[-1]
    out = torch.zeros(plan.num_cells, c_dim, dtype=acc)
    if plan.num_intervals:
        starts = _np(plan.interval_starts)
        _run_chunks(_lift_fwd, _balanced_bounds(starts, plan.num_kept, _chunks()), _np(depth.to(acc)).reshape(-1),
                    _np(feats.to(acc)).reshape(bn * fh * fw, c_dim), _np(plan.order), starts,
                    _np(plan.interval_lengths), _np(plan.interval_cells), d_bins * fh * fw, fh * fw, out.numpy())
    return out.to(feats.dtype)


def lift_backward(grad_cells: torch.Tensor, depth: torch.Tensor, feats: torch.Tensor, plan: BevPoolPlan):
    """(G, C) output gradient -> (grad_depth like depth, grad_feats like feats)."""
    acc = _acc_dtype(feats.dtype)
    bn, d_bins, fh, fw = depth.shape
    c_dim = feats.shape[-1]
    grad_depth = torch.zeros(depth.numel(), dtype=acc)
    grad_feats = torch.zeros(bn * fh * fw, c_dim, dtype=acc)
    if depth.numel() and c_dim:
        _run_chunks(_lift_bwd, _even_bounds(bn * fh * fw), _np(grad_cells.to(acc)), _np(depth.to(acc)).reshape(-1),
                    _np(feats.to(acc)).reshape(bn * fh * fw, c_dim), _np(plan.point_cells), d_bins, fh * fw,
                    grad_depth.numpy(), grad_feats.numpy())
    return grad_depth.view(depth.shape).to(depth.dtype), grad_feats.view(feats.shape).to(feats.dtype)

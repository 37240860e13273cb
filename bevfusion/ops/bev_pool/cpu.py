"""CPU fast path: numba kernels that walk the plan's intervals in parallel (one cell per loop
iteration, so no two threads ever write the same output row: no atomics, no locks).

Parallelism comes from plain Python threads running `nogil` numba kernels on disjoint chunks, not
from numba's `parallel=True`: numba's OpenMP layer and torch's OpenMP runtime are two thread pools
whose spinning workers fight over the cores (10-100x slowdowns measured on the 2-core dev machine).

numba is imported when this module is imported, and `bevfusion.ops.bev_pool` imports this module
only when the CPU path is used. fp16 / bf16 inputs are widened to fp32 first (numba has no bf16 on
CPU); accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from .plan import BevPoolPlan


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


_POOL = None
_POOL_LOCK = threading.Lock()


def _run_chunks(kernel, bounds: np.ndarray, *args) -> None:
    """Run kernel(lo, hi, *args) over consecutive chunks [bounds[i], bounds[i + 1]) on up to
    torch.get_num_threads() threads (pytest-xdist workers set it to 1)."""
    global _POOL
    threads = max(1, torch.get_num_threads())
    ranges = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    if threads == 1 or len(ranges) <= 1:
        for lo, hi in ranges:
            kernel(lo, hi, *args)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bev_pool")
        pool = _POOL
    list(pool.map(lambda r: kernel(r[0], r[1], *args), ranges))


def _balanced_bounds(starts: np.ndarray, total: int, chunks: int) -> np.ndarray:
    """Interval-index boundaries of `chunks` chunks holding about the same number of points."""
    m = starts.shape[0]
    if m == 0:
        return np.zeros(1, dtype=np.int64)
    targets = np.linspace(0, total, chunks + 1)[1:-1]
    inner = np.searchsorted(starts, targets)
    return np.unique(np.concatenate([[0], inner, [m]])).astype(np.int64)


def _chunks() -> int:
    threads = max(1, torch.get_num_threads())
    return 1 if threads == 1 else 4 * threads


def _even_bounds(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n, _chunks() + 1).astype(np.int64))


# ----------------------------------------------------------------------------- plan
@numba.njit(cache=True, nogil=True)
def _counting_sort(cells, g):
    n = cells.shape[0]
    ptr = np.zeros(g + 1, dtype=np.int64)
    for i in range(n):
        c = cells[i]
        if c >= 0:
            ptr[c + 1] += 1
    for c in range(g):
        ptr[c + 1] += ptr[c]
    order = np.empty(ptr[g], dtype=np.int64)
    fill = ptr[:-1].copy()
    for i in range(n):
        c = cells[i]
        if c >= 0:
            order[fill[c]] = i
            fill[c] += 1
    return order, ptr


def counting_sort(cells: torch.Tensor, num_cells: int):
    """Stable bucket sort of the kept points by cell: (order (K,), cell_ptr (G + 1,)), both int64."""
    order, ptr = _counting_sort(_np(cells), num_cells)
    return torch.from_numpy(order), torch.from_numpy(ptr)


# ----------------------------------------------------------------------------- bev_pool
@numba.njit(cache=True, nogil=True)
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


def pool_backward(grad_cells: torch.Tensor, plan: BevPoolPlan) -> torch.Tensor:
    """(G, C) output gradient -> (N, C) feature gradient: every kept point receives its cell's
    gradient unchanged (derivative of a sum), dropped points receive zero."""
    cells = plan.point_cells
    grad = grad_cells.index_select(0, cells.clamp(min=0))
    grad.masked_fill_((cells < 0).unsqueeze(1), 0)
    return grad


# ----------------------------------------------------------------------------- fused lift + pool
@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
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
                dot = 0.0
                for c in range(c_dim):
                    g = grad[cell, c]
                    dot += g * feats[q, c]
                    grad_feats[q, c] += w * g
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

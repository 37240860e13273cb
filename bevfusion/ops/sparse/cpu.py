"""Torch dataflows (CPU fast path; they also run on CUDA as a fallback).

Both are race-free and deterministic at any thread count: within one kernel offset every output row
receives at most one input row, so the per-offset scatter never writes a row twice, and the blocked
im2col path writes disjoint row blocks.
"""
from __future__ import annotations

import math

import torch

from .kmap import KernelMap


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


def _block_rows(kernel_volume: int, cin: int) -> int:
    """Rows per im2col block. Measured on the LiDAR scene (1 thread, Cin 16..128): 256 is best or within
    a few percent at every level; smaller blocks pay per-block overhead and weight gathers, larger ones
    gather offsets that few of their rows use."""
    return 256


def _im2col_plan(kmap: KernelMap, rows: int):
    """Blocks of output rows in neighbour-bitmask order (TorchSparse++'s sorted map): rows of a block
    tend to miss the same offsets, so each block gathers only the offsets some row of it uses.

    Returns (order (n_out,) int64, [(start, end, offsets tuple, offsets tensor, gather index)]); gather
    indices point at row n_in (a zero row) where a row lacks that offset.
    """
    key = ("im2col", rows)
    plan = kmap._lazy.get(key)
    if plan is None:
        from . import cpu_kmap

        nb = kmap.nbmap()
        order, act, starts, flat = cpu_kmap.im2col_plan(nb.cpu().numpy(), rows, kmap.n_in)
        dev = nb.device
        order = torch.from_numpy(order).to(dev)
        flat = torch.from_numpy(flat).to(dev)
        starts = starts.tolist()
        blocks = []
        for b, a in enumerate(act.tolist()):
            s, e = b * rows, min((b + 1) * rows, kmap.n_out)
            ak = tuple(k for k, v in enumerate(a) if v)
            if not ak:
                blocks.append((s, e, (), None, None))
            else:
                blocks.append((s, e, ak, torch.tensor(ak, device=dev), flat[starts[b]:starts[b + 1]]))
        plan = (order, blocks)
        kmap._lazy[key] = plan
    return plan


class _SerialTorch:
    """Run block loops on our own threads, each with torch's intra-op parallelism off.

    Parallelising each small per-block op with OpenMP puts a barrier after every op; on a loaded machine
    a descheduled OpenMP thread stalls every one of them (measured: 20x slower than one thread). Whole
    blocks per thread need no barrier. Restores the caller's thread count on exit.
    """

    _pools: dict = {}

    def __init__(self, nblocks: int):
        self.saved = torch.get_num_threads()
        self.threads = max(1, min(self.saved, nblocks // 4))

    def __enter__(self):
        if self.threads > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.threads > 1:
            torch.set_num_threads(self.saved)

    def map(self, fn, n: int):
        """fn(lo, hi) over `threads` contiguous chunks of range(n), in order; returns their results."""
        if self.threads <= 1:
            return [fn(0, n)]
        from concurrent.futures import ThreadPoolExecutor

        pool = self._pools.get(self.threads)
        if pool is None:
            pool = self._pools[self.threads] = ThreadPoolExecutor(self.threads, thread_name_prefix="bevfusion-sparse")
        bounds = [n * t // self.threads for t in range(self.threads + 1)]

        def run(lo, hi):
            with torch.no_grad():  # grad mode is thread-local; these loops never record autograd
                return fn(lo, hi)

        futs = [pool.submit(run, bounds[t], bounds[t + 1]) for t in range(self.threads)]
        return [f.result() for f in futs]


def im2col_gemm(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Output-stationary blocked im2col over the sorted map: per block, gather (rows, |A|*Cin) for the
    block's active offsets A and run one GEMM with weight[A]. Blocks are split over torch's thread
    count (see `_SerialTorch`); every block writes its own rows, so this is race-free."""
    K, cin, cout = weight.shape
    out_sorted = feats.new_empty(kmap.n_out, cout)
    if kmap.n_out == 0:
        return out_sorted
    order, blocks = _im2col_plan(kmap, _block_rows(K, cin))
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

    with _SerialTorch(len(blocks)) as par:
        par.map(work, len(blocks))
    out = torch.empty_like(out_sorted)
    out.index_copy_(0, order, out_sorted)
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
    """Same as `wgrad_gather`, accumulated over the sorted im2col blocks (per-thread partial sums,
    added in a fixed order)."""
    K, cin, cout = kmap.kernel_volume, feats.shape[1], grad_out.shape[1]
    dw = feats.new_zeros(K, cin, cout)
    if kmap.n_out == 0:
        return dw
    order, blocks = _im2col_plan(kmap, _block_rows(K, cin))
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

    with _SerialTorch(len(blocks)) as par:
        for part in par.map(work, len(blocks)):
            dw += part
    return dw


# ----------------------------------------------------------------------------- kernel maps (numba)
def _numba_kernels():
    from . import cpu_kmap

    return cpu_kmap


def _bits(n: int) -> int:
    return max(4, int(2 * max(n, 1) - 1).bit_length())


def subm_pairs_numba(coords: torch.Tensor, keys: torch.Tensor, offs: torch.Tensor, shape):
    """(in_idx, out_idx, counts per offset) of a SubM map; raises ValueError on duplicate coordinates."""
    import numpy as np

    nbk = _numba_kernels()
    table, dup = nbk.hash_build(keys.numpy(), _bits(keys.shape[0]))
    if dup >= 0:
        raise ValueError(f"sparse conv: duplicate coordinates in the input SparseTensor, e.g. (batch, x, y, z) = "
                         f"{coords[dup].tolist()}")
    i, o, cnt = nbk.subm_pairs(coords.numpy().astype(np.int64), offs.numpy().astype(np.int64),
                                  np.asarray(shape, np.int64), table)
    return torch.from_numpy(i), torch.from_numpy(o), cnt.tolist()


def conv_pairs_numba(coords: torch.Tensor, kernel_size, dilation, pad, stride, out_shape):
    """(in_idx, out_idx, counts, out_keys sorted) of a strided conv map, outputs sorted by key."""
    import numpy as np

    nbk = _numba_kernels()
    # along one axis an input reaches the taps with k*dil = const (mod stride), at most
    # ceil(k / (stride / gcd(stride, dil))) of them: size the table for a load factor <= 1/2
    reach = 1
    for k, s, d in zip(kernel_size, stride, dilation):
        reach *= -(-k // (s // math.gcd(s, d)))
    i, o, cnt, okeys = nbk.conv_pairs(coords.numpy().astype(np.int64), np.asarray(kernel_size, np.int64),
                                      np.asarray(dilation, np.int64), np.asarray(pad, np.int64),
                                      np.asarray(stride, np.int64), np.asarray(out_shape, np.int64),
                                      _bits(reach * coords.shape[0]))
    okeys = torch.from_numpy(okeys)
    skeys, order = torch.sort(okeys)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return torch.from_numpy(i), rank[torch.from_numpy(o)], cnt.tolist(), skeys

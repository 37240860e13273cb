"""Kernel maps on the CPU with numba (the "cpu" backend of `kmap.py`), and the tables `KernelMap` derives
from a CPU map (neighbour table, sorted blocks).

An open-addressing hash table of int64 linear keys (key and value side by side: one cache line per
probe), filled and probed by serial loops: deterministic, and safe to run from several threads. The
wrappers at the bottom take and return torch tensors; `kmap.py` turns their pairs into a `KernelMap`.
numba is imported with this module (through `bevfusion.ops._numba`), which `kmap.py` imports only when a
CPU map is built.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._numba import jit


@jit
def _slot(key, mask):
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((h >> np.uint64(29)) & np.uint64(mask))


@jit
def hash_build(keys, bits):
    # key and value side by side: one cache line per probe
    size = 1 << bits
    mask = size - 1
    t = np.full(2 * size, -1, np.int64)
    dup = -1
    for i in range(keys.shape[0]):
        k = keys[i]
        s = _slot(k, mask)
        while t[2 * s] != -1 and t[2 * s] != k:
            s = (s + 1) & mask
        if t[2 * s] == k:
            dup = i
            break
        t[2 * s] = k
        t[2 * s + 1] = i
    return t, dup


@jit
def subm_pairs(coords, offs, shape, t):
    """Centred odd kernel: offset K-1-k mirrors offset k, so only k < centre is searched."""
    n = coords.shape[0]
    K = offs.shape[0]
    c = (K - 1) // 2
    mask = t.shape[0] // 2 - 1
    X, Y, Z = shape[0], shape[1], shape[2]
    hi = np.empty(c * n, np.int64)
    ho = np.empty(c * n, np.int64)
    cnt = np.zeros(K, np.int64)
    p = 0
    for k in range(c):
        dx, dy, dz = offs[k, 0], offs[k, 1], offs[k, 2]
        for i in range(n):
            x = coords[i, 1] + dx
            y = coords[i, 2] + dy
            z = coords[i, 3] + dz
            if x < 0 or x >= X or y < 0 or y >= Y or z < 0 or z >= Z:
                continue
            key = ((coords[i, 0] * X + x) * Y + y) * Z + z
            s = _slot(key, mask)
            while t[2 * s] != -1 and t[2 * s] != key:
                s = (s + 1) & mask
            if t[2 * s] == key:
                hi[p] = t[2 * s + 1]
                ho[p] = i
                p += 1
                cnt[k] += 1
    cnt[c] = n
    for k in range(c):
        cnt[K - 1 - k] = cnt[k]
    total = 2 * p + n
    in_idx = np.empty(total, np.int64)
    out_idx = np.empty(total, np.int64)
    in_idx[:p] = hi[:p]
    out_idx[:p] = ho[:p]
    for i in range(n):
        in_idx[p + i] = i
        out_idx[p + i] = i
    # offsets c+1..K-1 are the mirrors of c-1..0, in that order
    q = p + n
    end = p
    for k in range(c - 1, -1, -1):
        start = end - cnt[k]
        for j in range(start, end):
            in_idx[q] = ho[j]
            out_idx[q] = hi[j]
            q += 1
        end = start
    return in_idx, out_idx, cnt


@jit
def conv_pairs(coords, ksize, dil, pad, stride, oshape, bits):
    """Pairs of a strided conv, grouped by offset; outputs numbered by first appearance, with their keys.

    Per input and axis, the valid kernel taps are found once (3 divisibility tests per axis instead of
    one per tap and axis), then their product is walked; a counting sort groups the pairs by offset.
    """
    n = coords.shape[0]
    kx, ky, kz = ksize[0], ksize[1], ksize[2]
    K = kx * ky * kz
    size = 1 << bits
    mask = size - 1
    t = np.full(2 * size, -1, np.int64)
    X, Y, Z = oshape[0], oshape[1], oshape[2]
    kmax = max(kx, max(ky, kz))
    tap = np.empty((3, kmax), np.int64)
    pos = np.empty((3, kmax), np.int64)
    ntap = np.zeros(3, np.int64)
    cap = n * 8
    pk = np.empty(cap, np.int64)
    pi = np.empty(cap, np.int64)
    po = np.empty(cap, np.int64)
    okeys = np.empty(max(n, 16), np.int64)
    cnt = np.zeros(K, np.int64)
    p = 0
    m = 0
    for i in range(n):
        for d in range(3):
            nt = 0
            lim = X if d == 0 else (Y if d == 1 else Z)
            kd = kx if d == 0 else (ky if d == 1 else kz)
            for k in range(kd):
                num = coords[i, 1 + d] + pad[d] - k * dil[d]
                if num < 0:
                    break  # num decreases with k
                if num % stride[d] == 0:
                    o = num // stride[d]
                    if o < lim:
                        tap[d, nt] = k
                        pos[d, nt] = o
                        nt += 1
            ntap[d] = nt
        if ntap[0] == 0 or ntap[1] == 0 or ntap[2] == 0:
            continue
        b = coords[i, 0]
        for a in range(ntap[0]):
            for c in range(ntap[1]):
                base = (b * X + pos[0, a]) * Y + pos[1, c]
                kb = (tap[0, a] * ky + tap[1, c]) * kz
                for e in range(ntap[2]):
                    key = base * Z + pos[2, e]
                    s = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(29)) & np.uint64(mask))
                    while t[2 * s] != -1 and t[2 * s] != key:
                        s = (s + 1) & mask
                    if t[2 * s] == -1:
                        t[2 * s] = key
                        t[2 * s + 1] = m
                        if m == okeys.shape[0]:
                            grown = np.empty(2 * m, np.int64)
                            grown[:m] = okeys
                            okeys = grown
                        okeys[m] = key
                        m += 1
                    if p == cap:
                        cap *= 2
                        g1 = np.empty(cap, np.int64)
                        g2 = np.empty(cap, np.int64)
                        g3 = np.empty(cap, np.int64)
                        g1[:p] = pk[:p]
                        g2[:p] = pi[:p]
                        g3[:p] = po[:p]
                        pk, pi, po = g1, g2, g3
                    k = kb + tap[2, e]
                    pk[p] = k
                    pi[p] = i
                    po[p] = t[2 * s + 1]
                    cnt[k] += 1
                    p += 1
    # counting sort by offset (stable: inputs stay in order within an offset)
    start = np.zeros(K + 1, np.int64)
    for k in range(K):
        start[k + 1] = start[k] + cnt[k]
    fill = start[:K].copy()
    in_idx = np.empty(p, np.int64)
    out_idx = np.empty(p, np.int64)
    for j in range(p):
        k = pk[j]
        q = fill[k]
        in_idx[q] = pi[j]
        out_idx[q] = po[j]
        fill[k] = q + 1
    return in_idx, out_idx, cnt, okeys[:m]


@jit
def nbmap_from_pairs(in_idx, out_idx, ptr, n_out):
    """(n_out, K) int32 neighbour table, -1 where an output has no input through that offset."""
    K = ptr.shape[0] - 1
    nb = np.full((n_out, K), -1, np.int32)
    for k in range(K):
        for j in range(ptr[k], ptr[k + 1]):
            nb[out_idx[j], k] = in_idx[j]
    return nb


@jit
def sorted_blocks_plan(nb, rows, n_in):
    """Sorted im2col plan from the (n_out, K) neighbour table (-1 = missing).

    Rows are ordered by their neighbour bitmask (descending, stable; offset k is bit K-1-k, offsets past
    the 63rd take no part, as in `KernelMap.sorted_rows`); per block of `rows` rows, act
    marks the offsets some row uses; flat holds every block's (rows_in_block, |act|) gather index,
    concatenated (n_in = the zero row), and starts[b] where block b begins in flat.
    """
    n_out, K = nb.shape
    masks = np.zeros(n_out, np.int64)
    for o in range(n_out):
        m = 0
        for k in range(K):
            if nb[o, k] >= 0 and K - 1 - k <= 62:
                m |= np.int64(1) << np.int64(K - 1 - k)
        masks[o] = -m
    order = np.argsort(masks, kind="mergesort")
    nblk = (n_out + rows - 1) // rows
    act = np.zeros((nblk, K), np.bool_)
    starts = np.zeros(nblk + 1, np.int64)
    for b in range(nblk):
        e = min((b + 1) * rows, n_out)
        for r in range(b * rows, e):
            o = order[r]
            for k in range(K):
                if nb[o, k] >= 0:
                    act[b, k] = True
        na = 0
        for k in range(K):
            if act[b, k]:
                na += 1
        starts[b + 1] = starts[b] + (e - b * rows) * na
    flat = np.empty(starts[nblk], np.int32)  # index_select takes int32 indices: half the memory
    p = 0
    for b in range(nblk):
        e = min((b + 1) * rows, n_out)
        for r in range(b * rows, e):
            o = order[r]
            for k in range(K):
                if act[b, k]:
                    v = nb[o, k]
                    flat[p] = v if v >= 0 else n_in
                    p += 1
    return order, act, starts, flat


# ----------------------------------------------------------------------------- torch in, torch out
def _bits(n: int) -> int:
    return max(4, int(2 * max(n, 1) - 1).bit_length())


def subm_map(coords: torch.Tensor, keys: torch.Tensor, offs: torch.Tensor, shape):
    """(in_idx, out_idx, counts per offset) of a SubM map; raises ValueError on duplicate coordinates."""
    table, dup = hash_build(keys.numpy(), _bits(keys.shape[0]))
    if dup >= 0:
        raise ValueError(f"sparse conv: duplicate coordinates in the input SparseTensor, e.g. (batch, x, y, z) = "
                         f"{coords[dup].tolist()}")
    i, o, cnt = subm_pairs(coords.numpy().astype(np.int64), offs.numpy().astype(np.int64), np.asarray(shape, np.int64),
                           table)
    return torch.from_numpy(i), torch.from_numpy(o), cnt.tolist()


def conv_map(coords: torch.Tensor, kernel_size, dilation, pad, stride, out_shape):
    """(in_idx, out_idx, counts, out_keys sorted) of a strided conv map, outputs sorted by key."""
    # along one axis an input reaches the taps with k*dil = const (mod stride), at most
    # ceil(k / (stride / gcd(stride, dil))) of them: size the table for a load factor <= 1/2
    reach = 1
    for k, s, d in zip(kernel_size, stride, dilation):
        reach *= -(-k // (s // math.gcd(s, d)))
    i, o, cnt, okeys = conv_pairs(coords.numpy().astype(np.int64), np.asarray(kernel_size, np.int64),
                                  np.asarray(dilation, np.int64), np.asarray(pad, np.int64),
                                  np.asarray(stride, np.int64), np.asarray(out_shape, np.int64),
                                  _bits(reach * coords.shape[0]))
    okeys = torch.from_numpy(okeys)
    skeys, order = torch.sort(okeys)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return torch.from_numpy(i), rank[torch.from_numpy(o)], cnt.tolist(), skeys


def neighbour_table(in_idx: torch.Tensor, out_idx: torch.Tensor, ptr, n_out: int) -> torch.Tensor:
    """(n_out, K) int32: the input row feeding output o through offset k, or -1."""
    return torch.from_numpy(nbmap_from_pairs(in_idx.numpy(), out_idx.numpy(), np.asarray(ptr, np.int64), n_out))


def sorted_blocks(nb: torch.Tensor, rows: int, n_in: int):
    """`KernelMap.sorted_blocks` of a CPU neighbour table: (order (n_out,) int64, per-block active offsets
    (nblk, K) bool, starts (nblk + 1,) int64, gather indices concatenated (int32))."""
    order, act, starts, flat = sorted_blocks_plan(nb.numpy(), rows, n_in)
    return torch.from_numpy(order), torch.from_numpy(act), starts.tolist(), torch.from_numpy(flat)

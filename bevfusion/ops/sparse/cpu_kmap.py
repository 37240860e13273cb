"""Numba kernel-map builders for CPU (imported lazily by cpu.py): an open-addressing hash of int64
linear keys, serial loops (deterministic, thread-safe), compiled once and cached on disk."""
import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _slot(key, mask):
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((h >> np.uint64(29)) & np.uint64(mask))


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
def conv_pairs(coords, offs, pad, stride, oshape, bits):
    """Pairs of a strided conv; outputs numbered by first appearance, with their keys."""
    n = coords.shape[0]
    K = offs.shape[0]
    size = 1 << bits
    mask = size - 1
    t = np.full(2 * size, -1, np.int64)
    okeys = np.empty(K * n, np.int64)
    in_idx = np.empty(K * n, np.int64)
    out_idx = np.empty(K * n, np.int64)
    cnt = np.zeros(K, np.int64)
    X, Y, Z = oshape[0], oshape[1], oshape[2]
    p = 0
    m = 0
    for k in range(K):
        for i in range(n):
            nx = coords[i, 1] + pad[0] - offs[k, 0]
            ny = coords[i, 2] + pad[1] - offs[k, 1]
            nz = coords[i, 3] + pad[2] - offs[k, 2]
            if nx < 0 or ny < 0 or nz < 0:
                continue
            if nx % stride[0] or ny % stride[1] or nz % stride[2]:
                continue
            ox, oy, oz = nx // stride[0], ny // stride[1], nz // stride[2]
            if ox >= X or oy >= Y or oz >= Z:
                continue
            key = ((coords[i, 0] * X + ox) * Y + oy) * Z + oz
            s = _slot(key, mask)
            while t[2 * s] != -1 and t[2 * s] != key:
                s = (s + 1) & mask
            if t[2 * s] == -1:
                t[2 * s] = key
                t[2 * s + 1] = m
                okeys[m] = key
                m += 1
            in_idx[p] = i
            out_idx[p] = t[2 * s + 1]
            p += 1
            cnt[k] += 1
    return in_idx[:p], out_idx[:p], cnt, okeys[:m]


@numba.njit(cache=True, nogil=True)
def im2col_plan(nb, rows, n_in):
    """Sorted im2col plan from the (n_out, K) neighbour table (-1 = missing).

    Rows are ordered by their neighbour bitmask (descending, stable); per block of `rows` rows, act
    marks the offsets some row uses; flat holds every block's (rows_in_block, |act|) gather index,
    concatenated (n_in = the zero row), and starts[b] where block b begins in flat.
    """
    n_out, K = nb.shape
    masks = np.zeros(n_out, np.int64)
    for o in range(n_out):
        m = 0
        for k in range(K):
            if nb[o, k] >= 0:
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
    flat = np.empty(starts[nblk], np.int64)
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

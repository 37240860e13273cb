"""Kernel maps: which input site feeds which output site through which kernel offset.

Offset index k = (ix*ky + iy)*kz + iz, oriented like F.conv3d:
  SubM:     input = output + (i - (k-1)/2)*dilation            (always centred)
  strided:  input = output*stride - padding + i*dilation
  inverse:  the transposed map of the paired strided conv.

`impl` takes the ops' backend names (`bevfusion.ops._dispatch`):
  "cpu"        numba hash table (`kmap_numba.py`), CPU tensors
  "triton"     the GPU path: vectorised over all (offset, site) pairs with torch ops (linear int64 keys,
               sort and searchsorted, one host sync per map); no Triton kernel is needed for it, and it
               also runs on CPU tensors under TRITON_INTERPRET=1, as every "triton" path does
  "reference"  Python loops over the sites (`reference.py`)
  "auto"       "triton" for CUDA tensors, "cpu" otherwise
The convs always build their maps with "auto": a map is cached on its input's `KernelMapCache` and shared
by every layer of the same geometry, whatever each layer's conv impl.

A `KernelMap` also derives, lazily and cached, the tables the dataflows read: the output-stationary
neighbour table, the rows sorted by their neighbour bitmask, and the blocks of sorted rows with the
offsets each block uses (the im2col dataflow's plan).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._dispatch import resolve_impl
from .tensor import SparseTensor, _coord_ids, _triple, conv_out_shape, keys_to_coords, linear_keys


@dataclass(eq=False)
class KernelMap:
    """Pairs (in_idx[p], out_idx[p]) grouped by kernel offset: offset k owns p in [ptr[k], ptr[k+1]).

    Within an offset every output (and every input) appears at most once, so per-offset scatters never
    collide. `identity_offset` names an offset whose pairs are (i, i) for all i (the SubM centre), which
    the dataflows treat as a plain matmul.
    """

    in_idx: torch.Tensor   # (P,) int64
    out_idx: torch.Tensor  # (P,) int64
    ptr: list[int]         # K + 1 offsets into the pair arrays (host ints: no device sync to read)
    n_in: int
    n_out: int
    identity_offset: int | None = None
    _lazy: dict = field(default_factory=dict, repr=False)

    @property
    def kernel_volume(self) -> int:
        return len(self.ptr) - 1

    @property
    def num_pairs(self) -> int:
        return self.ptr[-1]

    def counts(self) -> list[int]:
        return [self.ptr[k + 1] - self.ptr[k] for k in range(self.kernel_volume)]

    def pair_offsets(self) -> torch.Tensor:
        """(P,) int64 offset index of each pair."""
        if "koff" not in self._lazy:
            cnt = torch.tensor(self.counts(), dtype=torch.long)
            self._lazy["koff"] = torch.repeat_interleave(torch.arange(self.kernel_volume), cnt).to(self.in_idx.device)
        return self._lazy["koff"]

    def nbmap(self) -> torch.Tensor:
        """(n_out, K) int32 output-stationary neighbour table: input row feeding output o via offset k, or -1.
        Filled by a numba loop for CPU maps, by one scatter on other devices."""
        if "nbmap" not in self._lazy:
            if self.in_idx.device.type == "cpu" and self.num_pairs:
                from .kmap_numba import neighbour_table

                nb = neighbour_table(self.in_idx, self.out_idx, self.ptr, self.n_out)
            else:
                nb = torch.full((self.n_out, self.kernel_volume), -1, dtype=torch.int32, device=self.in_idx.device)
                if self.num_pairs:
                    nb[self.out_idx, self.pair_offsets()] = self.in_idx.int()
            self._lazy["nbmap"] = nb
        return self._lazy["nbmap"]

    def transposed(self) -> "KernelMap":
        """The same pairs seen from the other side (inputs become outputs); used by backward and inverse conv."""
        if "T" not in self._lazy:
            t = KernelMap(self.out_idx, self.in_idx, self.ptr, self.n_out, self.n_in, self.identity_offset)
            if "koff" in self._lazy:
                t._lazy["koff"] = self._lazy["koff"]
            t._lazy["T"] = self
            self._lazy["T"] = t
        return self._lazy["T"]

    def sorted_rows(self, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """(n_out,) output rows (int64, or `dtype`) ordered by their neighbour bitmask (TorchSparse++'s
        sorted map), descending, ties in row order; offset k is bit K-1-k (offset 0 the most significant),
        offsets beyond the 63rd do not take part. Rows of a block then tend to miss the same offsets,
        which a kernel can skip."""
        if "order" not in self._lazy:
            nb = self.nbmap()
            K = self.kernel_volume
            shift = K - 1 - torch.arange(K, device=nb.device)
            w = torch.where(shift <= 62, torch.ones_like(shift) << shift.clamp(0, 62), torch.zeros_like(shift))
            mask = ((nb >= 0).long() * w).sum(1)  # distinct bits: the sum is the bitwise or
            self._lazy["order"] = torch.argsort(mask, descending=True, stable=True)
        if dtype != torch.int64:
            if ("order", dtype) not in self._lazy:
                self._lazy[("order", dtype)] = self._lazy["order"].to(dtype)
            return self._lazy[("order", dtype)]
        return self._lazy["order"]

    def sorted_blocks(self, rows: int):
        """Blocks of `rows` consecutive sorted rows (the last one shorter), each with the offsets at least
        one of its rows uses: the output-stationary im2col dataflow gathers only those.

        Built by one numba pass for CPU maps (`kmap_numba.sorted_blocks`), by torch ops on other devices;
        both give the same blocks. Returns (order, blocks): `order` is `sorted_rows()`; per block (start,
        end, offsets tuple, offsets (|A|,) int64 tensor, gather index ((end - start) * |A|,) int32), the
        gather index listing, row by row, the input row of each of the block's offsets, n_in (a zero row)
        where that row lacks it. A block whose rows have no input at all has offsets () and None for both
        tensors.
        """
        key = ("sorted_blocks", rows)
        hit = self._lazy.get(key)
        if hit is not None:
            return hit
        nb = self.nbmap()
        n_out, K = nb.shape
        if n_out == 0:
            self._lazy[key] = (self.sorted_rows(), [])
            return self._lazy[key]
        if nb.device.type == "cpu":  # one numba pass (several times faster than the torch ops below)
            from .kmap_numba import sorted_blocks

            order, act, starts, flat = sorted_blocks(nb, rows, self.n_in)
            self._lazy.setdefault("order", order)
        else:
            order = self.sorted_rows()
            act, starts, flat = _sorted_blocks_torch(nb.index_select(0, order), rows, self.n_in)
        blocks = []
        for b, a in enumerate(act.tolist()):
            s, e = b * rows, min((b + 1) * rows, n_out)
            ak = tuple(k for k, v in enumerate(a) if v)
            if not ak:
                blocks.append((s, e, (), None, None))
            else:
                blocks.append((s, e, ak, torch.tensor(ak, device=nb.device), flat[starts[b]:starts[b + 1]]))
        self._lazy[key] = (order, blocks)
        return order, blocks


def _sorted_blocks_torch(nb: torch.Tensor, rows: int, n_in: int):
    """(act (nblk, K) bool, starts (nblk + 1 ints), flat gather index int32) of `KernelMap.sorted_blocks` from
    the neighbour table in sorted row order (n_out >= 1 rows), with torch ops on its device."""
    n_out, K = nb.shape
    nblk = -(-n_out // rows)
    pad = nblk * rows - n_out
    if pad:  # the last block's missing rows: -2, neither an input row nor "no input"
        nb = torch.cat([nb, nb.new_full((pad, K), -2)])
    nb = nb.view(nblk, rows, K)
    act = (nb >= 0).any(1)  # (nblk, K)
    sel = act[:, None, :] & (nb[:, :, :1] != -2)  # (nblk, rows, K): the entries each block gathers
    flat = torch.where(nb >= 0, nb, torch.full_like(nb, n_in))[sel]  # block, row, offset order
    sizes = torch.cat([torch.full((nblk - 1,), rows, dtype=torch.long, device=nb.device),
                       torch.tensor([rows - pad], dtype=torch.long, device=nb.device)]) * act.sum(1)
    return act, [0] + torch.cumsum(sizes, 0).tolist(), flat


def _offsets_on(kernel_size, dilation, shift, device) -> torch.Tensor:
    """(K, 3) int64 offsets i*dilation - shift, k = (ix*ky + iy)*kz + iz, computed on `device`."""
    kx, ky, kz = kernel_size
    k = torch.arange(kx * ky * kz, device=device)
    cols = (k // (ky * kz), (k // kz) % ky, k % kz)
    return torch.stack([c * d - s for c, d, s in zip(cols, dilation, shift)], 1)


def _sorted_keys(x: SparseTensor):
    """(sorted keys, order, duplicate flag): the flag is a 0-dim bool tensor on the device, or None when
    the sites are known to be unique (validated, or made by a strided conv). The caller reads it together
    with its pair counts, so that building a map costs one host sync."""
    hit = x.cache.get(("sorted_keys", x.coord_id))
    if hit is not None:
        return hit[0], hit[1], None
    keys = linear_keys(x.coords, x.spatial_shape)
    skeys, order = torch.sort(keys)
    dup = (skeys[1:] == skeys[:-1]).any() if skeys.numel() > 1 else None
    x.cache.put(("sorted_keys", x.coord_id), (skeys, order))
    return skeys, order, dup


def _host_counts(counts: torch.Tensor, *scalars) -> list[int]:
    """Copy (K,) per-offset pair counts and extra 0-dim values to the host in one transfer (the one
    device sync of a map build on CUDA). None scalars read as 0."""
    extra = [torch.zeros((), dtype=torch.long, device=counts.device) if v is None else v.reshape(()).long()
             for v in scalars]
    return torch.cat([counts.long()] + [v.reshape(1) for v in extra]).tolist()


def _compact(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Flat indices of the True entries of `mask`, in increasing order (as `mask.view(-1).nonzero()`),
    given their count `total` from the host: a prefix sum and a scatter, so no further device sync."""
    flat = mask.reshape(-1)
    pos = torch.cumsum(flat, 0) - 1
    dest = torch.where(flat, pos, torch.full_like(pos, total))  # rejected entries go to a spare slot
    buf = torch.empty(total + 1, dtype=torch.long, device=mask.device)
    buf.scatter_(0, dest, torch.arange(flat.numel(), device=mask.device))
    return buf[:total]


def _ptr(counts) -> list[int]:
    ptr = [0]
    for v in counts:
        ptr.append(ptr[-1] + int(v))
    return ptr


def _backend(x: SparseTensor, impl: str) -> str:
    return resolve_impl("kernel map", impl, x.coords.device)


def build_subm_kmap(x: SparseTensor, kernel_size, dilation=1, impl: str = "auto") -> KernelMap:
    """Submanifold map: outputs are the input sites; input = output + (i - (k-1)/2)*dilation.

    impl: "auto" | "reference" | "cpu" | "triton" (see the module docstring). Cached on x's kernel-map
    cache by (sites, kernel_size, dilation, backend). Duplicate input sites raise ValueError.
    """
    ks = _triple(kernel_size, "kernel_size")
    dil = _triple(dilation, "dilation")
    if any(k % 2 == 0 for k in ks):
        raise ValueError(f"SubMConv3d needs odd kernel sizes, got {ks}")
    backend = _backend(x, impl)
    key = ("subm", x.coord_id, ks, dil, backend)
    hit = x.cache.get(key)
    if hit is not None:
        return hit
    n = x.coords.shape[0]
    dev = x.coords.device
    K = ks[0] * ks[1] * ks[2]
    centre = (K - 1) // 2
    offs = _offsets_on(ks, dil, [(k - 1) // 2 * d for k, d in zip(ks, dil)], dev)
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        km = KernelMap(e, e, [0] * (K + 1), 0, 0, centre)
        x.cache.put(key, km)
        return km
    if backend in ("cpu", "reference"):
        if backend == "cpu":
            from .kmap_numba import subm_map

            in_idx, out_idx, cnt = subm_map(x.coords, linear_keys(x.coords, x.spatial_shape), offs, x.spatial_shape)
        else:
            from .reference import subm_pairs

            in_idx, out_idx, cnt = subm_pairs(x.coords.cpu(), offs.cpu())
            in_idx, out_idx = in_idx.to(dev), out_idx.to(dev)
        km = KernelMap(in_idx, out_idx, _ptr(cnt), n, n, centre)
        x.cache.put(key, km)
        return km
    skeys, order, dup = _sorted_keys(x)
    c = x.coords.long()
    q = c[None, :, 1:] + offs[:, None, :]  # (K, N, 3)
    X, Y, Z = x.spatial_shape
    inb = (q >= 0).all(-1) & (q[..., 0] < X) & (q[..., 1] < Y) & (q[..., 2] < Z)  # (K, N)
    qk = ((c[None, :, 0] * X + q[..., 0]) * Y + q[..., 1]) * Z + q[..., 2]
    qk = torch.where(inb, qk, torch.full_like(qk, -1))
    pos = torch.searchsorted(skeys, qk).clamp_(max=n - 1)
    found = (skeys[pos] == qk) & inb
    *cnt, has_dup = _host_counts(found.sum(1), dup)  # the one host sync of this map
    if has_dup:
        x.cache.entries.pop(("sorted_keys", x.coord_id), None)
        raise ValueError("sparse conv: duplicate coordinates in the input SparseTensor")
    ptr = _ptr(cnt)
    sel = _compact(found, ptr[-1])  # flat (k, output) indices, grouped by offset
    out_idx = sel % n
    in_idx = order[pos.reshape(-1)[sel]]
    km = KernelMap(in_idx, out_idx, ptr, n, n, centre)
    km._lazy["koff"] = sel // n
    x.cache.put(key, km)
    return km


def build_conv_kmap(x: SparseTensor, kernel_size, stride=1, padding=0, dilation=1, impl: str = "auto"):
    """Strided / padded sparse conv (spconv's rule): output o is active iff some active input
    i = o*stride - padding + k*dilation with 0 <= o < out_shape.

    Returns (kmap, out_coords (M, 4) int32 sorted by (batch, x, y, z), out_shape, out_coord_id).
    impl as in `build_subm_kmap`; cached by (sites, kernel_size, stride, padding, dilation, backend).
    """
    ks = _triple(kernel_size, "kernel_size")
    st = _triple(stride, "stride")
    pad = _triple(padding, "padding")
    dil = _triple(dilation, "dilation")
    backend = _backend(x, impl)
    key = ("down", x.coord_id, ks, st, pad, dil, backend)
    hit = x.cache.get(key)
    if hit is not None:
        return hit
    dev = x.coords.device
    out_shape = conv_out_shape(x.spatial_shape, ks, st, pad, dil)
    if min(out_shape) <= 0:
        raise ValueError(f"sparse conv: output shape {out_shape} is empty for input {x.spatial_shape}, "
                         f"kernel {ks}, stride {st}, padding {pad}, dilation {dil}")
    K = ks[0] * ks[1] * ks[2]
    n = x.coords.shape[0]
    offs = _offsets_on(ks, dil, (0, 0, 0), dev)
    if backend in ("cpu", "reference"):
        if backend == "cpu":
            from .kmap_numba import conv_map

            in_idx, out_idx, cnt, uniq = conv_map(x.coords, ks, dil, pad, st, out_shape)
        else:
            from .reference import conv_pairs

            in_idx, out_idx, cnt, uniq = conv_pairs(x.coords.cpu(), x.spatial_shape, ks, st, pad, dil)
            in_idx, out_idx, uniq = in_idx.to(dev), out_idx.to(dev), uniq.to(dev)
        km = KernelMap(in_idx, out_idx, _ptr(cnt), n, uniq.numel(), None)
        res = (km, keys_to_coords(uniq, out_shape), out_shape, next(_coord_ids))
        x.cache.put(key, res)
        return res
    c = x.coords.long()
    num = c[None, :, 1:] - offs[:, None, :]  # (K, N, 3) = o*stride - padding
    o = torch.stack([torch.div(num[..., a] + pad[a], st[a], rounding_mode="floor") for a in range(3)], -1)
    ok = (o >= 0).all(-1)  # (K, N)
    for a in range(3):
        ok &= (o[..., a] * st[a] == num[..., a] + pad[a]) & (o[..., a] < out_shape[a])
    okeys = ((c[None, :, 0] * out_shape[0] + o[..., 0]) * out_shape[1] + o[..., 1]) * out_shape[2] + o[..., 2]
    # The distinct output keys without torch.unique (whose size needs a sync): sort all K*N candidate keys,
    # rejected ones as a sentinel above every real key, and number the first of each run.
    sentinel = torch.iinfo(torch.int64).max
    skeys, perm = torch.sort(torch.where(ok, okeys, torch.full_like(okeys, sentinel)).reshape(-1))
    first = torch.ones_like(skeys, dtype=torch.bool)
    first[1:] = skeys[1:] != skeys[:-1]
    first &= skeys != sentinel
    run = torch.cumsum(first, 0) - 1  # output row of each sorted candidate
    *cnt, n_out = _host_counts(ok.sum(1), first.sum())  # the one host sync of this map
    ptr = _ptr(cnt)
    uniq = torch.empty(n_out + 1, dtype=torch.long, device=dev)
    uniq.scatter_(0, torch.where(first, run, torch.full_like(run, n_out)), skeys)
    uniq = uniq[:n_out]
    inv = torch.empty_like(run)
    inv[perm] = run  # output row of each (k, input) candidate
    sel = _compact(ok, ptr[-1])  # flat (k, input) indices of the pairs, grouped by offset
    km = KernelMap(sel % n, inv[sel], ptr, n, n_out, None)
    km._lazy["koff"] = sel // n
    out_coords = keys_to_coords(uniq, out_shape)
    cid = next(_coord_ids)
    x.cache.put(("sorted_keys", cid), (uniq, torch.arange(n_out, device=dev)))  # unique and sorted already
    res = (km, out_coords, out_shape, cid)
    x.cache.put(key, res)
    return res


def register_inverse(x: SparseTensor, out: SparseTensor, kernel_size, stride, padding, dilation,
                     kmap: KernelMap) -> None:
    """Remember how `out` was made from `x`, so that an inverse conv on `out` restores `x`'s sites."""
    key = ("up", out.coord_id, _triple(kernel_size), _triple(stride), _triple(padding), _triple(dilation))
    out.cache.put(key, (kmap.transposed(), x.coords, x.spatial_shape, x.coord_id, x.stride))


def find_inverse(x: SparseTensor, kernel_size, stride, padding, dilation):
    key = ("up", x.coord_id, _triple(kernel_size), _triple(stride), _triple(padding), _triple(dilation))
    hit = x.cache.get(key)
    if hit is None:
        raise ValueError("SparseInverseConv3d: this tensor was not produced by a SparseConv3d with kernel_size "
                         f"{key[2]}, stride {key[3]}, padding {key[4]}, dilation {key[5]} (the inverse conv restores "
                         "the input sites of its paired strided conv, so that conv must run on the same tensor "
                         "lineage first)")
    return hit

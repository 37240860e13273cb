"""SparseTensor: features on the active sites of a batched 3D voxel grid."""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

_coord_ids = itertools.count()


def _triple(v, name: str = "value") -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def conv_out_shape(spatial_shape, kernel_size, stride, padding, dilation) -> tuple[int, int, int]:
    """Output grid of a strided conv, per axis (n + 2*padding - dilation*(k - 1) - 1) // stride + 1."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation))  # type: ignore


def linear_keys(coords: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Row-major int64 key of (batch, x, y, z) rows: ((b*X + x)*Y + y)*Z + z."""
    X, Y, Z = spatial_shape
    c = coords.long()
    return ((c[..., 0] * X + c[..., 1]) * Y + c[..., 2]) * Z + c[..., 3]


def keys_to_coords(keys: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `linear_keys`: (N,) int64 -> (N, 4) int32 (batch, x, y, z)."""
    X, Y, Z = spatial_shape
    z = keys % Z
    r = keys // Z
    y = r % Y
    r = r // Y
    x = r % X
    b = r // X
    return torch.stack([b, x, y, z], 1).int()


class KernelMapCache:
    """Kernel maps and coordinate sets shared by all tensors derived from one input.

    Keys are tuples naming the coordinate set (`coord_id`) and the conv geometry, so a later layer with
    the same geometry on the same sites reuses the map, and an inverse conv finds the map of its paired
    strided conv.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, object] = {}

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, value) -> None:
        self.entries[key] = value


class SparseTensor:
    """Features `feats` living on the active sites `coords` of a batched 3D grid.

    Args:
        feats: (N, C) float, one row per active site.
        coords: (N, 4) int, columns (batch, x, y, z) in voxel units of this tensor's grid; rows must be
            unique and inside `spatial_shape` (checked unless `check=False`; a duplicate or
            out-of-range row raises ValueError).
        spatial_shape: (X, Y, Z) grid size.
        stride: tensor stride w.r.t. the input grid (int or 3 ints); informative, kept like TorchSparse.
        batch_size: number of batch elements; defaults to max(batch) + 1 (0 when N == 0). Pass it when
            trailing batch elements are empty.
        check: validate coords (costs one sort; derived tensors skip it).
    """

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, spatial_shape: Sequence[int],
                 stride=1, batch_size: int | None = None, check: bool = True,
                 _cache: KernelMapCache | None = None, _coord_id: int | None = None) -> None:
        if feats.dim() != 2 or coords.dim() != 2 or coords.shape[1] != 4 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"SparseTensor: expected feats (N, C) and coords (N, 4), got {tuple(feats.shape)} "
                             f"and {tuple(coords.shape)}")
        if coords.dtype != torch.int32:
            coords = coords.int()
        self.feats = feats
        self.coords = coords.contiguous()
        self.spatial_shape = _triple(spatial_shape, "spatial_shape")
        self.stride = _triple(stride, "stride")
        self.batch_size = -1 if batch_size is None else int(batch_size)
        self.cache = _cache if _cache is not None else KernelMapCache()
        self.coord_id = next(_coord_ids) if _coord_id is None else _coord_id
        if check:
            self._validate()
        elif self.batch_size < 0:
            self.batch_size = int(self.coords[:, 0].max()) + 1 if self.coords.shape[0] else 0

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Range and uniqueness checks; on CUDA one host transfer for all of them (and for batch_size)."""
        c = self.coords
        if c.shape[0] == 0:
            self.batch_size = max(self.batch_size, 0)
            return
        keys = linear_keys(c, self.spatial_shape)
        skeys, order = torch.sort(keys)
        dup = skeys[1:] == skeys[:-1]
        stats = torch.cat([c.min(0).values.long(), c.max(0).values.long(), dup.sum().reshape(1)]).tolist()
        lo, hi, n_dup = stats[:4], stats[4:8], stats[8]
        if self.batch_size < 0:
            self.batch_size = hi[0] + 1
        bounds = (self.batch_size,) + self.spatial_shape
        if min(lo) < 0 or any(hi[i] >= bounds[i] for i in range(4)):
            raise ValueError(f"SparseTensor: coords out of range: min {lo}, max {hi}, "
                             f"(batch_size, X, Y, Z) = {bounds}")
        if n_dup:
            first = int(order[1:][dup][0])
            raise ValueError(f"SparseTensor: {n_dup} duplicate coordinate row(s), e.g. "
                             f"(batch, x, y, z) = {c[first].tolist()}; merge duplicates (e.g. by voxelization) "
                             "before building a SparseTensor")
        self.cache.put(("sorted_keys", self.coord_id), (skeys, order))

    # ------------------------------------------------------------------ derived tensors
    def replace_feature(self, feats: torch.Tensor) -> "SparseTensor":
        """Same sites (and shared kernel-map cache), new features (N, C')."""
        if feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"replace_feature: {feats.shape[0]} rows for {self.coords.shape[0]} sites")
        return SparseTensor(feats, self.coords, self.spatial_shape, self.stride, self.batch_size, check=False,
                            _cache=self.cache, _coord_id=self.coord_id)

    @property
    def features(self) -> torch.Tensor:  # spconv spelling
        return self.feats

    @property
    def indices(self) -> torch.Tensor:  # spconv spelling
        return self.coords

    def __len__(self) -> int:
        return self.coords.shape[0]

    def __repr__(self) -> str:
        return (f"SparseTensor(N={self.coords.shape[0]}, C={self.feats.shape[1]}, spatial_shape={self.spatial_shape}, "
                f"stride={self.stride}, batch_size={self.batch_size}, dtype={self.feats.dtype}, "
                f"device={self.feats.device})")

    # ------------------------------------------------------------------ dense conversion
    def dense(self) -> torch.Tensor:
        """Scatter to a dense (B, C, X, Y, Z) tensor (zeros at inactive sites); differentiable in feats."""
        X, Y, Z = self.spatial_shape
        B, C = self.batch_size, self.feats.shape[1]
        out = self.feats.new_zeros(B * X * Y * Z, C)
        if self.coords.shape[0]:
            out = out.index_put((linear_keys(self.coords, self.spatial_shape),), self.feats)
        return out.view(B, X, Y, Z, C).permute(0, 4, 1, 2, 3)

    def to_bev(self) -> torch.Tensor:
        """Dense BEV map (B, C*Z, X, Y), channel index c*Z + z, as BEVFusion's SparseEncoder output
        (`dense()` then permute and reshape, written directly into the final layout)."""
        X, Y, Z = self.spatial_shape
        B, C = self.batch_size, self.feats.shape[1]
        out = self.feats.new_zeros(B, C, Z * X * Y)
        if self.coords.shape[0]:
            c = self.coords.long()
            out[c[:, 0], :, (c[:, 3] * X + c[:, 1]) * Y + c[:, 2]] = self.feats
        return out.view(B, C * Z, X, Y)

    @classmethod
    def from_dense(cls, x: torch.Tensor, stride=1) -> "SparseTensor":
        """From a dense (B, C, X, Y, Z) tensor; a site is active where any channel is non-zero."""
        if x.dim() != 5:
            raise ValueError(f"from_dense: expected (B, C, X, Y, Z), got {tuple(x.shape)}")
        B, C, X, Y, Z = x.shape
        xl = x.permute(0, 2, 3, 4, 1)  # (B, X, Y, Z, C)
        coords = (xl != 0).any(-1).nonzero().int()
        feats = xl[coords[:, 0].long(), coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()]
        return cls(feats, coords, (X, Y, Z), stride=stride, batch_size=B, check=False)

"""Sparse convolution: ours vs spconv 2.3.8 on a LiDAR-like scene, in one run.

usage: python benchmarks/bench_sparse.py [--device cpu|cuda] [--quick] [--dtype fp32,fp16] [--no-spconv]
                                        [--small] [--skip-layers] [--json PATH]

Scene: a ray-cast 32-beam spinning LiDAR (elevations -30.67..+10.67 deg, 1600 azimuth steps, mounted
1.84 m above the ground), 10 sweeps at 20 Hz while driving at 12 m/s, hitting cars, poles, two rows of
buildings and bushes; voxelised at 0.075 x 0.075 x 0.2 m in [-54, 54]^2 x [-5, 3] m, mean of 5 point
features, into BEVFusion's 1440 x 1440 x 41 grid with (batch, x, y, z) indices. About 110k voxels.
`--small`: one sweep of 100 azimuth steps (about 2.8k voxels, same grid; ours at one thread count) for a
quick check.

Timed (per frame, batch 1; (c) for every dtype first, then (a) and (b)):
 (a) SubMConv3d 16->16 k3 at level 0: kernel map + conv; conv only (cached map); conv fwd+bwd
 (b) SparseConv3d 16->32 k3 s2 p1 at level 0: kernel map + conv fwd; fwd+bwd
 (c) the BEVFusion SparseEncoder (nuScenes 0.075 config, basic blocks) incl. the dense BEV output
     (1, 256, 180, 180): forward (eval BN) and forward+backward (train BN, loss = sum of the output).
     spconv is timed twice: "official" wiring (no indice_key in the block convs, as mmdet3d builds them)
     and "keyed" (blocks share their stage's key). Ours caches maps by geometry, so both wirings are
     the same network for us.
On CPU, spconv runs with one torch thread (it returns wrong values with more); ours is timed at one
thread (the fair ratio) and at all threads. Peak memory of the encoder forward: CUDA max allocated, or
on CPU the peak RSS growth of a child process that runs one forward (not with --small).

spconv is optional: it is first imported in a child process (a broken install can crash the
interpreter); if that fails, its rows are skipped with the reason. `--json PATH` writes the rows in the
shared benchmark format (benchmarks/common.py), rewritten after every table; a contender that fails is
recorded as skipped with its reason, and if one of ours fails the run exits 1.
"""
from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonReport, Record, Row, device_name, one_line, probe_import  # noqa: E402

from bevfusion.ops.sparse import SparseTensor, to_spconv2  # noqa: E402
from bevfusion.ops.sparse import nn as snn  # noqa: E402

RANGE = np.array([-54.0, -54.0, -5.0, 54.0, 54.0, 3.0])
VOXEL = np.array([0.075, 0.075, 0.2])
SPARSE_SHAPE = (1440, 1440, 41)


# ----------------------------------------------------------------------------- scene
def _obstacles(rng: np.random.Generator) -> np.ndarray:
    """Axis-aligned boxes (xmin, ymin, zmin, xmax, ymax, zmax), ground at z = 0 (sensor frame z + 1.84)."""
    out = []
    for _ in range(45):  # cars on a road along x
        cx, cy = rng.uniform(-60, 60), rng.choice([-6.0, -2.5, 2.5, 6.0]) + rng.normal(0, 0.3)
        if abs(cx) < 6 and abs(cy) < 4:
            continue
        lx, ly, h = rng.uniform(3.8, 5.2), rng.uniform(1.7, 2.1), rng.uniform(1.4, 1.9)
        if rng.random() < 0.5:
            lx, ly = ly, lx
        out.append((cx - lx / 2, cy - ly / 2, 0, cx + lx / 2, cy + ly / 2, h))
    for _ in range(40):  # pedestrians and poles
        cx, cy, s = rng.uniform(-55, 55), rng.choice([-1, 1]) * rng.uniform(8.5, 11), rng.uniform(0.3, 0.7)
        out.append((cx - s / 2, cy - s / 2, 0, cx + s / 2, cy + s / 2, rng.uniform(1.6, 6)))
    for near, depth, gaps in (((12, 16), (3, 15), (3, 20)), ((28, 40), (10, 10), (3, 10))):
        for side in (-1, 1):  # building rows with gaps
            x = -70.0
            while x < 70:
                length = rng.uniform(8, 30)
                y0 = side * rng.uniform(*near)
                y1 = y0 + side * rng.uniform(*depth)
                out.append((x, min(y0, y1), 0, x + length, max(y0, y1), rng.uniform(4, 20)))
                x += length + rng.uniform(*gaps)
    for _ in range(60):  # bushes, barriers
        cx, cy = rng.uniform(-60, 60), rng.choice([-1, 1]) * rng.uniform(9, 26)
        sx, sy = rng.uniform(0.5, 4), rng.uniform(0.5, 4)
        out.append((cx - sx / 2, cy - sy / 2, 0, cx + sx / 2, cy + sy / 2, rng.uniform(0.5, 2.5)))
    return np.asarray(out, dtype=np.float64)


def _cast(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Distance to the first hit (ground plane or box slab test), inf if none within 1..70 m."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)
        inv = 1.0 / np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)
    for s in range(0, len(dirs), 16384):
        iv = inv[s:s + 16384, None]
        a = (boxes[None, :, :3] - origin) * iv
        b = (boxes[None, :, 3:] - origin) * iv
        t0 = np.minimum(a, b).max(-1)
        t1 = np.maximum(a, b).min(-1)
        hit = np.where(t1 >= np.maximum(t0, 0), np.maximum(t0, 0), np.inf).min(-1)
        t[s:s + 16384] = np.minimum(t[s:s + 16384], hit)
    t[(t > 70) | (t < 1)] = np.inf
    return t


def make_scene(seed: int = 0, sweeps: int = 10, azimuths: int = 1600):
    """Returns coords (N, 4) int32 (batch 0, x, y, z) and feats (N, 5) float32 (x, y, z, intensity, lag)."""
    rng = np.random.default_rng(seed)
    boxes = _obstacles(rng)
    elev = np.deg2rad(np.linspace(-30.67, 10.67, 32))
    pts = []
    for sweep in range(sweeps):
        lag = sweep * 0.05
        origin = np.array([-12.0 * lag, 0.0, 1.84])
        az = np.arange(azimuths) * (2 * np.pi / azimuths) + rng.uniform(0, 2 * np.pi / azimuths)
        e, a = np.meshgrid(elev, az, indexing="ij")
        d = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)
        t = _cast(origin, d, boxes)
        ok = np.isfinite(t)
        p = origin + d[ok] * (t[ok] + rng.normal(0, 0.02, ok.sum()))[:, None]
        p[:, 2] -= 1.84
        pts.append(np.column_stack([p, rng.integers(0, 256, len(p)), np.full(len(p), lag)]))
    p = np.concatenate(pts)
    p = p[np.all((p[:, :3] >= RANGE[:3]) & (p[:, :3] < RANGE[3:]), 1)]
    grid = np.round((RANGE[3:] - RANGE[:3]) / VOXEL).astype(np.int64)
    c = np.minimum(np.floor((p[:, :3] - RANGE[:3]) / VOXEL).astype(np.int64), grid - 1)
    key = (c[:, 0] * grid[1] + c[:, 1]) * grid[2] + c[:, 2]
    uniq, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    feats = np.stack([np.bincount(inv, p[:, j], len(uniq)) for j in range(5)], 1) / cnt[:, None]
    coords = np.stack([np.zeros_like(uniq), uniq // (grid[1] * grid[2]), (uniq // grid[2]) % grid[1],
                       uniq % grid[2]], 1)
    return coords.astype(np.int32), feats.astype(np.float32)


def load_scene(small: bool = False):
    """The scene, cached in the temp folder (building the full one takes seconds)."""
    path = os.path.join(tempfile.gettempdir(), f"bevfusion_bench_sparse_scene_v1{'_small100' if small else ''}.npz")
    if os.path.exists(path):
        try:
            d = np.load(path)
            return d["coords"], d["feats"]
        except (OSError, ValueError, KeyError):  # a truncated cache from a killed run: rebuild it
            pass
    coords, feats = make_scene(sweeps=1, azimuths=100) if small else make_scene()
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, coords=coords, feats=feats)
    os.replace(tmp, path)
    return coords, feats


# ----------------------------------------------------------------------------- networks
def _bn(c: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)


def build_ours(impl: str = "auto") -> nn.Module:
    """BEVFusion's SparseEncoder layer stack from our modules (official key names)."""

    def down(cin, cout, pad):
        return snn.SparseSequential(snn.SparseConv3d(cin, cout, 3, stride=2, padding=pad, impl=impl), _bn(cout),
                                    nn.ReLU(inplace=True))

    layers = collections.OrderedDict()
    for i, (c, nxt, pad) in enumerate(((16, 32, 1), (32, 64, 1), (64, 128, (1, 1, 0)), (128, None, None))):
        blocks = [snn.SparseBasicBlock(c, impl=impl), snn.SparseBasicBlock(c, impl=impl)]
        if nxt is not None:
            blocks.append(down(c, nxt, pad))
        layers[f"encoder_layer{i + 1}"] = snn.SparseSequential(*blocks)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_input = snn.SparseSequential(snn.SubMConv3d(5, 16, 3, padding=1, impl=impl), _bn(16),
                                                   nn.ReLU(inplace=True))
            self.encoder_layers = snn.SparseSequential(layers)
            self.conv_out = snn.SparseSequential(
                snn.SparseConv3d(128, 128, (1, 1, 3), stride=(1, 1, 2), padding=0, impl=impl), _bn(128),
                nn.ReLU(inplace=True))

        def forward(self, x: SparseTensor) -> torch.Tensor:
            return self.conv_out(self.encoder_layers(self.conv_input(x))).to_bev()

    return Encoder()


def build_spconv(ours: nn.Module, keyed: bool) -> nn.Module:
    """The same network in spconv, sharing our BatchNorms and copying our conv weights."""
    import spconv.pytorch as sp

    def conv(m, cls, key=None):
        s = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, bias=False,
                indice_key=key)
        with torch.no_grad():
            s.weight.copy_(to_spconv2(m.weight, m.kernel_size))
        return s

    class Block(sp.SparseModule):
        def __init__(self, b, key):
            super().__init__()
            self.b = b
            self.conv1 = conv(b.conv1, sp.SubMConv3d, key)
            self.conv2 = conv(b.conv2, sp.SubMConv3d, key)

        def forward(self, x):
            idt = x.features
            o = self.conv1(x)
            o = o.replace_feature(self.b.relu(self.b.bn1(o.features)))
            o = self.conv2(o)
            return o.replace_feature(self.b.relu(self.b.bn2(o.features) + idt))

    seq = [sp.SparseSequential(conv(ours.conv_input[0], sp.SubMConv3d, "subm1"), ours.conv_input[1], nn.ReLU())]
    for i, layer in enumerate(ours.encoder_layers):
        key = f"subm{i + 1}" if keyed else None
        mods = [Block(layer[0], key), Block(layer[1], key)]
        if len(layer) == 3:
            mods += [conv(layer[2][0], sp.SparseConv3d, f"spconv{i + 1}"), layer[2][1], nn.ReLU()]
        seq.append(sp.SparseSequential(*mods))
    seq.append(sp.SparseSequential(conv(ours.conv_out[0], sp.SparseConv3d, "out"), ours.conv_out[1], nn.ReLU()))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = sp.SparseSequential(*seq)

        def forward(self, x):
            d = self.net(x).dense()  # (B, C, X, Y, Z)
            b, c, h, w, z = d.shape
            return d.permute(0, 1, 4, 2, 3).reshape(b, c * z, h, w)

    return Net()


# ----------------------------------------------------------------------------- measurements
def _spconv():
    """spconv.pytorch, or None if it does not import (tried in a child first: it can crash)."""
    _, why = probe_import("spconv.pytorch")
    if why is not None:
        return None
    import spconv.pytorch as sp

    return sp


class Runner:
    """Times contenders round-robin (one call of each in turn, repeated), so that load from other
    processes on a shared machine hits all of them alike, and prints one table per measurement."""

    def __init__(self, device: str, quick: bool, report: JsonReport):
        self.device = device
        self.quick = quick
        self.report = report
        self.failed: list[str] = []

    def compare(self, title: str, contenders: list[tuple[str, object, int]], heavy: bool = False,
                dtype: str = "fp32", extra: dict | None = None) -> None:
        """contenders: (label, fn, torch threads). Reports median wall and CPU time per call.
        extra: label -> (relerr, note) added to that row."""
        if self.device == "cuda":
            reps = 10 if self.quick else 30
        else:
            reps = (2 if self.quick else 4) if heavy else (3 if self.quick else 7)
        live = []
        for label, fn, nt in contenders:
            try:
                self._call(fn, nt)  # warm-up (compiles, tunes, builds caches)
                live.append((label, fn, nt))
            except Exception as e:  # noqa: BLE001 - e.g. spconv CPU has no backward
                if not label.startswith("spconv"):
                    import traceback

                    traceback.print_exc()
                    self.failed.append(f"{title}: {label}")
                self.report.skip(f"{title}: {label}", f"not timed: {one_line(e)}")
                if self.device == "cuda":
                    torch.cuda.empty_cache()
        walls = {lab: [] for lab, _, _ in live}
        cpus = {lab: [] for lab, _, _ in live}
        for _ in range(reps):
            for label, fn, nt in live:
                w, c = self._call(fn, nt)
                walls[label].append(w)
                cpus[label].append(c)
        med = {lab: (statistics.median(walls[lab]), statistics.median(cpus[lab])) for lab in walls}
        ref = next((n for n in ("spconv keyed, 1 thread", "spconv keyed", "spconv, 1 thread", "spconv") if n in med),
                   None)
        off = next((n for n in ("spconv official, 1 thread", "spconv official") if n in med), None)
        rows = []
        for label, (w, c) in med.items():
            err, note = (extra or {}).get(label, (None, ""))
            notes = [note] if note else []
            if self.device == "cpu":
                notes.append(f"cpu {c:.1f} ms")
            if off and not label.startswith("spconv"):
                notes.append(f"{med[off][0] / w:.2f}x vs spconv official")
            if ref and self.device == "cpu" and not label.startswith("spconv"):
                notes.append(f"cpu-time ratio {med[ref][1] / c:.2f}x")
            notes.append(f"median of {reps}")
            rows.append(Row(label, w, "; ".join(notes), relerr=err))
        self.report.table(title, rows, dtype, baseline=ref)

    def _call(self, fn, nt: int) -> tuple[float, float]:
        if self.device == "cpu":
            torch.set_num_threads(nt)
        else:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def _label(name: str, nt: int, device: str) -> str:
    if device != "cpu":
        return name
    return f"{name}, {nt} thread{'s' if nt > 1 else ''}"


def bench_layers(run: Runner, coords, dtype, dn, sp, thread_list):
    dev = run.device
    n = coords.shape[0]
    x16 = torch.randn(n, 16, device=dev, dtype=dtype)
    g16 = torch.randn(n, 16, device=dev, dtype=dtype)
    subm = snn.SubMConv3d(16, 16, 3, padding=1).to(dev, dtype)
    down = snn.SparseConv3d(16, 32, 3, stride=2, padding=1).to(dev, dtype)

    def ours_tensor(f):
        return SparseTensor(f, coords, SPARSE_SHAPE, batch_size=1)

    cached = ours_tensor(x16)
    xg = x16.clone().requires_grad_()
    cached_g = cached.replace_feature(xg)
    with torch.no_grad():
        subm(cached)
        gd = torch.randn_like(down(cached).feats)

    def no_grad(fn):
        def f():
            with torch.no_grad():
                fn()
        return f

    a1, a2, a3, b1, b2 = [], [], [], [], []
    for nt in thread_list:
        lab = _label("ours", nt, dev)
        a1.append((lab, no_grad(lambda: subm(ours_tensor(x16))), nt))
        a2.append((lab, no_grad(lambda: subm(cached)), nt))
        a3.append((lab, lambda: subm(cached_g).feats.backward(g16), nt))
        b1.append((lab, no_grad(lambda: down(ours_tensor(x16))), nt))
        b2.append((lab, lambda: down(ours_tensor(xg)).feats.backward(gd), nt))
    if sp is not None:
        lab = _label("spconv", 1, dev)
        s_nokey = sp.SubMConv3d(16, 16, 3, padding=1, bias=False).to(dev, dtype)
        s_key = sp.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="k0").to(dev, dtype)
        s_down = sp.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False).to(dev, dtype)

        def sp_tensor(f):
            return sp.SparseConvTensor(f, coords, list(SPARSE_SHAPE), 1)

        if dev == "cpu":
            torch.set_num_threads(1)
        with torch.no_grad():
            warm = s_key(sp_tensor(x16))
        warm_g = warm.replace_feature(xg)
        a1.append((lab, no_grad(lambda: s_nokey(sp_tensor(x16))), 1))
        a2.append((lab, no_grad(lambda: s_key(warm)), 1))
        a3.append((lab, lambda: s_key(warm_g).features.backward(g16), 1))
        b1.append((lab, no_grad(lambda: s_down(sp_tensor(x16))), 1))
        b2.append((lab, lambda: s_down(sp_tensor(xg)).features.backward(gd), 1))
    run.compare(f"(a) SubMConv3d 16->16 k3 at L0 ({n} voxels): kernel map + conv, fwd [{dn}]", a1, dtype=dn)
    run.compare(f"(a) same, conv only (cached map), fwd [{dn}]", a2, dtype=dn)
    run.compare(f"(a) same, conv only (cached map), fwd+bwd [{dn}]", a3, dtype=dn)
    run.compare(f"(b) SparseConv3d 16->32 k3 s2 p1 at L0: kernel map + conv, fwd [{dn}]", b1, dtype=dn)
    run.compare(f"(b) same, fwd+bwd [{dn}]", b2, dtype=dn)


ENCODER_FWD = "(c) SparseEncoder fwd (eval BN), kernel maps + dense BEV (1, 256, 180, 180)"


def bench_encoder(run: Runner, coords, feats5, dtype, dn, sp, thread_list, small=False):
    dev = run.device
    torch.manual_seed(0)
    ours = build_ours().to(dev)
    nets = [("ours", ours)]
    if sp is not None:
        nets += [("spconv official", build_spconv(ours, keyed=False).to(dev)),
                 ("spconv keyed", build_spconv(ours, keyed=True).to(dev))]
    for _, m in nets:
        m.to(dtype)
    f = feats5.to(dtype)

    def inp(name, ff):
        if name == "ours":
            return SparseTensor(ff, coords, SPARSE_SHAPE, batch_size=1)
        return sp.SparseConvTensor(ff, coords, list(SPARSE_SHAPE), 1)

    extra = {}
    if sp is not None:  # same weights, same BN: the outputs must agree (spconv at one thread)
        if dev == "cpu":
            torch.set_num_threads(1)
        try:
            with torch.no_grad():
                for _, m in nets:
                    m.eval()
                a = nets[0][1](inp("ours", f)).float()
                b = nets[2][1](inp("spconv", f)).float()
                err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
            print(f"\nencoder output {tuple(a.shape)}: max |ours - spconv| / max |spconv| = {err:.2e}")
            for nt in thread_list:
                extra[_label("ours", nt, dev)] = (err, "relerr: max |ours - spconv keyed| / max |spconv keyed|")
            del a, b
        except Exception as e:  # noqa: BLE001 - the timing below says which side fails
            run.report.skip(f"encoder output check ours vs spconv [{dn}]", f"failed: {one_line(e)}")

    def fwd(name, m):
        def f_():
            m.eval()
            with torch.no_grad():
                m(inp(name, f))
        return f_

    def fwd_bwd(name, m):
        def f_():
            m.train()
            m(inp(name, f)).sum().backward()
        return f_

    cf, cb = [], []
    for name, m in nets:
        for nt in (thread_list if name == "ours" else [1]):
            cf.append((_label(name, nt, dev), fwd(name, m), nt))
            cb.append((_label(name, nt, dev), fwd_bwd(name, m), nt))
    run.compare(f"{ENCODER_FWD} [{dn}]", cf, heavy=True, dtype=dn, extra=extra)
    run.compare(f"(c) SparseEncoder fwd+bwd (train BN, loss = sum) [{dn}]", cb, heavy=True, dtype=dn)
    for _, m in nets:
        m.eval()
    if dev != "cuda" and small:
        run.report.skip(f"encoder fwd peak memory [{dn}]", "CPU with --small: no child-process RSS measurement")
        return
    title = f"(c) encoder fwd peak memory [{dn}]"
    kind = ("CUDA max allocated on top of the inputs (one forward after warm-up, output included)" if dev == "cuda"
            else "peak RSS growth (VmHWM) of a child process")
    for name, m in nets:
        try:
            if dev == "cuda":
                mb = cuda_encoder_peak(lambda: m(inp(name, f)))
            else:
                mb = peak_memory(run.device, name, dn, small)
        except Exception as e:  # noqa: BLE001
            mb, why = None, one_line(e)
        else:
            why = "the measuring child failed (see the log)"
        if mb is None:
            run.report.skip(f"{title}: {name}", why)
            continue
        print(f"{title}: {name}: {mb:.1f} MiB ({kind})")
        run.report.add(Record(table=title, what=name, dtype=dn, peak_mib=mb, note=kind))


def cuda_encoder_peak(run_once) -> float:
    """Peak CUDA memory (MiB) one no-grad forward allocates on top of what is allocated before it."""
    with torch.no_grad():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run_once()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
    return peak / 2**20


def peak_memory(device: str, who: str, dn: str, small: bool = False) -> float | None:
    """Peak memory of one encoder forward (eval, no grad), measured in a fresh child process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", who, "--device", device, "--dtype", dn]
    if small:
        cmd.append("--small")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"memory child for {who} failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return float(r.stdout.strip().splitlines()[-1])


def _vm_hwm_kib() -> float:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def mem_child(who: str, device: str, dn: str, small: bool = False) -> None:
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dn]
    torch.set_num_threads(1)
    c, f = load_scene(small)
    coords = torch.from_numpy(c).to(device)
    feats = torch.from_numpy(f).to(device, dtype)
    torch.manual_seed(0)
    ours = build_ours()
    sp = _spconv()
    net = ours if who == "ours" else build_spconv(ours, keyed=(who == "spconv keyed"))
    net = net.to(device, dtype).eval()

    def run():
        if who == "ours":
            return net(SparseTensor(feats, coords, SPARSE_SHAPE, batch_size=1))
        return net(sp.SparseConvTensor(feats, coords, list(SPARSE_SHAPE), 1))

    with torch.no_grad():
        # one-time library loading (numba's compiled kernels, spconv's kernels) is not per-forward memory:
        # run both nets once on a tiny input first
        tiny = coords[:: max(1, coords.shape[0] // 500)].contiguous()
        fs = feats[: tiny.shape[0]]
        if who == "ours":
            net(SparseTensor(fs, tiny, SPARSE_SHAPE, batch_size=1))
        else:
            net(sp.SparseConvTensor(fs, tiny, list(SPARSE_SHAPE), 1))
        if device == "cuda":
            run()  # compile / tune outside the measured call
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = run()
            torch.cuda.synchronize()
            print((torch.cuda.max_memory_allocated() - base) / 2**20)
            del out
        else:
            import gc

            gc.collect()
            base = _vm_hwm_kib()
            out = run()
            peak = _vm_hwm_kib()
            del out
            print((peak - base) / 1024)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None,
                    help="comma list of fp32, fp16, bf16 (default fp32 on CPU, fp32,fp16 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--small", action="store_true", help="a small scene (one short sweep) for a quick check")
    ap.add_argument("--no-spconv", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here (shared benchmark format)")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dts = (args.dtype or ("fp32" if args.device == "cpu" else "fp32,fp16")).split(",")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    bad = [d for d in dts if d not in dtypes]
    if bad:
        ap.error(f"--dtype: unknown {bad} (choose from {sorted(dtypes)})")
    if args.mem_child:
        mem_child(args.mem_child, args.device, dts[0], args.small)
        return 0
    threads = torch.get_num_threads()
    thread_list = sorted({1, threads}) if args.device == "cpu" and not args.small else [threads]
    report = JsonReport(args.json, "sparse", device_name(args.device))
    run = Runner(args.device, args.quick, report)
    t0 = time.time()
    c, f = load_scene(args.small)
    coords = torch.from_numpy(c).to(args.device)
    feats = torch.from_numpy(f).to(args.device)
    if args.no_spconv:
        sp = None
        report.skip("spconv rows", "--no-spconv")
    else:
        ver, why = probe_import("spconv.pytorch")
        sp = None
        if why is None:
            try:
                import spconv.pytorch as sp
            except Exception as e:  # noqa: BLE001 - imported in the child but not here
                why = f"import spconv.pytorch failed: {one_line(e)}"
        if why is not None:
            report.skip("spconv rows (official and keyed)", why)
    print(f"# bench_sparse: {device_name(args.device)}; torch {torch.__version__}; "
          f"spconv {'absent' if sp is None else ver}")
    print(f"scene: {coords.shape[0]} voxels in {SPARSE_SHAPE} (scene build/load {time.time() - t0:.1f} s)")
    print("load average at start: %.1f %.1f %.1f" % os.getloadavg())
    if args.device == "cpu":
        print("spconv runs with 1 torch thread (wrong results with more); ours at 1 thread and at "
              f"{threads} threads")
    # the encoders first: if a time limit stops the run, the whole-network numbers are already written
    for dn in dts:
        bench_encoder(run, coords, feats, dtypes[dn], dn, sp, thread_list, small=args.small)
    if not args.skip_layers:
        for dn in dts:
            bench_layers(run, coords, dtypes[dn], dn, sp, thread_list)
    torch.set_num_threads(threads)
    print("\nload average at end: %.1f %.1f %.1f" % os.getloadavg())
    print(f"total {time.time() - t0:.0f} s")
    if run.failed:
        print(f"contenders of ours that failed: {run.failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

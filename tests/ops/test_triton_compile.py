"""Every Triton kernel launch that bevfusion can make compiles ahead of time for sm_80 and sm_90.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels on CPU) does not type-check
like the compiler, and it says nothing about registers or shared memory. Here every launch variant
of `bevfusion.ops.triton_aot` (built by each op's `aot_variants()` from the launchers' own tables) is
compiled to a cubin with the ptxas of the triton wheel (no GPU needed), and:
- hot kernels (BEV pooling forward/backward, sparse implicit GEMM, voxelization) must not spill;
- shared memory per block must fit sm_80 (163 KiB), for both targets;
- PTX checks declared by a variant hold (IEEE float32 division in voxelization).
The kernels of this process are interpreter objects (conftest sets TRITON_INTERPRET before they are
decorated), so the compiles run in a compile server: one child process per test worker, without
TRITON_INTERPRET and with its own cold Triton cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("triton")

from bevfusion.ops import triton_aot  # noqa: E402

VARIANTS = triton_aot.all_variants()  # only names and launch tables are read here
EDGES = triton_aot.edge_variants(VARIANTS)
BY_ID = {v.id: v for v in VARIANTS + EDGES}
# The rotated-IoU kernel takes 10-35 CPU seconds per variant to compile (ptxas on a kernel that spills
# kilobytes; see docs/PERFORMANCE.md), 40 % of the whole compile time, the other ~1190 cases 0.2 s each: the
# default suite compiles one IoU variant (float32, all pairs, sm_90: what NMS launches), the slow suite the rest.
def _marks(v, cc):
    slow = triton_aot.kernel_name(v.kernel) == "_iou_kernel" and (cc, v.label) != (90, "fp32 all pairs")
    return [pytest.mark.slow] if slow else []


CASES = ([pytest.param(v.id, cc, id=f"sm{cc}-{v.id}", marks=_marks(v, cc)) for cc in triton_aot.TARGETS
          for v in VARIANTS]
         + [pytest.param(v.id, 90, id=f"sm90-{v.id}", marks=_marks(v, None)) for v in EDGES])


class _CompileServer:
    """`python -m bevfusion.ops.triton_aot serve` in a child process; restarted if it dies."""

    def __init__(self, folder):
        self.folder = folder
        self.proc = None

    def _start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences triton 3.9's notice
        self.log = open(self.folder / f"server-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "bevfusion.ops.triton_aot", "serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)

    def ask(self, vid: str, cc: int) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(f"{vid}\t{cc}\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            self.proc = None
            return {"ok": False, "error": f"compile server exited ({tail})", "resources": None, "ptx_problems": []}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = _CompileServer(tmp_path_factory.mktemp("triton_aot"))
    yield s
    s.close()


@pytest.mark.parametrize("vid,cc", CASES)
def test_compiles(server, vid, cc):
    r = server.ask(vid, cc)
    bad = triton_aot.problems(BY_ID[vid], r)
    assert not bad, f"{vid} sm_{cc}: " + "; ".join(bad)


# ----------------------------------------------------------------------------- the variant list itself
def test_every_kernel_is_covered():
    """Every @triton.jit function in bevfusion/ops/*/triton.py is launched by a variant or called by one."""
    assert triton_aot.triton_modules(), "no bevfusion/ops/*/triton.py found"
    assert triton_aot.coverage_problems(VARIANTS) == []
    assert {v.op for v in VARIANTS} == {"bev_pool", "boxes", "sparse", "voxelize"}


@pytest.mark.parametrize("dropped,expected", [
    ("_scatter_kernel", ["bevfusion.ops.voxelize.triton._scatter_kernel"]),
    # the IoU kernel's helpers are reached only through it
    ("_iou_kernel", ["bevfusion.ops.boxes.triton._clip", "bevfusion.ops.boxes.triton._iou_kernel",
                     "bevfusion.ops.boxes.triton._next_slot"]),
])
def test_coverage_check_finds_a_kernel_without_variants(dropped, expected):
    rest = [v for v in VARIANTS if triton_aot.kernel_name(v.kernel) != dropped]
    problems = triton_aot.coverage_problems(rest)
    assert [p.split(":")[0] for p in problems] == expected


def test_variant_ids_and_hot_kernels():
    ids = [v.id for v in VARIANTS]
    assert len(ids) == len(set(ids))
    hot = {(v.op, triton_aot.kernel_name(v.kernel)) for v in VARIANTS if v.hot}
    assert hot == {("bev_pool", "_pool_fwd_kernel"), ("bev_pool", "_pool_bwd_kernel"), ("bev_pool", "_lift_fwd_kernel"),
                   ("bev_pool", "_lift_bwd_depth_kernel"), ("bev_pool", "_lift_bwd_feats_kernel"),
                   ("sparse", "_igemm_kernel"), ("voxelize", "_cells_kernel"), ("voxelize", "_scatter_kernel")}


def test_launch_rejects_a_wrong_argument_list():
    from bevfusion.ops.voxelize import triton as V

    with pytest.raises(ValueError, match="missing.*F.*unknown.*G"):
        triton_aot.launch("voxelize", V._scatter_kernel, "x", hot=False, meta=dict(BLOCK=64, BLOCK_F=8),
                          args=dict(p_ptr="*fp32", stride_p="i32", stride_f=1, slots_ptr="*i64", out_ptr="*fp32",
                                    P="i32", G=3))


def test_jit_specialisation_rules():
    from bevfusion.ops.voxelize import triton as V

    v = triton_aot.launch("voxelize", V._scatter_kernel, "x", hot=False, meta=dict(BLOCK=64, BLOCK_F=8),
                          args=dict(p_ptr="*fp32", stride_p=5, stride_f=1, slots_ptr="*i64", out_ptr="*fp32",
                                    P=2**31, F=32))
    sig, consts, attrs = v.specialise()
    assert sig["stride_p"] == "i32" and sig["stride_f"] == "constexpr" and consts["stride_f"] == 1
    assert sig["P"] == "i64" and sig["F"] == "i32"
    names = V._scatter_kernel.arg_names
    assert sorted(attrs) == sorted((names.index(n),) for n in ("p_ptr", "slots_ptr", "out_ptr", "P", "F"))
    # the same rules as the installed triton's JIT (an internal function: checked where it exists)
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return
    for value in (1, 5, 32, 2**31 - 1, 2**31, 2**31 + 16):
        v = triton_aot.launch("voxelize", V._scatter_kernel, "x", hot=False, meta=dict(BLOCK=64, BLOCK_F=8),
                              args=dict(p_ptr="*fp32", stride_p=5, stride_f=5, slots_ptr="*i64", out_ptr="*fp32",
                                        P=value, F=5))
        sig, consts, attrs = v.specialise()
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        assert sig["P"] == ty and (consts.get("P") == 1) == (ty == "constexpr")
        assert ((names.index("P"),) in attrs) == (key == "D"), value


# ----------------------------------------------------------------------------- variants vs real launches
class _Recorder:
    """Stands in for a kernel: records `kernel[grid](*args, **kwargs)` instead of running it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))
        return call


def _kind(a) -> str:
    """Pointer type of a tensor or pointer spec; "int" for an int value or type (values are not compared)."""
    if isinstance(a, torch.Tensor):
        return triton_aot.ptr(a.dtype)
    return a if isinstance(a, str) and a.startswith("*") else "int"


def _shape(op, kernel, args, meta):
    """What a launch compiles to, up to integer values: kernel, constexprs, options, argument kinds."""
    names = [n for n in kernel.arg_names if n not in meta]
    assert len(names) == len(args), (kernel, names, len(args))
    return (op, triton_aot.kernel_name(kernel), tuple((n, _kind(a)) for n, a in zip(names, args)),
            tuple(sorted(meta.items(), key=str)))


def _variant_shapes():
    out = set()
    for v in VARIANTS:
        options = {k: getattr(v, k) for k in ("num_warps", "num_stages") if getattr(v, k) is not None}
        meta = dict(v.constexprs, **options)
        out.add(_shape(v.op, v.kernel, [s for _, s in v.args], meta))
    return out


def _record(monkeypatch, module, names):
    calls = []
    for n in names:
        monkeypatch.setattr(module, n, _Recorder(getattr(module, n), calls))
    return calls


def test_variants_match_real_launches(monkeypatch):
    """Run the launchers with recording stand-ins for the kernels (GPU tables, nothing executes) and check
    that each launch is one of the variants: the argument lists of aot_variants() mirror the launchers."""
    from bevfusion.ops.bev_pool import bev_pool_plan
    from bevfusion.ops.bev_pool import triton as BP
    from bevfusion.ops.boxes import triton as BX
    from bevfusion.ops.sparse import triton as SP
    from bevfusion.ops.sparse.kmap import build_subm_kmap
    from bevfusion.ops.sparse.tensor import SparseTensor
    from bevfusion.ops.voxelize import triton as VX

    monkeypatch.setattr(BP, "_interpreting", lambda: False)
    launches = []
    gen = torch.Generator().manual_seed(0)

    calls = _record(monkeypatch, BP, ["_pool_fwd_kernel", "_pool_bwd_kernel", "_lift_fwd_kernel",
                                      "_lift_bwd_depth_kernel", "_lift_bwd_feats_kernel"])
    bn, d, fh, fw = 2, 3, 5, 7
    n = bn * d * fh * fw
    coords = torch.stack([torch.randint(0, 9, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen),
                          torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)], 1)
    plan = bev_pool_plan(coords, 1, (1, 9, 9))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for c in (3, 80):
            feats = torch.randn(n, c, generator=gen).to(dtype)
            BP.pool_forward(feats, plan)
            BP.pool_backward(torch.randn(plan.num_cells, c, generator=gen).to(dtype), plan)
            depth = torch.rand(bn, d, fh, fw, generator=gen).to(dtype)
            pix = torch.randn(bn, fh, fw, c, generator=gen).to(dtype)
            BP.lift_forward(depth, pix, plan)
            BP.lift_backward(torch.randn(plan.num_cells, c, generator=gen).to(dtype), depth, pix, plan)
    launches += [("bev_pool", *c) for c in calls]

    calls = _record(monkeypatch, SP, ["_igemm_kernel", "_gather_scatter_kernel", "_wgrad_kernel"])
    pts = torch.unique(torch.randint(0, 6, (40, 3), generator=gen), dim=0)
    xc = torch.cat([torch.zeros(len(pts), 1, dtype=torch.int32), pts.int()], 1)
    for cin, cout in ((5, 16), (32, 64)):
        x = SparseTensor(torch.randn(len(pts), cin, generator=gen), xc, (6, 6, 6))
        kmap = build_subm_kmap(x, 3, 1)
        for dtype in SP.SUPPORTED_DTYPES:
            feats = x.feats.to(dtype)
            weight = torch.randn(kmap.kernel_volume, cin, cout, generator=gen).to(dtype)
            grad = torch.randn(kmap.n_out, cout, generator=gen).to(dtype)
            for direction, f, w, km in (("fwd", feats, weight, kmap),
                                        ("dgrad", grad, weight.transpose(1, 2), kmap.transposed())):
                cands = SP.candidates(direction, w.shape[1], w.shape[2], dtype)
                for name, cfg in cands + [("igemm", None), ("gather", None)]:
                    (SP.igemm if name == "igemm" else SP.gather_scatter)(f, w, km, cfg)
            for _, cfg in SP.candidates("wgrad", cin, cout, dtype) + [("wgrad", None)]:
                SP.wgrad(feats, grad, kmap, cfg)
    launches += [("sparse", *c) for c in calls]

    calls = _record(monkeypatch, VX, ["_cells_kernel", "_scatter_kernel"])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        p = torch.rand(37, 5, generator=gen).to(dtype) * 10
        VX.cells_and_keys(p, (0.5, 0.5, 0.5), (0, 0, 0, 10, 10, 10))
        VX.cells_and_keys(p.t().contiguous().t(), (0.5, 0.5, 0.5), (0, 0, 0, 10, 10, 10))  # column-major
        VX.scatter_slots(p, torch.arange(37), 37, 1)
    launches += [("voxelize", *c) for c in calls]

    calls = _record(monkeypatch, BX, ["_iou_kernel", "_points_kernel"])
    for bdt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        boxes = torch.rand(6, 7, generator=gen).to(bdt) + 1
        for aligned in (False, True):
            if bdt in BX.IOU_GPU_DTYPES:  # the dispatcher sends float64 boxes on a GPU to the CPU path
                BX.rotated_iou_bev(boxes, boxes, aligned)
                BX.rotated_iou_bev(boxes, boxes, aligned, area=True)  # rotated_intersection_bev, min_union > 0
        for pdt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            BX.points_in_boxes(torch.rand(37, 4, generator=gen).to(pdt), boxes)
    launches += [("boxes", *c) for c in calls]

    known = _variant_shapes()
    shapes = {_shape(op, k, a, kw) for op, k, a, kw in launches}
    assert {s[1] for s in shapes} == {s[1] for s in known}  # every kernel was launched
    missing = sorted(map(str, shapes - known))
    assert not missing, f"{len(missing)} real launches have no AOT variant, e.g. {missing[:3]}"


# ----------------------------------------------------------------------------- the GPU machine's triton
TRITON_FLOOR = "3.6.0"  # the oldest triton we support (the GPU machine's): no newer Triton API


@pytest.mark.slow
def test_compiles_with_oldest_triton(tmp_path):
    """Install triton==3.6.0 with pip into a temporary folder and compile every variant for sm_90 with it
    (same checks as test_compiles: no spill in hot kernels, shared memory within sm_80)."""
    target = tmp_path / "triton"
    try:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                              "--target", str(target), f"triton=={TRITON_FLOOR}"],
                             capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install triton=={TRITON_FLOOR} took over 30 min (no index reachable?)")
    if pip.returncode:
        lines = [ln for ln in (pip.stderr + pip.stdout).splitlines() if ln.strip()]
        pytest.skip(f"pip could not install triton=={TRITON_FLOOR}: {lines[-1] if lines else pip.returncode}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(target)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-m", "bevfusion.ops.triton_aot", "check", "--cc", "90"], env=env,
                         capture_output=True, text=True, timeout=3600)
    assert f"triton {TRITON_FLOOR}: " in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
    assert res.returncode == 0, res.stdout[-8000:]

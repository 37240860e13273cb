#!/usr/bin/env python3
"""One command for a GPU machine: the `-m gpu` tests, the op benchmarks and the model benchmark, into
DIR/report.json and DIR/report.md.

    python3 tools/gpu_check.py --out DIR [--only S,..] [--skip S,..] [--timeout-scale X] [--budget SECONDS]
                               [--pytest-args "ARGS"] [--site-tar PATH|none] [--allow-cpu] [--list]

Sections, in order (each a child process with its own time limit; its output goes to DIR/logs/NAME.log):
  env       device, driver (nvidia-smi), versions, copy bandwidth (1 GiB), which optional peers import
  bev_pool  benchmarks/bench_bev_pool.py --quick: fp32, fp16; cached plan vs the memory floor and the peers
  voxelize  benchmarks/bench_voxelize.py --quick
  boxes     benchmarks/bench_boxes.py --quick
  sparse    benchmarks/bench_sparse.py --quick: fp32, fp16; ours vs spconv official / keyed, peak memory
  model     benchmarks/bench_model.py: the released fusion detector, six cameras at the official
            resolution, synthetic inputs: forward fp32 and fp16 autocast, peak memory, one AMP training step
  tests     pytest -m gpu (a time limit per test; junit XML parsed into passed / failed / skipped)
`--only` / `--skip` take section names or the group `ops` (bev_pool, voxelize, boxes, sparse).

Time: every section has a limit (`--list` shows them), scaled by --timeout-scale; the whole run also stops
starting sections once --budget seconds (default 480) are spent and shortens the last one to fit, so it
ends within the budget plus about 15 s. A section over its limit gets SIGINT (pytest then still writes its
XML), then SIGKILL 10 s later; the run goes on with the next section. report.json and report.md are
rewritten (atomically) after every section, so a run killed from outside still leaves a report.

Needs a CUDA device: without one it says so in one line and exits 2, unless --allow-cpu, which runs the
same sections on the CPU with small problem sizes (for checking this tool). Optional peers (spconv,
shapely, nuscenes-devkit) may be missing: their rows are skipped with the reason. --site-tar unpacks an
xz tarball of unpacked wheels (default: .gpu/site.tar.xz when present) into a temp folder and puts it first
on the children's PYTHONPATH; the repository root is put there too, so no install is needed.

Exit status: 0 if every section that ran passed, 1 if one failed or timed out (or was left out for lack of
time), 2 for a usage error or no CUDA device, 130 if stopped by SIGINT / SIGTERM (the report is written).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
if str(REPO) not in sys.path:  # a plain checkout on a GPU machine: the package is not installed
    sys.path.insert(0, str(REPO))
from bevfusion.utils.io import atomic_write_text as write_atomic  # noqa: E402  (temp file + os.replace)

REPORT_VERSION = 1
DEFAULT_BUDGET_S = 480.0
KILL_GRACE_S = 10.0
PYTEST_TEST_TIMEOUT_S = 90.0

# Section limits in seconds on an H100/H200-class GPU, Triton JIT compiles and the sparse autotuner's first
# calls included (the Triton cache is cold on a fresh machine). The tests run last and get what is left of
# the budget, at least 120 s even if every section before them uses its whole limit.
LIMITS = {"env": 40, "bev_pool": 45, "voxelize": 30, "boxes": 30, "sparse": 90, "model": 120, "tests": 150}
ORDER = ("env", "bev_pool", "voxelize", "boxes", "sparse", "model", "tests")
GROUPS = {"ops": ("bev_pool", "voxelize", "boxes", "sparse")}
TITLES = {"env": "environment", "bev_pool": "BEV pooling", "voxelize": "voxelization", "boxes": "box ops",
          "sparse": "sparse convolution", "model": "model (fusion detector)", "tests": "pytest -m gpu"}

# Targets of the issue, checked in the headline.
BEV_POOL_FLOOR_FACTOR = 2.0
SPARSE_MIN_SPEEDUP, SPARSE_AIM_SPEEDUP = 1.0, 1.7
MODEL_MIN_FPS = 25.0
# Row labels the headline reads (benchmarks/bench_bev_pool.py, bench_sparse.py, bench_model.py).
BEV_POOL_OURS, BEV_POOL_FLOOR_SHEET, BEV_POOL_FLOOR_MEASURED = (
    "ours, cached plan", "floor, datasheet bandwidth", "floor, measured copy bandwidth")
SPARSE_FWD_TABLE = "(c) SparseEncoder fwd (eval BN)"
MODEL_E2E = "end to end (incl. decoding)"

BENCH_ROW_KEYS = ("table", "what", "dtype", "ms", "ratio", "ratio_vs", "peak_mib", "relerr", "note")
DTYPES = ("fp32", "fp16", "bf16", "int", "-")


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class Interrupted(Exception):
    """SIGTERM / SIGINT to this tool: the running child is stopped and the report written."""


# ----------------------------------------------------------------------------- small helpers
def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def log_reason(log: Path, limit: int = 200) -> str:
    """The most telling line of a child's log: the last exception / error line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    pat = re.compile(r"(Error|Exception|error:|Traceback|Killed|FAILED|Interrupted)")
    for ln in reversed(lines):
        if pat.search(ln) and not ln.startswith("Traceback"):
            return one_line(ln, limit)
    return one_line(lines[-1], limit) if lines else ""


def validate_bench(obj) -> list[str]:
    """Problems with a benchmark JSON object against the shared format (empty list: valid)."""
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    problems = []
    for key, typ in (("benchmark", str), ("device", str), ("date", str), ("versions", dict), ("rows", list),
                     ("skipped", list)):
        if not isinstance(obj.get(key), typ):
            problems.append(f"{key}: missing or not a {typ.__name__}")
    if isinstance(obj.get("date"), str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", obj["date"]):
        problems.append(f"date: not YYYY-MM-DD: {obj['date']!r}")
    if isinstance(obj.get("versions"), dict):
        for key in ("torch", "triton", "numpy", "cuda"):
            if key not in obj["versions"]:
                problems.append(f"versions.{key}: missing")
    for i, row in enumerate(obj.get("rows") or []):
        if not isinstance(row, dict):
            problems.append(f"rows[{i}]: not an object")
            continue
        missing = [k for k in BENCH_ROW_KEYS if k not in row]
        if missing:
            problems.append(f"rows[{i}]: missing {missing}")
            continue
        if not isinstance(row["table"], str) or not isinstance(row["what"], str) or not isinstance(row["note"], str):
            problems.append(f"rows[{i}]: table, what and note must be strings")
        if row["dtype"] not in DTYPES:
            problems.append(f"rows[{i}]: dtype {row['dtype']!r} not in {DTYPES}")
        for k in ("ms", "ratio", "peak_mib", "relerr"):
            if row[k] is not None and (isinstance(row[k], bool) or not isinstance(row[k], (int, float))):
                problems.append(f"rows[{i}].{k}: not a number or null")
        if row["ratio_vs"] is not None and not isinstance(row["ratio_vs"], str):
            problems.append(f"rows[{i}].ratio_vs: not a string or null")
    for i, s in enumerate(obj.get("skipped") or []):
        if not (isinstance(s, dict) and isinstance(s.get("what"), str) and isinstance(s.get("why"), str)):
            problems.append(f"skipped[{i}]: needs string 'what' and 'why'")
    return problems


def parse_junit(path: Path) -> dict:
    """pytest's junit XML -> {"passed": [ids], "failed": [{"test", "why"}], "skipped": [{"test", "why"}]}."""
    out = {"passed": [], "failed": [], "skipped": []}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        if not cls and not name:  # the empty record pytest writes when it is interrupted mid-run
            continue
        # classname is "tests.ops.test_x" (functions) or "tests.ops.test_x.TestY" (methods): rebuild the node id
        parts = cls.split(".") if cls else []
        mod = max((k for k, p in enumerate(parts) if p.startswith("test_")), default=None)
        if mod is None:
            test = f"{cls}::{name}" if cls else name
        else:
            test = "/".join(parts[:mod + 1]) + ".py" + "".join(f"::{p}" for p in parts[mod + 1:]) + f"::{name}"
        bad = [c for c in case if c.tag in ("failure", "error")]
        skip = [c for c in case if c.tag == "skipped"]
        if bad:
            el = bad[0]
            text = (el.text or "").strip().splitlines()
            msg = el.get("message") or (text[-1] if text else el.tag)
            out["failed"].append({"test": test, "why": one_line(f"{el.tag}: {msg}")})
        elif skip:
            out["skipped"].append({"test": test, "why": one_line(skip[0].get("message") or "skipped")})
        else:
            out["passed"].append(test)
    return out


def _is_test_path(arg: str) -> bool:
    """Whether a pytest argument names tests (a file, folder or node id) rather than an option or its value."""
    return not arg.startswith("-") and (arg.endswith(".py") or "::" in arg or (REPO / arg).exists())


def find_gpu_test_files(root: Path = REPO / "tests") -> list[str]:
    """Test files that mention the gpu mark (collecting only these is faster and avoids the collection of
    modules whose optional imports are missing on the GPU machine)."""
    found = []
    for p in sorted(root.rglob("test_*.py")):
        try:
            if re.search(r"mark\.gpu\b", p.read_text(errors="replace")):
                found.append(p.relative_to(REPO).as_posix())
        except OSError:
            continue
    return found


# ----------------------------------------------------------------------------- sections
@dataclass
class Section:
    """A child process: `cmd` run in the repository root with output to logs/NAME.log; `kind` says how its
    result is read ("env", "bench": a benchmark JSON, "pytest": a junit XML)."""
    name: str
    cmd: list[str]
    limit_s: float
    kind: str = "bench"
    json_path: Path | None = None
    title: str = ""
    env: dict = field(default_factory=dict)


def build_sections(out: Path, cuda: bool, pytest_args: list[str], scale: float) -> dict[str, Section]:
    """The sections for a CUDA run, or the small-size CPU variant (--allow-cpu)."""
    py = sys.executable
    js = out / "json"
    dev = ["--device", "cuda" if cuda else "cpu"]
    small = [] if cuda else ["--small"]
    s = {}

    def bench(name, script, *extra):
        s[name] = Section(name, [py, str(BENCH / script), *dev, *extra, "--json", str(js / f"{name}.json")],
                          LIMITS[name] * scale, "bench", js / f"{name}.json", TITLES[name])

    s["env"] = Section("env", [py, str(Path(__file__).resolve()), "--env-child", str(js / "env.json")],
                       LIMITS["env"] * scale, "env", js / "env.json", TITLES["env"])
    bench("bev_pool", "bench_bev_pool.py", "--quick", "--dtypes", "fp32,fp16" if cuda else "fp32", *small)
    bench("voxelize", "bench_voxelize.py", "--quick", *small)
    bench("boxes", "bench_boxes.py", "--quick", *small)
    bench("sparse", "bench_sparse.py", "--quick", "--dtype", "fp32,fp16" if cuda else "fp32",
          *([] if cuda else ["--small", "--skip-layers"]))
    if cuda:
        bench("model", "bench_model.py", "--inputs", "synthetic", "--dtype", "fp32,fp16", "--train-step",
              "--runs", "5", "--warmup", "2", "--train-runs", "3", "--train-warmup", "2")
    else:
        bench("model", "bench_model.py", "--inputs", "synthetic", "--small", "--dtype", "fp32", "--train-step",
              "--runs", "1", "--warmup", "1", "--train-runs", "1", "--train-warmup", "0")
    xml = out / "logs" / "pytest-gpu.xml"
    cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PYTEST_TEST_TIMEOUT_S * scale:g}")
    cmd += pytest_args
    if not any(_is_test_path(a) for a in pytest_args):  # no paths given: only the files with gpu tests
        cmd += find_gpu_test_files()
    # the tests start from an empty tuner cache, as they do anywhere else
    s["tests"] = Section("tests", cmd, LIMITS["tests"] * scale, "pytest", xml, TITLES["tests"],
                         env={"BEVFUSION_SPARSE_TUNE_CACHE": ""})
    return s


def parse_names(text: str | None, flag: str) -> list[str]:
    """Section names from a comma list (groups expanded); an unknown name is a UsageError."""
    if text is None:
        return []
    names = []
    for n in (x.strip() for x in text.split(",")):
        if not n:
            continue
        if n in GROUPS:
            names += GROUPS[n]
        elif n in ORDER:
            names.append(n)
        else:
            raise UsageError(f"{flag}: unknown section {n!r} (sections: {', '.join(ORDER)}; groups: "
                             f"{', '.join(GROUPS)})")
    return names


def child_env(site: str | None, out: Path, cuda: bool) -> dict:
    """The environment of every child: repo root (and the unpacked site) first on PYTHONPATH, unbuffered
    output, the sparse autotuner's choices shared through a file, no progress bars."""
    env = dict(os.environ)
    paths = ([site] if site else []) + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["BEVFUSION_NO_PROGRESS"] = "1"
    # bench_sparse's tuned choices carry over to the model benchmark (the tests keep their own, see
    # build_sections); the folder must exist before the tuner saves there
    (out / "cache").mkdir(parents=True, exist_ok=True)
    env.setdefault("BEVFUSION_SPARSE_TUNE_CACHE", str(out / "cache" / "sparse_tune.json"))
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")  # what tests/conftest.py sets without CUDA
    return env


def run_child(cmd: list[str], log: Path, timeout: float, env: dict, cwd: Path = REPO) -> tuple[int | None, str, float]:
    """Run cmd in its own process group, output to `log`. Returns (returncode, status, seconds) with status
    "ok", "failed" or "timeout" (SIGINT at the limit, SIGKILL KILL_GRACE_S later)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            rc = _stop(proc)
        except BaseException:
            _stop(proc, grace=3.0)
            raise
    return rc, status, time.monotonic() - t0


def _stop(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> int | None:
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def read_result(sec: Section) -> tuple[dict | None, list[str]]:
    """The section's JSON (bench, env) or parsed junit XML (pytest), and problems reading it."""
    if sec.json_path is None or not Path(sec.json_path).exists():
        return None, [f"{sec.json_path.name if sec.json_path else 'result'}: not written"]
    try:
        if sec.kind == "pytest":
            return parse_junit(Path(sec.json_path)), []
        obj = json.loads(Path(sec.json_path).read_text())
    except (OSError, ValueError, ET.ParseError) as e:
        return None, [f"{Path(sec.json_path).name}: unreadable ({one_line(e)})"]
    return obj, (validate_bench(obj) if sec.kind == "bench" else [])


def run_section(sec: Section, out: Path, env: dict, timeout: float) -> dict:
    """Run one section and return its record for report.json."""
    log = out / "logs" / f"{sec.name}.log"
    if sec.json_path is not None and Path(sec.json_path).exists():
        Path(sec.json_path).unlink()  # a result from an earlier run must not pass for this one
    rc, status, secs = run_child(sec.cmd, log, timeout, dict(env, **sec.env))
    result, problems = read_result(sec)
    rec = {"name": sec.name, "title": sec.title or sec.name, "kind": sec.kind, "status": status, "rc": rc,
           "seconds": round(secs, 1), "limit_s": round(timeout, 1), "log": str(log.relative_to(out)),
           "cmd": shlex.join(sec.cmd)}
    if status == "timeout":
        rec["reason"] = f"over its {timeout:.0f} s limit: stopped ({log_reason(log)})"
    elif status == "failed":
        rec["reason"] = f"exit code {rc}: {log_reason(log)}"
    if sec.kind == "pytest":
        if rc == 5:
            rec["status"], rec["reason"] = "ok", "no tests collected"
        if result is not None:
            rec["tests"] = result
            if result["failed"] and rec["status"] == "ok":
                rec["status"] = "failed"
    elif result is not None:
        rec["result"] = result
    if problems:
        rec["problems"] = problems
        if rec["status"] == "ok":
            rec["status"] = "failed"
            rec["reason"] = "; ".join(problems)[:300]
    return rec


# ----------------------------------------------------------------------------- env child
def env_child(path: str) -> int:
    """Runs in a child: writes the environment JSON to `path`."""
    sys.path.insert(0, str(BENCH))
    import platform
    from importlib import metadata

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable,
                  "pythonpath": os.environ.get("PYTHONPATH", "")}
    dists = {}
    for d in ("torch", "triton", "numpy", "numba", "scipy", "pytest", "pytest-timeout", "pytest-xdist", "PyYAML",
              "pillow", "spconv", "spconv-cu126", "cumm-cu126", "shapely", "nuscenes-devkit", "rerun-sdk"):
        try:
            dists[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            dists[d] = None
    info["distributions"] = dists

    def save():
        write_atomic(Path(path), json.dumps(info, indent=1))

    save()
    import torch

    from common import copy_bandwidth, datasheet_bandwidth, probe_import, versions

    info["versions"] = versions()
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cuda = torch.cuda.is_available()
    info["cuda_available"] = cuda
    if cuda:
        p = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        info["device"] = {"name": name, "count": torch.cuda.device_count(), "capability": f"{p.major}.{p.minor}",
                          "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                          "datasheet_bw_tbs": (datasheet_bandwidth(name) or 0) / 1e12 or None}
    else:
        info["device"] = {"name": f"CPU {platform.machine()}, {torch.get_num_threads()} threads"}
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,"
                            "temperature.gpu,mig.mode.current", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = one_line(r.stdout) if r.returncode == 0 else f"failed: {one_line(r.stderr)}"
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available ({one_line(e)})"
    save()
    dev = "cuda" if cuda else "cpu"
    nbytes = (1 << 30) if cuda else (64 << 20)
    info["copy_bw_gbs"] = round(copy_bandwidth(dev, nbytes) / 1e9, 1)
    info["copy_bw_note"] = f"b.copy_(a), {nbytes >> 20} MiB fp32, read + write counted, median of 10"
    save()
    peers = {}
    for mod, dist, rows in (("spconv.pytorch", "spconv-cu126", "spconv rows of bench_sparse (official, keyed)"),
                            ("shapely", "shapely", "shapely rows of bench_boxes; tests/ops/test_boxes.py"),
                            ("nuscenes", "nuscenes-devkit", "nuscenes-devkit tests (evaluation, box conventions)")):
        ver, why = probe_import(mod, timeout=20)
        if ver == "unknown":
            ver = dists.get(dist) or dists.get(dist.split("-")[0]) or ver
        peers[mod] = {"version": ver, "why": why, "rows": rows}
    info["peers"] = peers
    save()
    return 0


# ----------------------------------------------------------------------------- headline
def _rows(report: dict, name: str) -> list[dict]:
    sec = next((s for s in report.get("sections", []) if s["name"] == name), None)
    if not sec or not isinstance(sec.get("result"), dict):
        return []
    return [r for r in sec["result"].get("rows", []) if isinstance(r, dict)]


def _section_note(report: dict, name: str) -> str:
    sec = next((s for s in report.get("sections", []) if s["name"] == name), None)
    if sec is None:
        return f"section {name} did not run"
    if sec["status"] == "ok":
        return f"section {name} ran but its JSON has no such row"
    return f"section {name}: {sec['status']}" + (f" ({sec['reason']})" if sec.get("reason") else "")


def _find(rows, table_prefix, what_prefix, dtype=None):
    """The first timed row whose table and label start with the given prefixes (labels of CPU runs carry a
    thread count: "ours, 2 threads")."""
    for r in rows:
        if str(r.get("table", "")).startswith(table_prefix) and str(r.get("what", "")).startswith(what_prefix) \
                and r.get("ms") is not None and (dtype is None or r.get("dtype") == dtype):
            return r
    return None


def headline(report: dict) -> list[dict]:
    """The issue's targets and whether each is met (met: true / false / null when not measured)."""
    out = []
    bp = _rows(report, "bev_pool")
    for dt in ("fp32", "fp16"):
        target = f"bev_pool forward, cached plan, {dt}: <= {BEV_POOL_FLOOR_FACTOR:g}x the memory floor"
        ours = _find(bp, f"memory floor, {dt}", BEV_POOL_OURS)
        sheet = _find(bp, f"memory floor, {dt}", BEV_POOL_FLOOR_SHEET)
        meas = _find(bp, f"memory floor, {dt}", BEV_POOL_FLOOR_MEASURED)
        floor = sheet or meas
        if ours is None or floor is None:
            out.append({"target": target, "met": None, "value": "not measured; " + _section_note(report, "bev_pool")})
            continue
        x = ours["ms"] / floor["ms"]
        value = (f"{ours['ms']:.3f} ms = {x:.2f}x the {'datasheet' if sheet else 'measured'}-bandwidth floor "
                 f"({floor['ms']:.3f} ms)")
        if sheet and meas:
            value += f"; {ours['ms'] / meas['ms']:.2f}x the measured-copy-bandwidth floor ({meas['ms']:.3f} ms)"
        out.append({"target": target, "met": x <= BEV_POOL_FLOOR_FACTOR, "value": value})

    sp = _rows(report, "sparse")
    target = (f"sparse encoder forward, fp16: >= {SPARSE_MIN_SPEEDUP:g}x spconv keyed "
              f"(aim {SPARSE_AIM_SPEEDUP:g}x)")
    ours = _find(sp, SPARSE_FWD_TABLE, "ours", "fp16")
    keyed = _find(sp, SPARSE_FWD_TABLE, "spconv keyed", "fp16")
    if ours is not None and keyed is not None:
        x = keyed["ms"] / ours["ms"]
        out.append({"target": target, "met": x >= SPARSE_MIN_SPEEDUP,
                    "value": f"ours {ours['ms']:.2f} ms vs spconv keyed {keyed['ms']:.2f} ms: {x:.2f}x"
                             + (" (aim met)" if x >= SPARSE_AIM_SPEEDUP else "")})
    else:
        why = "ours not measured" if ours is None else "spconv keyed not measured"
        sec = next((s for s in report.get("sections", []) if s["name"] == "sparse"), None)
        skipped = (sec or {}).get("result", {}).get("skipped", []) if sec else []
        spv = next((s["why"] for s in skipped if s.get("what", "").startswith("spconv")), None)
        detail = f"{why}" + (f" ({spv})" if spv and ours is not None else "")
        if ours is not None:
            detail += f"; ours {ours['ms']:.2f} ms"
        out.append({"target": target, "met": None, "value": f"{detail}; {_section_note(report, 'sparse')}"})

    md = _rows(report, "model")
    target = f"fusion detector end to end, fp16 autocast: >= {MODEL_MIN_FPS:g} frames/s"
    e2e = next((r for r in md if r.get("dtype") == "fp16" and r.get("ms") and r.get("what") == MODEL_E2E), None)
    if e2e is None:
        out.append({"target": target, "met": None, "value": "not measured; " + _section_note(report, "model")})
    else:
        fps = 1e3 / e2e["ms"]
        out.append({"target": target, "met": fps >= MODEL_MIN_FPS,
                    "value": f"{e2e['ms']:.1f} ms = {fps:.1f} frames/s"
                             + (f", peak {e2e['peak_mib']:.0f} MiB" if e2e.get("peak_mib") else "")})
    return out


def collect_skipped(report: dict) -> list[dict]:
    """Every skipped line: sections not run, rows the benchmarks skipped, peers missing."""
    out = [{"section": s["what"], "what": "section", "why": s["why"]} for s in report.get("skipped_sections", [])]
    for sec in report.get("sections", []):
        res = sec.get("result")
        if sec.get("kind") == "env" and isinstance(res, dict):
            for mod, p in (res.get("peers") or {}).items():
                if p.get("why"):
                    out.append({"section": "env", "what": p.get("rows", mod), "why": p["why"]})
        elif isinstance(res, dict):
            for s in res.get("skipped", []):
                if isinstance(s, dict):
                    out.append({"section": sec["name"], "what": s.get("what", "?"), "why": s.get("why", "?")})
    return out


# ----------------------------------------------------------------------------- report.md
def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_md(report: dict) -> str:
    env = next((s.get("result") for s in report.get("sections", []) if s["name"] == "env"), None) or {}
    dev = (env.get("device") or {}).get("name") or report.get("device") or "unknown device"
    lines = [f"# GPU check: {dev}", "",
             f"{report.get('started', '')} to {report.get('updated', '')}; {report.get('state', '')}; "
             f"{report.get('elapsed_s', 0):.0f} s of a {report.get('budget_s') or 'unlimited'} s budget; "
             f"`{report.get('command', '')}`", ""]
    if report.get("refused"):
        lines += [f"**Refused:** {report['refused']}", ""]
    lines += ["## Targets", "", "| target | met | value |", "|---|---|---|"]
    for h in report.get("headline", []):
        met = {True: "yes", False: "**NO**", None: "not measured"}[h["met"]]
        lines.append(f"| {_cell(h['target'])} | {met} | {_cell(h['value'])} |")
    lines += ["", "## Sections", "", "| section | status | s | limit s | log | note |", "|---|---|---:|---:|---|---|"]
    for s in report.get("sections", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['limit_s']:.0f} | {s['log']} | "
                     f"{_cell(s.get('reason', ''))} |")
    for s in report.get("skipped_sections", []):
        lines.append(f"| {s['what']} | skipped | | | | {_cell(s['why'])} |")
    if env:
        lines += ["", "## Environment", ""]
        d = env.get("device") or {}
        v = env.get("versions") or {}
        lines.append(f"- device: {d.get('name')}" + (f", capability {d['capability']}, {d['memory_gib']} GiB, "
                                                       f"{d['sms']} SMs" if "sms" in d else ""))
        lines.append(f"- nvidia-smi: {env.get('nvidia_smi', '')}")
        lines.append(f"- python {env.get('python')}, torch {v.get('torch')} (CUDA {v.get('cuda')}, cuDNN "
                     f"{env.get('cudnn')}), triton {v.get('triton')}, numpy {v.get('numpy')}")
        if env.get("copy_bw_gbs") is not None:
            sheet = d.get("datasheet_bw_tbs")
            lines.append(f"- copy bandwidth {env['copy_bw_gbs']:.0f} GB/s measured ({env.get('copy_bw_note', '')})"
                         + (f"; datasheet {sheet:g} TB/s" if sheet else ""))
        for mod, p in (env.get("peers") or {}).items():
            lines.append(f"- {mod}: " + (p["version"] if p.get("version") else f"missing ({p.get('why')})"))
    for s in report.get("sections", []):
        if s.get("kind") == "pytest":
            t = s.get("tests")
            lines += ["", f"## {s['title']}", ""]
            if not t:
                lines.append(f"no results ({s.get('reason', 'no junit XML')})")
                continue
            lines.append(f"passed {len(t['passed'])}, failed {len(t['failed'])}, skipped {len(t['skipped'])}")
            if t["failed"]:
                lines += ["", "| failed test | why |", "|---|---|"]
                lines += [f"| {_cell(f['test'])} | {_cell(f['why'])} |" for f in t["failed"]]
            if t["skipped"]:  # grouped by reason: "needs CUDA" can cover dozens of parametrized cases
                by_why: dict[str, list[str]] = {}
                for f in t["skipped"]:
                    by_why.setdefault(f["why"], []).append(f["test"])
                lines += ["", "| skipped tests | why |", "|---|---|"]
                for why, tests in by_why.items():
                    shown = ", ".join(tests[:3]) + (f" and {len(tests) - 3} more" if len(tests) > 3 else "")
                    lines.append(f"| {_cell(shown)} | {_cell(why)} |")
        elif s.get("kind") == "bench":
            res = s.get("result") or {}
            rows = res.get("rows", [])
            lines += ["", f"## {s['title']} ({s['name']}: {s['status']})", ""]
            if not rows:
                lines.append(f"no rows ({s.get('reason', 'no JSON')})")
                continue
            tables: dict[str, list] = {}
            for r in rows:
                tables.setdefault(r.get("table", ""), []).append(r)
            for title, trs in tables.items():
                lines += [f"### {title}", "", "| what | dtype | ms | speed-up | vs | peak MiB | relerr | note |",
                          "|---|---|---:|---:|---|---:|---:|---|"]
                for r in trs:
                    lines.append(f"| {_cell(r.get('what'))} | {r.get('dtype')} | {_fmt(r.get('ms'), '.3f')} | "
                                 f"{_fmt(r.get('ratio'), '.2f')} | {_cell(r.get('ratio_vs') or '')} | "
                                 f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(r.get('relerr'), '.1e')} | "
                                 f"{_cell(r.get('note', ''))} |")
                lines.append("")
    skipped = report.get("skipped", [])
    lines += ["", "## Skipped", ""]
    lines += [f"- {s.get('section', '')}: {s['what']}: {s['why']}" for s in skipped] or ["nothing"]
    lines += ["", "speed-up = ms of the `vs` row / ms of this row (> 1: faster); against `floor` it is the "
              "fraction of the memory floor's speed reached (0.5 = twice the floor's time).", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """Recompute the derived parts and rewrite report.json and report.md (each atomically)."""
    report["updated"] = now_iso()
    report["headline"] = headline(report)
    report["skipped"] = collect_skipped(report)
    write_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    write_atomic(out / "report.md", render_md(report))


# ----------------------------------------------------------------------------- main
def unpack_site(tar: Path) -> tuple[str, float]:
    """Unpack an xz tarball of unpacked wheels into a fresh temp folder; returns (folder, seconds)."""
    t0 = time.monotonic()
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    with tarfile.open(tar) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(site, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(site)
    return site, time.monotonic() - t0


def cuda_probe(env: dict, timeout: float = 90.0) -> tuple[bool, str]:
    """(CUDA usable?, one-line detail), asked of a child Python (the tool itself never imports torch)."""
    code = ("import torch; ok = torch.cuda.is_available(); "
            "print('CUDA', ok, torch.cuda.get_device_name(0) if ok else torch.__version__)")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=REPO)
    except subprocess.TimeoutExpired:
        return False, f"the CUDA probe (import torch) took over {timeout:.0f} s"
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("CUDA ")), None)
    if r.returncode != 0 or line is None:
        return False, f"the CUDA probe failed: {log_reason_text(r.stderr)}"
    _, ok, detail = line.split(" ", 2)
    if ok == "True":
        return True, detail
    return False, f"torch {detail} sees no CUDA device"


def log_reason_text(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return one_line(lines[-1]) if lines else "no output"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for report.json, report.md, logs/ and json/")
    ap.add_argument("--only", default=None, help="comma list of sections (or groups) to run")
    ap.add_argument("--skip", default=None, help="comma list of sections (or groups) to leave out")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:g}; 0: no overall limit)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (one shell-quoted string)")
    ap.add_argument("--site-tar", default="auto",
                    help="xz tarball of unpacked wheels to put on PYTHONPATH (default: .gpu/site.tar.xz if present; "
                         "'none' to skip)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU with small sizes when there is no CUDA")
    ap.add_argument("--list", action="store_true", help="print the sections and their limits, then exit")
    ap.add_argument("--env-child", default=None, help=argparse.SUPPRESS)

    def error(message):
        raise UsageError(message)

    ap.error = error
    args = ap.parse_args(argv)
    if args.env_child is None and not args.list and args.out is None:
        raise UsageError("--out DIR is required")
    if args.timeout_scale <= 0:
        raise UsageError(f"--timeout-scale must be > 0, got {args.timeout_scale}")
    if args.budget < 0:
        raise UsageError(f"--budget must be >= 0, got {args.budget}")
    only, skip = parse_names(args.only, "--only"), parse_names(args.skip, "--skip")
    if args.only is not None and not only:
        raise UsageError("--only: no section named")
    try:
        args.pytest_args = shlex.split(args.pytest_args)
    except ValueError as e:
        raise UsageError(f"--pytest-args: {e}") from None
    args.selected = [n for n in ORDER if (not only or n in only) and n not in skip]
    args.left_out = [n for n in ORDER if n not in args.selected]
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    if args.env_child:
        return env_child(args.env_child)
    if args.list:
        for n in ORDER:
            print(f"{n:<9} {LIMITS[n] * args.timeout_scale:>6.0f} s  {TITLES[n]}")
        print(f"budget    {args.budget:>6.0f} s  (0: none)")
        return 0

    t_start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"tool": "tools/gpu_check.py", "version": REPORT_VERSION, "started": now_iso(),
                    "command": shlex.join([Path(sys.argv[0]).name if argv is None else "gpu_check.py",
                                           *(sys.argv[1:] if argv is None else argv)]),
                    "state": "running", "budget_s": args.budget or None, "timeout_scale": args.timeout_scale,
                    "elapsed_s": 0.0, "site": None, "sections": [],
                    "skipped_sections": [{"what": n, "why": "not selected (--only / --skip)"} for n in args.left_out]}

    def on_signal(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(args, out, report, t_start)
    except Interrupted as e:
        report["state"] = f"interrupted ({e})"
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_report(out, report)
        print(f"gpu_check: interrupted ({e}); partial report in {out / 'report.md'}", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(args, out: Path, report: dict, t_start: float) -> int:
    cuda, detail = cuda_probe(child_env(None, out, cuda=True))
    report["device"] = detail if cuda else None
    if not cuda and not args.allow_cpu:
        report["state"] = "refused"
        report["refused"] = f"no CUDA device: {detail}"
        write_report(out, report)
        print(f"gpu_check: no CUDA device ({detail}); run on a GPU machine, or pass --allow-cpu for a CPU "
              "dry run", file=sys.stderr)
        return 2
    if not cuda:
        print(f"gpu_check: no CUDA device ({detail}); --allow-cpu: small CPU sizes", flush=True)
    site = None
    tar = args.site_tar
    if tar == "auto":
        tar = str(REPO / ".gpu" / "site.tar.xz") if (REPO / ".gpu" / "site.tar.xz").is_file() else "none"
    if tar != "none":
        try:
            site, secs = unpack_site(Path(tar))
            report["site"] = {"tar": tar, "dir": site, "seconds": round(secs, 1),
                              "top": sorted(os.listdir(site))[:50]}
            print(f"unpacked {tar} into {site} ({secs:.1f} s)", flush=True)
        except (OSError, tarfile.TarError) as e:
            report["site"] = {"tar": tar, "error": one_line(e)}
            print(f"gpu_check: --site-tar {tar}: {one_line(e)} (going on without it)", file=sys.stderr)
    try:
        return _run_sections(args, out, report, t_start, cuda, child_env(site, out, cuda))
    finally:
        if site:
            shutil.rmtree(site, ignore_errors=True)


def run_all(sections: list[Section], out: Path, report: dict, env: dict, t_start: float,
            deadline: float | None) -> bool:
    """Run the sections in order, each within its limit and what is left before `deadline` (monotonic
    time; None: no overall limit), appending their records to report["sections"] and rewriting the report
    after each. Returns True if one failed, timed out or was skipped for lack of time."""
    failed = False
    for sec in sections:
        limit = sec.limit_s
        if deadline is not None:
            left = deadline - time.monotonic() - KILL_GRACE_S
            if left < 5:
                report["skipped_sections"].append({"what": sec.name, "why": "the overall time budget is spent"})
                report["elapsed_s"] = round(time.monotonic() - t_start, 1)
                write_report(out, report)
                print(f"[{sec.name}] skipped: the overall time budget is spent", flush=True)
                failed = True
                continue
            limit = min(limit, left)
        print(f"[{sec.name}] running (limit {limit:.0f} s): {shlex.join(sec.cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            rec = run_section(sec, out, env, limit)
        except Interrupted as e:  # recorded; main() writes the report
            report["sections"].append({"name": sec.name, "title": sec.title or sec.name, "kind": sec.kind,
                                       "status": "interrupted", "rc": None,
                                       "seconds": round(time.monotonic() - t0, 1), "limit_s": round(limit, 1),
                                       "log": f"logs/{sec.name}.log", "cmd": shlex.join(sec.cmd),
                                       "reason": f"gpu_check got {e}"})
            raise
        report["sections"].append(rec)
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_report(out, report)
        failed |= rec["status"] != "ok"
        print(f"[{sec.name}] {rec['status']} in {rec['seconds']:.0f} s"
              + (f": {rec['reason']}" if rec.get("reason") else ""), flush=True)
    return failed


def _run_sections(args, out: Path, report: dict, t_start: float, cuda: bool, env: dict) -> int:
    sections = build_sections(out, cuda, args.pytest_args, args.timeout_scale)
    report["cuda"] = cuda
    write_report(out, report)
    deadline = t_start + args.budget if args.budget else None
    failed = run_all([sections[n] for n in args.selected], out, report, env, t_start, deadline)
    report["state"] = "finished"
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_report(out, report)
    for h in report["headline"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[h["met"]]
        print(f"target: {h['target']}: {met}: {h['value']}")
    print(f"report: {out / 'report.md'} and report.json ({report['elapsed_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

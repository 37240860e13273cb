"""tools/gpu_check.py on the CPU: argument handling, the no-CUDA refusal, section runs that crash or time
out, report writing from canned results, missing peers; and every op benchmark's --json output at its
smallest size (benchmarks/common.py's shared format)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"
BENCH = REPO / "benchmarks"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load("gpu_check", TOOL)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def _tool(args, timeout=120, **env):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(**env), cwd=REPO)


@pytest.fixture
def no_spconv(tmp_path):
    """A folder for PYTHONPATH whose `spconv.pytorch` raises ImportError (a peer that cannot be imported)."""
    root = tmp_path / "fake_site"
    (root / "spconv" / "pytorch").mkdir(parents=True)
    (root / "spconv" / "__init__.py").write_text("")
    (root / "spconv" / "pytorch" / "__init__.py").write_text(
        "raise ImportError('simulated: spconv is not installed here')\n")
    return root


# ----------------------------------------------------------------------------- arguments
class TestArguments:
    def test_bad_only_is_a_one_line_error(self, tmp_path):
        r = _tool(["--out", str(tmp_path / "o"), "--only", "env,nope"])
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "'nope'" in lines[0] and "bev_pool" in lines[0], r.stderr
        assert not (tmp_path / "o").exists()

    @pytest.mark.parametrize("argv,needle", [
        (["--skip", "sparse,x1"], "'x1'"),
        (["--timeout-scale", "0"], "--timeout-scale"),
        (["--budget", "-1"], "--budget"),
        (["--only", ","], "--only"),
        (["--pytest-args", "'unclosed"], "--pytest-args"),
        ([], "--out"),
    ])
    def test_usage_errors(self, tmp_path, argv, needle):
        argv = argv + (["--out", str(tmp_path)] if argv else [])
        with pytest.raises(gc.UsageError, match=needle):
            gc.parse_args(argv)

    def test_selection_keeps_the_run_order_and_expands_groups(self, tmp_path):
        a = gc.parse_args(["--out", str(tmp_path), "--only", "tests,ops,env", "--skip", "boxes"])
        assert a.selected == ["env", "bev_pool", "voxelize", "sparse", "tests"]
        assert a.left_out == ["boxes", "model"]
        a = gc.parse_args(["--out", str(tmp_path), "--skip", "model", "--pytest-args", "-k 'iou and not slow' -x"])
        assert a.selected == ["env", "bev_pool", "voxelize", "boxes", "sparse", "tests"]
        assert a.pytest_args == ["-k", "iou and not slow", "-x"]

    def test_pytest_section_collects_only_files_with_gpu_tests(self, tmp_path):
        files = gc.find_gpu_test_files()
        needle = "mark." + "gpu"  # spelled apart so that this file is not one of them
        expected = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py")
                          if needle in p.read_text())
        assert files == expected and "tests/ops/test_bev_pool.py" in files
        cmd = gc.build_sections(tmp_path, True, [], 2.0)["tests"].cmd
        i = cmd.index("pytest")
        assert cmd[i - 1:i + 3] == ["-m", "pytest", "-m", "gpu"] and cmd[-len(files):] == files
        assert any(a.startswith("--junitxml=") for a in cmd)
        if importlib.util.find_spec("pytest_timeout"):
            assert f"--timeout={gc.PYTEST_TEST_TIMEOUT_S * 2:g}" in cmd
        cmd = gc.build_sections(tmp_path, True, ["-k", "iou", "-x"], 1.0)["tests"].cmd
        assert cmd[-len(files) - 3:] == ["-k", "iou", "-x"] + files  # an option's value is no path
        for given in (["tests/ops/test_voxelize.py", "-x"], ["-x", "tests/ops"], ["tests/ops/test_boxes.py::TestGpu"]):
            cmd = gc.build_sections(tmp_path, True, given, 1.0)["tests"].cmd
            assert cmd[-len(given):] == given  # tests named: no file list added

    def test_sections_have_limits_within_the_budget(self, tmp_path):
        secs = gc.build_sections(tmp_path, True, [], 1.0)
        assert list(secs) == list(gc.ORDER) and gc.ORDER[-1] == "tests"
        # the tests come last and keep >= 120 s of the budget even if every other section uses its limit
        assert sum(s.limit_s for n, s in secs.items() if n != "tests") + 120 <= gc.DEFAULT_BUDGET_S
        assert "--quick" in secs["bev_pool"].cmd and "--small" not in secs["bev_pool"].cmd
        cpu = gc.build_sections(tmp_path, False, [], 1.0)
        assert all("--small" in cpu[n].cmd for n in ("bev_pool", "voxelize", "boxes", "sparse", "model"))
        for s in list(secs.values()) + list(cpu.values()):
            if s.kind == "bench":
                assert s.cmd[s.cmd.index("--json") + 1] == str(s.json_path)

    def test_no_cuda_refuses_in_one_line(self, tmp_path):
        out = tmp_path / "o"
        r = _tool(["--out", str(out), "--site-tar", "none"], CUDA_VISIBLE_DEVICES="")
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "no CUDA device" in lines[0] and "--allow-cpu" in lines[0], r.stderr
        rep = json.loads((out / "report.json").read_text())
        assert rep["state"] == "refused" and rep["sections"] == [] and "no CUDA" in rep["refused"]


# ----------------------------------------------------------------------------- running sections
def _py(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


class TestRunning:
    def test_crash_and_timeout_are_recorded_and_the_rest_still_runs(self, tmp_path):
        out = tmp_path / "out"
        good_json = out / "json" / "good.json"
        # The last section checks that the report on disk already holds the first two (rewritten after each).
        check = f"""
            import json, sys
            rep = json.load(open({str(out / 'report.json')!r}))
            got = {{s["name"]: s["status"] for s in rep["sections"]}}
            assert got == {{"crash": "failed", "hang": "timeout"}}, got
            md = open({str(out / 'report.md')!r}).read()
            assert "| hang | timeout |" in md, md
            row = dict(table="t", what="w", dtype="fp32", ms=1.5, ratio=2.0, ratio_vs="v", peak_mib=None,
                       relerr=None, note="")
            json.dump(dict(benchmark="x", device="d", date="2030-01-02",
                           versions=dict(torch="1", triton=None, numpy="2", cuda=None),
                           rows=[row], skipped=[dict(what="peer rows", why="peer missing")]),
                      open({str(good_json)!r}, "w"))
        """
        secs = [
            gc.Section("crash", _py("print('starting'); raise RuntimeError('kaput')"), 30, "bench",
                       out / "json" / "crash.json"),
            gc.Section("hang", _py("import time; print('waiting', flush=True); time.sleep(120)"), 1.0, "bench",
                       out / "json" / "hang.json"),
            gc.Section("good", _py(check), 60, "bench", good_json),
        ]
        (out / "json").mkdir(parents=True)
        report = {"sections": [], "skipped_sections": []}
        t0 = time.monotonic()
        failed = gc.run_all(secs, out, report, _env(), t0, None)
        assert failed
        assert time.monotonic() - t0 < 60
        st = {s["name"]: s for s in report["sections"]}
        assert st["crash"]["status"] == "failed" and st["crash"]["rc"] == 1
        assert "RuntimeError: kaput" in st["crash"]["reason"]
        assert st["hang"]["status"] == "timeout" and "limit" in st["hang"]["reason"]
        assert st["hang"]["seconds"] < gc.KILL_GRACE_S + 5
        assert st["good"]["status"] == "ok", (out / "logs" / "good.log").read_text()
        assert st["good"]["result"]["rows"][0]["ms"] == 1.5
        assert "waiting" in (out / "logs" / "hang.log").read_text()
        on_disk = json.loads((out / "report.json").read_text())
        assert [s["name"] for s in on_disk["sections"]] == ["crash", "hang", "good"]
        assert {"section": "good", "what": "peer rows", "why": "peer missing"} in on_disk["skipped"]

    def test_invalid_or_missing_json_fails_the_section(self, tmp_path):
        out = tmp_path / "out"
        bad = out / "json" / "bad.json"
        secs = [gc.Section("nojson", _py("pass"), 30, "bench", out / "json" / "nojson.json"),
                gc.Section("bad", _py(f"import json; json.dump({{'benchmark': 'x', 'rows': [{{'what': 1}}]}}, "
                                      f"open({str(bad)!r}, 'w'))"), 30, "bench", bad)]
        bad.parent.mkdir(parents=True)
        report = {"sections": [], "skipped_sections": []}
        assert gc.run_all(secs, out, report, _env(), time.monotonic(), None)
        nojson, badrec = report["sections"]
        assert nojson["status"] == "failed" and "not written" in nojson["reason"]
        assert badrec["status"] == "failed" and "rows[0]" in badrec["reason"] and "device" in badrec["reason"]

    def test_sections_past_the_budget_are_skipped(self, tmp_path):
        out = tmp_path / "out"
        secs = [gc.Section(n, _py("pass"), 30, "env", None) for n in ("a", "b")]
        report = {"sections": [], "skipped_sections": []}
        t0 = time.monotonic()
        assert gc.run_all(secs, out, report, _env(), t0, deadline=t0 + gc.KILL_GRACE_S + 1)
        assert report["sections"] == []
        assert [s["what"] for s in report["skipped_sections"]] == ["a", "b"]
        assert "budget" in report["skipped_sections"][0]["why"]

    def test_interrupt_stops_the_child_and_is_recorded(self, tmp_path):
        out = tmp_path / "out"
        beat = tmp_path / "beat"
        code = f"""
            import pathlib, time
            for i in range(600):
                pathlib.Path({str(beat)!r}).write_text(str(i))
                time.sleep(0.05)
        """
        report = {"sections": [], "skipped_sections": []}

        def on_usr1(signum, frame):
            raise gc.Interrupted("SIGUSR1")

        old = signal.signal(signal.SIGUSR1, on_usr1)
        timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        try:
            with pytest.raises(gc.Interrupted):
                gc.run_all([gc.Section("long", _py(code), 60, "env", None)], out, report, _env(), time.monotonic(), None)
        finally:
            timer.cancel()
            signal.signal(signal.SIGUSR1, old)
        rec = report["sections"][0]
        assert rec["name"] == "long" and rec["status"] == "interrupted" and "SIGUSR1" in rec["reason"]
        last = beat.read_text()
        time.sleep(0.5)
        assert beat.read_text() == last  # the child is gone

    def test_parse_junit_from_a_real_pytest_run(self, tmp_path):
        pkg = tmp_path / "tests" / "ops"
        pkg.mkdir(parents=True)
        (pkg / "test_demo.py").write_text(textwrap.dedent("""
            import pytest

            def test_ok():
                pass

            class TestGroup:
                @pytest.mark.parametrize("n", [1, 2])
                def test_fails(self, n):
                    assert n == 1, "n is not one"

            @pytest.mark.skip(reason="needs CUDA")
            def test_skipped():
                pass

            @pytest.fixture
            def broken():
                raise RuntimeError("fixture broke")

            def test_error(broken):
                pass
        """))
        (tmp_path / "pytest.ini").write_text("[pytest]\n")
        xml = tmp_path / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        "tests/ops/test_demo.py"], cwd=tmp_path, capture_output=True, timeout=120)
        res = gc.parse_junit(xml)
        assert res["passed"] == ["tests/ops/test_demo.py::test_ok",
                                 "tests/ops/test_demo.py::TestGroup::test_fails[1]"]
        failed = {f["test"]: f["why"] for f in res["failed"]}
        assert set(failed) == {"tests/ops/test_demo.py::TestGroup::test_fails[2]", "tests/ops/test_demo.py::test_error"}
        assert "n is not one" in failed["tests/ops/test_demo.py::TestGroup::test_fails[2]"]
        assert failed["tests/ops/test_demo.py::test_error"].startswith("error:")
        assert "\n" not in "".join(failed.values())
        assert res["skipped"] == [{"test": "tests/ops/test_demo.py::test_skipped", "why": "needs CUDA"}]


    def test_parse_junit_ignores_the_record_of_an_interrupted_run(self, tmp_path):
        """pytest stopped by SIGINT (the section's time limit) adds a testcase with no name: not a test."""
        xml = tmp_path / "junit.xml"
        xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">'
                       '<testcase classname="tests.gpu.test_x" name="test_a" time="1.0" />'
                       '<testcase time="0.001" /></testsuite></testsuites>')
        assert gc.parse_junit(xml) == {"passed": ["tests/gpu/test_x.py::test_a"], "failed": [], "skipped": []}

# ----------------------------------------------------------------------------- report writing
def _row(table, what, ms, dtype="fp32", **kw):
    r = dict(table=table, what=what, dtype=dtype, ms=ms, ratio=None, ratio_vs=None, peak_mib=None, relerr=None,
             note="")
    r.update(kw)
    return r


def _bench(name, rows, skipped=()):
    return dict(benchmark=name, device="NVIDIA H200", date="2030-01-02",
                versions=dict(torch="2.11", triton="3.6", numpy="2.1", cuda="13.0"), rows=rows,
                skipped=list(skipped))


def _canned_report():
    env = {"device": {"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8, "sms": 132,
                      "datasheet_bw_tbs": 4.8},
           "versions": {"torch": "2.11", "cuda": "13.0", "triton": "3.6", "numpy": "2.1"}, "cudnn": 91900,
           "nvidia_smi": "NVIDIA H200, 580.1", "copy_bw_gbs": 4300.0, "python": "3.12.3",
           "peers": {"spconv.pytorch": {"version": None, "why": "import spconv.pytorch failed: ModuleNotFoundError",
                                        "rows": "spconv rows of bench_sparse"},
                     "shapely": {"version": "2.0.7", "why": None, "rows": "shapely rows"}}}
    bp = []
    for dt, ours, sheet, meas in (("fp32", 0.25, 0.141, 0.158), ("fp16", 0.2, 0.071, 0.079)):
        t = f"memory floor, {dt}"
        bp += [_row(t, "floor, measured copy bandwidth", meas, dt), _row(t, "floor, datasheet bandwidth", sheet, dt),
               _row(t, "ours, cached plan", ours, dt, ratio=sheet / ours, ratio_vs="floor", peak_mib=61.0),
               _row(f"forward, {dt}", "ours, cached plan", ours, dt, relerr=1e-7)]
    enc = "(c) SparseEncoder fwd (eval BN), kernel maps + dense BEV (1, 256, 180, 180) [fp16]"
    sp = [_row("(c) SparseEncoder fwd+bwd (train BN, loss = sum) [fp16]", "ours", 1.0, "fp16"),  # must not be used
          _row(enc, "ours", 5.0, "fp16"), _row(enc, "spconv official", 10.0, "fp16"),
          _row(enc, "spconv keyed", 8.0, "fp16")]
    md = [_row("model forward, fp32 (TF32 off)", "end to end (incl. decoding)", 90.0),
          _row("model forward, fp16 autocast", "end to end (incl. decoding)", 50.0, "fp16", peak_mib=9000.0)]
    sec = dict(status="ok", rc=0, seconds=1.0, limit_s=10.0, log="logs/x.log", cmd="x")
    return {"started": "t0", "state": "finished", "budget_s": 480, "elapsed_s": 100.0, "command": "gpu_check.py",
            "sections": [dict(sec, name="env", title="environment", kind="env", result=env),
                         dict(sec, name="bev_pool", title="BEV pooling", kind="bench", result=_bench("bev_pool", bp)),
                         dict(sec, name="sparse", title="sparse convolution", kind="bench",
                              result=_bench("sparse", sp, [dict(what="encoder fwd peak memory [fp16]",
                                                                why="measuring child failed")])),
                         dict(sec, name="model", title="model", kind="bench", result=_bench("model", md)),
                         dict(sec, name="tests", title="pytest -m gpu", kind="pytest", status="failed", rc=1,
                              tests={"passed": ["tests/a.py::test_x"],
                                     "failed": [{"test": "tests/b.py::test_y", "why": "failure: assert 1 == 2"}],
                                     "skipped": [{"test": "tests/c.py::test_z", "why": "needs shapely"}]})],
            "skipped_sections": [{"what": "boxes", "why": "not selected (--only / --skip)"}]}


class TestReport:
    def test_headline_targets(self):
        h = {x["target"].split(":")[0]: x for x in gc.headline(_canned_report())}
        fp32 = h["bev_pool forward, cached plan, fp32"]
        assert fp32["met"] is True and "1.77x the datasheet-bandwidth floor" in fp32["value"]
        assert "1.58x the measured-copy-bandwidth floor" in fp32["value"]
        assert h["bev_pool forward, cached plan, fp16"]["met"] is False  # 0.2 / 0.071 = 2.8x
        sp = next(v for k, v in h.items() if k.startswith("sparse"))
        assert sp["met"] is True and "1.60x" in sp["value"] and "aim met" not in sp["value"]
        mdl = next(v for k, v in h.items() if k.startswith("fusion"))
        assert mdl["met"] is False and "20.0 frames/s" in mdl["value"]

    def test_headline_when_sections_are_missing(self):
        rep = _canned_report()
        rep["sections"] = [s for s in rep["sections"] if s["name"] in ("env", "sparse")]
        rep["sections"][1]["result"]["rows"] = [r for r in rep["sections"][1]["result"]["rows"]
                                                if r["what"] == "ours"]
        rep["sections"][1]["result"]["skipped"] = [dict(what="spconv rows (official and keyed)",
                                                        why="import spconv.pytorch failed: simulated")]
        h = gc.headline(rep)
        assert [x["met"] for x in h] == [None, None, None, None]
        assert "did not run" in h[0]["value"] and "did not run" in h[3]["value"]
        assert "spconv keyed not measured" in h[2]["value"] and "simulated" in h[2]["value"]

    def test_report_files(self, tmp_path):
        rep = _canned_report()
        gc.write_report(tmp_path, rep)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
        on_disk = json.loads((tmp_path / "report.json").read_text())
        for key in ("headline", "skipped", "sections", "updated", "state"):
            assert key in on_disk
        for s in on_disk["sections"]:
            if s["kind"] == "bench":
                assert gc.validate_bench(s["result"]) == []
        skipped = {(s["section"], s["what"]): s["why"] for s in on_disk["skipped"]}
        assert "ModuleNotFoundError" in skipped[("env", "spconv rows of bench_sparse")]
        assert skipped[("sparse", "encoder fwd peak memory [fp16]")] == "measuring child failed"
        assert skipped[("boxes", "section")] == "not selected (--only / --skip)"
        md = (tmp_path / "report.md").read_text()
        assert md.startswith("# GPU check: NVIDIA H200")
        for needle in ("## Targets", "| bev_pool forward, cached plan, fp32: <= 2x the memory floor | yes |",
                       "| sparse encoder forward, fp16: >= 1x spconv keyed (aim 1.7x) | yes |",
                       "| fusion detector end to end, fp16 autocast: >= 25 frames/s | **NO** |",
                       "| tests | failed |", "| boxes | skipped |", "### memory floor, fp32",
                       "| what | dtype | ms | speed-up | vs | peak MiB | relerr | note |",
                       "| ours, cached plan | fp32 | 0.250 | 0.56 | floor | 61 |  |  |",
                       "| tests/b.py::test_y | failure: assert 1 == 2 |", "passed 1, failed 1, skipped 1",
                       "copy bandwidth 4300 GB/s measured", "spconv.pytorch: missing (", "## Skipped"):
            assert needle in md, needle
        # one table per benchmark table title
        assert md.count("### ") == 4 + 2 + 2  # bev_pool 4, sparse 2, model 2

    def test_write_atomic_keeps_the_old_file_on_failure(self, tmp_path, monkeypatch):
        target = tmp_path / "report.json"
        gc.write_atomic(target, "old")
        gc.write_atomic(target, "new")
        assert target.read_text() == "new"

        def boom(*a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(gc.os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            gc.write_atomic(target, "newer")
        assert target.read_text() == "new"
        assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left

    def test_validate_bench(self):
        good = _bench("x", [_row("t", "w", 1.0)], [dict(what="a", why="b")])
        assert gc.validate_bench(good) == []
        bad = _bench("x", [_row("t", "w", "1.0", dtype="f32"), {"what": "w"}], [dict(what="a")])
        bad["date"] = "2030/01/02"
        del bad["versions"]["cuda"]
        problems = " | ".join(gc.validate_bench(bad))
        for needle in ("date", "versions.cuda", "rows[0]: dtype", "rows[0].ms", "rows[1]: missing", "skipped[0]"):
            assert needle in problems, needle


# ----------------------------------------------------------------------------- peers and the env child
def test_env_child_reports_a_missing_peer(tmp_path, no_spconv):
    path = tmp_path / "env.json"
    r = _tool(["--env-child", str(path)], PYTHONPATH=os.pathsep.join([str(no_spconv), str(REPO)]))
    assert r.returncode == 0, r.stderr
    env = json.loads(path.read_text())
    assert env["cuda_available"] is False or "sms" in env["device"]
    assert env["copy_bw_gbs"] > 0 and env["versions"]["torch"]
    spc = env["peers"]["spconv.pytorch"]
    assert spc["version"] is None and "simulated: spconv is not installed here" in spc["why"]
    rep = {"sections": [{"name": "env", "kind": "env", "result": env}], "skipped_sections": []}
    assert any("simulated" in s["why"] and s["section"] == "env" for s in gc.collect_skipped(rep))


def test_common_probe_import_and_json(tmp_path, no_spconv, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        common = _load("bench_common_for_test", BENCH / "common.py")
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setenv("PYTHONPATH", str(no_spconv))
    ver, why = common.probe_import("spconv.pytorch")
    assert ver is None and "simulated" in why and "\n" not in why
    ver, why = common.probe_import("json")
    assert why is None and ver
    with pytest.raises(ValueError, match="dtype"):
        common.Record(table="t", what="w", dtype="float32")
    path = tmp_path / "sub" / "b.json"
    rows = [common.Record(table="t", what="w", dtype="fp16", ms=float("nan"), ratio=2, relerr=1e-3)]
    common.write_json(path, "bev_pool", "dev", rows, [("peer", "missing")])
    obj = json.loads(path.read_text())
    assert gc.validate_bench(obj) == []
    assert obj["rows"][0]["ms"] is None and obj["rows"][0]["ratio"] == 2.0
    assert obj["skipped"] == [{"what": "peer", "why": "missing"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


# ----------------------------------------------------------------------------- the benchmarks' --json
def _run_bench(script, tmp_path, *args, pythonpath=None, timeout=300):
    out = tmp_path / f"{script}.json"
    env = _env(PYTHONPATH=os.pathsep.join(([str(pythonpath)] if pythonpath else []) + [str(REPO)]))
    r = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    obj = json.loads(out.read_text())
    assert gc.validate_bench(obj) == [], gc.validate_bench(obj)
    return obj


def _tables(obj):
    out = {}
    for r in obj["rows"]:
        out.setdefault(r["table"], {})[r["what"]] = r
    return out


def test_bench_bev_pool_json(tmp_path):
    obj = _run_bench("bench_bev_pool.py", tmp_path, "--small", "--quick", "--skip-lss")
    assert obj["benchmark"] == "bev_pool"
    t = _tables(obj)
    fwd = t["forward, fp32"]
    assert fwd["ours, cached plan"]["relerr"] < 1e-5 and fwd["index_add, cached ranks"]["relerr"] < 1e-5
    base = fwd["index_add, cached ranks"]["ms"]
    assert fwd["ours, cached plan"]["ratio"] == pytest.approx(base / fwd["ours, cached plan"]["ms"])
    floor = t["memory floor, fp32"]
    assert floor["ours, cached plan"]["ratio_vs"] == "floor"
    assert floor["ours, cached plan"]["ratio"] == pytest.approx(
        floor["floor, measured copy bandwidth"]["ms"] / floor["ours, cached plan"]["ms"])
    assert {"what": "LSS cumsum trick, per frame [fp32]", "why": "--skip-lss"} in obj["skipped"]
    # the headline reads these rows
    h = gc.headline({"sections": [{"name": "bev_pool", "kind": "bench", "status": "ok", "result": obj}]})
    assert h[0]["met"] is not None and h[1]["met"] is None


def test_bench_voxelize_json(tmp_path):
    obj = _run_bench("bench_voxelize.py", tmp_path, "--small", "--quick")
    t = _tables(obj)
    assert set(t) == {"hard voxelization, max_points 10, max_voxels 120,000",
                      "hard voxelization, max_points 10, max_voxels 160,000", "dynamic mean voxelization"}
    hard = t["hard voxelization, max_points 10, max_voxels 120,000"]
    assert set(hard) == {"naive loop (impl=reference)", "torch sort", "ours (impl=auto)", "ours + voxel_mean"}
    assert all("DIFFERS" not in r["note"] for r in obj["rows"]) and obj["skipped"] == []


def test_bench_boxes_json_without_shapely(tmp_path):
    fake = tmp_path / "fake"
    (fake / "shapely").mkdir(parents=True)
    (fake / "shapely" / "__init__.py").write_text("raise ImportError('simulated: no shapely')\n")
    obj = _run_bench("bench_boxes.py", tmp_path, "--small", "--quick", pythonpath=fake)
    t = _tables(obj)
    nms = t["rotated NMS, 100 boxes, thr 0.2"]
    assert set(nms) == {"naive loop (impl=reference)", "ours (impl=auto)", "ours (matrix + mask)"}
    assert nms["ours (impl=auto)"]["ratio_vs"] == "naive loop (impl=reference)"
    skipped = {s["what"]: s["why"] for s in obj["skipped"]}
    assert "simulated: no shapely" in skipped["shapely loop (NMS)"]
    assert any(k.startswith("shapely (20 x 100 slice)") for k in skipped)
    assert all("DIFFERS" not in r["note"] for r in obj["rows"])


@pytest.mark.slow
def test_bench_sparse_json_without_spconv(tmp_path, no_spconv):
    obj = _run_bench("bench_sparse.py", tmp_path, "--small", "--quick", "--skip-layers", pythonpath=no_spconv)
    t = _tables(obj)
    fwd = next(v for k, v in t.items() if k.startswith(gc.SPARSE_FWD_TABLE))
    assert list(fwd) == [next(iter(fwd))] and next(iter(fwd)).startswith("ours")
    skipped = {s["what"]: s["why"] for s in obj["skipped"]}
    assert "simulated: spconv is not installed here" in skipped["spconv rows (official and keyed)"]


def test_allow_cpu_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = _tool(["--out", str(out), "--allow-cpu", "--site-tar", "none", "--only", "env,voxelize", "--budget", "0"],
              timeout=600, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["state"] == "finished" and rep["cuda"] is False
    assert [(s["name"], s["status"]) for s in rep["sections"]] == [("env", "ok"), ("voxelize", "ok")]
    assert (out / "logs" / "voxelize.log").read_text().startswith("$ ")
    md = (out / "report.md").read_text()
    assert "### hard voxelization, max_points 10, max_voxels 120,000" in md

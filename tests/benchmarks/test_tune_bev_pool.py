"""benchmarks/tune_bev_pool.py on the CPU (Triton interpreter, tiny problem): the sweep writes valid shared-format
JSON, checks every config against the float64 reference, records a config that cannot compile as skipped and
goes on; its checker catches unwritten (NaN-poisoned) and wrong elements."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import tune_bev_pool as tune  # noqa: E402


def _validate_bench():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)
    spec.loader.exec_module(mod)
    return mod.validate_bench


def test_small_sweep_writes_json(tmp_path, capsys):
    path = tmp_path / "tune.json"
    # 16x2x64 splits the 80 channels as 64 + 16 over a 2-wide channel grid; 3x1x128 cannot compile
    # (BLOCK_P not a power of 2); the default (4x1x128 in the interpreter) is always added first.
    rc = tune.main(["--small", "--device", "cpu", "--dtypes", "fp32,fp16", "--configs", "16x2x64,3x1x128",
                    "--repeat", "1", "--json", str(path)])
    assert rc == 0
    obj = json.loads(path.read_text())
    assert _validate_bench()(obj) == []
    assert obj["benchmark"] == "bev_pool_tune"
    rows = obj["rows"]
    for kernel in ("_pool_fwd_kernel", "_lift_fwd_kernel"):
        for dtype, tol in (("fp32", 1e-6), ("fp16", 1e-3)):
            table = [r for r in rows if r["table"] == f"{kernel}, {dtype}"]
            assert [r["what"] for r in table] == ["P4 w1 C128", "P16 w2 C64"], table
            default, split = table
            assert "(default)" in default["note"] and default["ratio"] is None
            assert split["ratio_vs"] == "P4 w1 C128" and split["ratio"] > 0
            assert split["note"].startswith("BLOCK_P=16 num_warps=2 BLOCK_C=64")
            for r in table:
                assert r["dtype"] == dtype and r["ms"] > 0 and 0 <= r["relerr"] < tol, r
            best = [r for r in rows if r["table"] == "best config per kernel and dtype"
                    and r["what"].startswith(f"{kernel} {dtype}: ")]
            assert len(best) == 1 and best[0]["ms"] == min(r["ms"] for r in table)
    skipped = {s["what"]: s["why"] for s in obj["skipped"]}
    assert set(skipped) == {f"{k}, {d}: P3 w1 C128" for k in ("_pool_fwd_kernel", "_lift_fwd_kernel")
                            for d in ("fp32", "fp16")}
    assert all(why.startswith("failed: ") and "\n" not in why for why in skipped.values())
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("total ")
    assert "## best config per kernel and dtype" in out


def test_checker_catches_unwritten_and_wrong_elements():
    from bevfusion.ops.bev_pool import bev_pool_plan
    from bevfusion.ops.bev_pool import triton as kernels

    coords, grid, depth, img = tune.tiny_problem("cpu")
    plan = bev_pool_plan(coords, 1, grid)
    case = tune.build_cases("pool", "fp32", plan, depth, img, kernels)
    c = case.out.shape[1]
    assert c == 80

    cfg = tune.Config(4, 1, 64)
    case.out.fill_(float("nan"))
    case.launch(cfg, case.out)
    rel, problem = tune.check_output(case.out, case.ref, case.ref_abs, *tune.TOL["fp32"])
    assert problem is None and rel < 1e-6

    # a 1-wide channel grid with BLOCK_C = 64 leaves channels 64..79 unwritten
    case.out.fill_(float("nan"))
    kernels._pool_fwd_kernel[(plan.num_cells, 1)](case.inputs[0], plan.order, plan.cell_ptr,
                                                  plan.launch_cells, case.out, c, IS_F64=False, **cfg.meta())
    rel, problem = tune.check_output(case.out, case.ref, case.ref_abs, *tune.TOL["fp32"])
    assert rel is None and problem.startswith(f"wrong: {plan.num_cells * 16} of ")
    assert f"({plan.num_cells * 16} not finite" in problem

    # one element off by 1% of its cell's |terms|: caught although the overall relerr stays small
    good = case.ref.float()
    cell = int(case.ref_abs[:, 0].argmax())
    good[cell, 5] += 0.01 * float(case.ref_abs[cell, 5])
    rel, problem = tune.check_output(good, case.ref, case.ref_abs, *tune.TOL["fp32"])
    assert rel is not None and problem.startswith("wrong: 1 of ") and f"cell {cell} channel 5" in problem


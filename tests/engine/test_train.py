"""The training engine end to end on a toy model: exact resume after SIGKILL (mid-epoch snapshot, and a
kill while a checkpoint is being written), clear errors for corrupted / foreign checkpoints, non-strict
`--load-from`, DDP with gloo equal to one process on the same global batch, logging and `--help`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine_toy as toy
from bevfusion.engine import checkpoint as ckpt_io
from bevfusion.engine.launch import build_parser, main, make_scaler
from bevfusion.engine.trainer import SkipSampler, parse_losses

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with one thread too: same kernels, same bits
    yield
    torch.set_num_threads(n)


def _env(**extra) -> dict:
    env = {**os.environ, "BEVFUSION_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_inproc(cfg: Path, work: Path, *extra: str, evaluate=toy.evaluate) -> int:
    return main([str(cfg), "--work-dir", str(work), *extra], model_builder=toy.build_model,
                dataset_builder=toy.build_dataset, evaluate_fn=evaluate)


def run_sub(cfg: Path, work: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "engine_toy.py"), str(cfg), "--work-dir", str(work), *extra],
                          env=_env(**env), capture_output=True, text=True, timeout=180)


def read_log(work: Path) -> dict[int, dict]:
    """Train records by global iteration (a resumed run's records replace the killed run's)."""
    out = {}
    for line in (work / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["mode"] == "train":
            out[rec["global_iter"]] = rec
    return out


def final_state(work: Path) -> dict:
    return ckpt_io.load_checkpoint(work / "latest.pth")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run (7 iterations per epoch, last batch partial, dropout and random
    augmentation from torch, numpy and python RNGs)."""
    root = tmp_path_factory.mktemp("reference")
    cfg = toy.write_config(root / "toy.yaml")
    assert run_inproc(cfg, root / "work") == 0
    return cfg, root / "work"


def test_reference_run_files_and_log(reference):
    _, work = reference
    names = sorted(p.name for p in work.iterdir())
    # max_keep_ckpts 2: epoch_1 pruned; latest is a hard link to the newest epoch file
    assert names == ["configs.yaml", "epoch_2.pth", "epoch_3.pth", "latest.pth", "log.jsonl", "train.log"]
    assert os.path.samefile(work / "latest.pth", work / "epoch_3.pth")
    text = (work / "train.log").read_text()
    assert "Epoch [1/3][7/7]" in text and "eta: " in text and "samples/s: " in text and "lr: " in text
    assert "loss_mse: " in text and "grad_norm: " in text and "Epoch(val) [3] mse: " in text
    log = read_log(work)
    assert sorted(log) == list(range(1, 22))
    rec = log[5]
    assert rec["loss"] == pytest.approx(rec["loss_mse"] + rec["loss_l1"])  # stat_mean is not a loss
    meta = final_state(work)["meta"]
    assert (meta["epoch"], meta["inner_iter"], meta["iter"]) == (3, 0, 21)
    val = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if '"val"' in line]
    assert [v["epoch"] for v in val] == [1, 2, 3]


@pytest.mark.parametrize("scenario", ["sigkill_mid_epoch", "sigkill_while_saving"])
def test_resume_after_sigkill_is_bitwise_exact(reference, tmp_path, scenario):
    cfg, ref_work = reference
    work = tmp_path / "work"
    if scenario == "sigkill_mid_epoch":
        # snapshots every 3 iterations; killed in global iteration 12 (epoch 2, iteration 5):
        # the resume starts from the snapshot after epoch 2 iteration 3 and skips those batches
        proc = run_sub(cfg, work, "--set", "checkpoint_config.iter_interval=3", TOY_KILL_AT="12")
        expected = (1, 3, 10)
    else:
        # killed halfway through writing epoch_2.pth: epoch_1.pth and latest.pth must survive intact
        proc = run_sub(cfg, work, TOY_CRASH_IN_SAVE="2")
        expected = (1, 0, 7)
        assert not (work / "epoch_2.pth").exists()
        assert list(work.glob(".epoch_2.pth.*.tmp")), "the torn write stays in its temp file"
        assert os.path.samefile(work / "latest.pth", work / "epoch_1.pth")
    assert proc.returncode == -9, proc.stderr[-3000:]
    meta = ckpt_io.load_checkpoint(work / "latest.pth")["meta"]
    assert (meta["epoch"], meta["inner_iter"], meta["iter"]) == expected

    assert run_inproc(cfg, work, "--resume") == 0
    got, ref = final_state(work), final_state(ref_work)
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for key in ref["state_dict"]:
        assert torch.equal(got["state_dict"][key], ref["state_dict"][key]), key
    for pid, state in ref["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["optimizer"]["state"][pid][name], state[name]), (pid, name)
    assert got["optimizer"]["param_groups"][0]["betas"] == ref["optimizer"]["param_groups"][0]["betas"]
    ref_log, got_log = read_log(ref_work), read_log(work)
    assert sorted(got_log) == sorted(ref_log)
    for it in ref_log:
        for k in ("loss", "loss_mse", "grad_norm", "lr", "momentum", "stat_mean"):
            assert got_log[it][k] == ref_log[it][k], (it, k)
    assert "resumed from" in (work / "train.log").read_text()


def test_resume_with_another_config_names_the_keys(reference, tmp_path):
    cfg, ref_work = reference
    work = tmp_path / "work"
    rc = run_inproc(cfg, work, "--resume", str(ref_work / "epoch_2.pth"),
                    "--set", "optimizer.lr=0.5", "model.hidden=8", "log_config.interval=2")
    assert rc == 1
    text = (work / "train.log").read_text()
    assert "different config" in text and "optimizer.lr: 0.01 -> 0.5" in text and "model.hidden: 16 -> 8" in text
    assert "log_config" not in text.split("mismatched keys")[1]  # runtime keys may change


def test_corrupted_and_foreign_checkpoints_fail_clearly(reference, tmp_path):
    cfg, ref_work = reference
    data = (ref_work / "epoch_3.pth").read_bytes()
    torn = tmp_path / "torn.pth"
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt_io.CheckpointError, match="torn.pth: not a readable checkpoint"):
        ckpt_io.load_checkpoint(torn)
    assert run_inproc(cfg, tmp_path / "work", "--resume", str(torn)) == 1
    assert "torn.pth: not a readable checkpoint (truncated, corrupted" in (tmp_path / "work" / "train.log").read_text()

    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(ckpt_io.CheckpointError, match="not a bevfusion training checkpoint.*--load-from"):
        ckpt_io.load_checkpoint(plain)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"meta": {"format": ckpt_io.FORMAT}, "obj": SkipSampler([], 0)}, unsafe)
    with pytest.raises(ckpt_io.CheckpointError, match="unsafe"):
        ckpt_io.load_checkpoint(unsafe)
    with pytest.raises(ckpt_io.CheckpointError, match=r"missing keys \(1\): heads.bias.*unexpected keys \(1\): "
                                                      r"head.bias.*shape mismatch \(1\): heads.weight"):
        sd = dict(ckpt_io.load_checkpoint(ref_work / "epoch_3.pth")["state_dict"])
        sd["head.bias"] = sd.pop("heads.bias")
        sd["heads.weight"] = torch.zeros(3, 16)
        ckpt_io.load_model_state(toy.ToyModel(hidden=16), sd)


def test_load_from_is_non_strict_and_logs_keys(tmp_path):
    cfg = toy.write_config(tmp_path / "toy.yaml", max_epochs=1)
    weights = tmp_path / "weights.pth"
    src = toy.ToyModel()
    torch.save({"state_dict": {"heads.weight": torch.full_like(src.heads.weight, 0.25),
                               "extra.weight": torch.zeros(2)}}, weights)
    assert run_inproc(cfg, tmp_path / "work", "--load-from", str(weights), "--set", "optimizer.lr=0.0",
                      evaluate=None) == 0
    text = (tmp_path / "work" / "train.log").read_text()
    assert "missing keys: encoders.0.bias, encoders.0.weight, heads.bias" in text
    assert "unexpected keys: extra.weight" in text
    state = final_state(tmp_path / "work")["state_dict"]
    assert torch.all(state["heads.weight"] == 0.25)  # lr 0 (weight decay scales with lr): weights unchanged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    # no dropout / augmentation noise: those random streams are per process by design
    cfg = toy.write_config(tmp_path / "toy.yaml", max_epochs=2, model__dropout=0.0,
                           data__train={"type": "ToyData", "n": 24, "noise": 0.0}, data__samples_per_gpu=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(HERE / "engine_toy.py"),
           str(cfg), "--work-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=_env(TOY_NO_EVAL="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # one process with the whole global batch (2 x 2): the same samples per step
    assert run_inproc(cfg, tmp_path / "single", "--set", "data.samples_per_gpu=4", evaluate=None) == 0
    ddp, single = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert sorted(ddp) == sorted(single) == list(range(1, 13))
    for it in single:
        for k in ("loss", "loss_mse", "loss_l1", "grad_norm"):
            assert ddp[it][k] == pytest.approx(single[it][k], rel=1e-5, abs=1e-7), (it, k)
        assert ddp[it]["lr"] == single[it]["lr"]
        assert ddp[it]["stats/rank1_only"] == 5.0 and "stats/rank1_only" not in single[it]
    a, b = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    assert a["meta"]["world_size"] == 2 and len(a["rng"]) == 2
    for key in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)


def test_bf16_on_cpu_fp16_scaler_and_optional_tensorboard(tmp_path):
    cfg = toy.write_config(tmp_path / "toy.yaml", max_epochs=1,
                           log_config__hooks=[{"type": "TextLoggerHook"}, {"type": "TensorboardLoggerHook"}])
    assert run_inproc(cfg, tmp_path / "work", "--amp", "bf16", evaluate=None) == 0
    text = (tmp_path / "work" / "train.log").read_text()
    assert "amp bf16" in text
    try:
        from torch.utils import tensorboard  # noqa: F401
    except ImportError:
        assert text.count("tensorboard is not installed") == 1
    else:
        assert any((tmp_path / "work" / "tf_logs").iterdir())
    scaler = make_scaler({"fp16": {"loss_scale": {"growth_interval": 2000}}}, torch.float16, torch.device("cpu"))
    assert scaler.get_growth_interval() == 2000
    assert make_scaler({"fp16": None}, None, torch.device("cpu")) is None
    assert run_inproc(cfg, tmp_path / "w2", "--amp", "fp16", evaluate=None) == 1  # fp16 needs CUDA


def test_parse_losses_and_skip_sampler():
    total, logs = parse_losses({"loss_a": torch.tensor([1.0, 3.0]), "loss_b": [torch.tensor(1.0), torch.tensor([2.0])],
                                "acc": torch.tensor(0.5), "stats/object/loss_unweighted": torch.tensor(7.0)})
    assert total.item() == 5.0 and logs["loss"].item() == 5.0 and logs["acc"].item() == 0.5
    assert logs["stats/object/loss_unweighted"].item() == 7.0
    with pytest.raises(ValueError, match="no key containing 'loss'"):
        parse_losses({"acc": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="'loss_x' is a str"):
        parse_losses({"loss_x": "bad"})
    assert list(SkipSampler(range(10), 4)) == [4, 5, 6, 7, 8, 9] and len(SkipSampler(range(10), 4)) == 6


def test_latest_pointer_prune_and_rng_roundtrip(tmp_path):
    import random

    import numpy as np

    for n in (1, 2, 3):
        (tmp_path / f"epoch_{n}.pth").write_bytes(b"x" * n)
        ckpt_io.link_latest(tmp_path, tmp_path / f"epoch_{n}.pth")
    assert (tmp_path / "latest.pth").read_bytes() == b"xxx"
    assert [p.name for p in ckpt_io.prune_checkpoints(tmp_path, 2)] == ["epoch_1.pth"]
    assert ckpt_io.prune_checkpoints(tmp_path, -1) == []
    assert not list(tmp_path.glob(".*tmp"))
    state = ckpt_io.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(3), torch.rand(5)
    ckpt_io.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_help_documents_every_option(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.dest
    for word in ("--resume", "--load-from", "--work-dir", "--set", "--amp", "torchrun"):
        assert word in text
    import runpy

    with pytest.raises(SystemExit) as exit_info:  # the script itself, in this process
        sys.argv, argv = [str(REPO / "tools" / "train.py"), "--help"], sys.argv
        try:
            runpy.run_path(str(REPO / "tools" / "train.py"), run_name="__main__")
        finally:
            sys.argv = argv
    assert exit_info.value.code == 0 and "--load-from" in capsys.readouterr().out


def test_missing_model_package_is_a_clear_error(monkeypatch):
    from bevfusion.engine import launch

    monkeypatch.setitem(sys.modules, "bevfusion.models", None)  # makes the import fail
    with pytest.raises(SystemExit, match="bevfusion.models.build_model is not available"):
        launch._lazy_build_model()


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2)])
def test_epoch_loader_skips_exactly_the_done_batches(tmp_path, world_size, workers):
    from bevfusion.datasets.loader import build_dataloader
    from bevfusion.engine.dist import DistInfo
    from bevfusion.engine.schedules import build_schedules
    from bevfusion.engine.trainer import Trainer

    rank = world_size - 1
    loader = build_dataloader(toy.ToyData(n=26), samples_per_gpu=3, workers_per_gpu=workers, shuffle=True, seed=5,
                              rank=rank, world_size=world_size)
    model = toy.ToyModel()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                      build_schedules({}, 2, len(loader)), 2, tmp_path, {}, DistInfo(rank, world_size), seed=5,
                      tensorboard=False)

    def indices(epoch, skip):
        return [[m["index"] for m in b["metas"]] for b in trainer._epoch_loader(epoch, skip)]

    full = indices(1, 0)
    assert indices(1, 2) == full[2:] and len(full) == len(loader)
    assert indices(0, 0) != full and indices(1, 0) == full  # seeded by epoch, repeatable
    assert all(m["epoch"] == 1 for b in trainer._epoch_loader(1, 4) for m in b["metas"])  # dataset.set_epoch


def test_default_work_dir_follows_the_config_tree():
    from bevfusion.engine.launch import default_work_dir

    leaf = "configs/nuscenes/det/centerhead/lssfpn/camera/256x704/swint/default.yaml"
    assert default_work_dir(leaf) == Path("work_dirs/nuscenes/det/centerhead/lssfpn/camera/256x704/swint/default")
    assert default_work_dir("/tmp/toy.yaml") == Path("work_dirs/toy")


def test_default_evaluate_fn_runs_inference_and_the_configured_metrics(tmp_path, monkeypatch):
    from bevfusion.engine.dist import DistInfo
    from bevfusion.engine.launch import default_evaluate_fn
    from bevfusion.evaluation import runner

    calls = []

    def fake_metrics(records, dataset, metrics, out_dir=None, **kwargs):
        calls.append((len(records), list(metrics), out_dir))
        if len(calls) == 2:
            raise RuntimeError("devkit exploded")
        return {"map/mean/iou@max": 0.5}

    monkeypatch.setattr(runner, "evaluate_results", fake_metrics)
    cfg = {"model": {"heads": {"object": None, "map": {"type": "X"}}},
           "data": {"workers_per_gpu": 0, "val": {"type": "ToyData", "n": 5}}}
    evaluate = default_evaluate_fn(cfg, DistInfo(), tmp_path, toy.build_dataset, None)
    assert evaluate(toy.ToyModel(), 1) == {"map/mean/iou@max": 0.5}
    assert calls == [(5, ["map"], tmp_path / "eval_epoch_1")]
    assert evaluate(toy.ToyModel(), 2) == {}  # a failing metric is logged, training goes on
    assert default_evaluate_fn({"model": {"heads": {}}, "data": {"val": {}}}, DistInfo(), tmp_path,
                               toy.build_dataset, None) is None

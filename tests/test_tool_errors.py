"""Bad inputs through every tool, as a table: for each case the exit code, exactly one stderr line
`error: ...` that names the culprit (file, option, config key, sample or camera), no traceback, and no
protected file changed (hashes before and after).

Most cases call the tool's `main(argv)` in this process (the same function `if __name__ == "__main__"`
runs, through `bevfusion.utils.cli.tool_main`); a few run the real scripts as subprocesses to prove the
exit status and stderr of the process itself, `--debug` / BEVFUSION_DEBUG=1, and a full disk (the
operating system refusing a checkpoint write) leaving the last good checkpoint.

Exit codes (bevfusion.utils.cli): 2 = the command line is wrong or an output is refused, 1 = the run
failed on a config value, an input file or the environment, 130 = interrupted.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CONFIG = REPO / "configs" / "nuscenes" / "synthetic" / "fusion.yaml"
_MODULES: dict[str, object] = {}


def tool(name: str):
    """tools/<name>.py as a module (loaded once)."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_bad_input_{name}", TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses in the tool look their module up
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def run_inproc(capsys, name: str, argv: list) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of tools/<name>.py's main(argv) run in this process."""
    capsys.readouterr()
    try:
        rc = tool(name).main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exit (usage errors), as the script would
        rc = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def check_one_error(rc: int, err: str, code: int, culprits: list[str]) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{err[-3000:]}"
    assert len(lines) == 1, f"expected exactly one 'error:' line, got {len(lines)}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    return lines[0]


def digest(path: Path) -> str | None:
    """SHA-256 of a file, of a folder's files (names and contents), or None when absent."""
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
            if p.is_file():
                h.update(p.read_bytes())
        return "dir:" + h.hexdigest()
    if path.is_symlink() or path.exists():
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "dangling"
    return None


class _Evil:
    """Unpickling this runs os.system: a file holding it must be refused before any code runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@dataclass
class Files:
    """The inputs of the cases, made once per module."""

    root: Path
    config: Path = CONFIG
    marker: Path = field(init=False)

    def __post_init__(self):
        r = self.root
        self.marker = r / "INJECTED_CODE_RAN"
        self.ckpt = r / "model.pth"
        torch.save({"state_dict": {"w": torch.zeros(3)}}, self.ckpt)
        self.ckpt_copy = r / "other.pth"
        torch.save({"state_dict": {"w": torch.ones(3)}, "optimizer": {}, "rng": []}, self.ckpt_copy)
        self.nan_ckpt = r / "nan.pth"
        torch.save({"state_dict": {"good": torch.zeros(2), "bad.weight": torch.tensor([0.0, float("nan")])}},
                   self.nan_ckpt)
        self.empty_ckpt = r / "empty.pth"
        torch.save({"state_dict": {}}, self.empty_ckpt)
        self.garbage = r / "garbage.pth"
        self.garbage.write_bytes(np.random.default_rng(0).bytes(512))
        self.evil_ckpt = r / "evil.pth"
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(self.marker)}, self.evil_ckpt)
        self.evil_pkl = r / "evil_infos.pkl"
        self.evil_pkl.write_bytes(pickle.dumps({"infos": [_Evil(self.marker)], "metadata": {}}, protocol=4))
        self.text = r / "notes.txt"
        self.text.write_text("my notes\n")
        self.results = r / "results.pkl"
        self.results.write_bytes(pickle.dumps([{"token": "t0", "scores_3d": np.zeros(2)}], protocol=4))
        self.metrics = r / "metrics.json"
        self.metrics.write_text(json.dumps({"object/map": 0.5}))
        self.folder = r / "a_folder"
        self.folder.mkdir()
        (self.folder / "keep.txt").write_text("keep")
        self.hardlink = r / "hardlink.pth"
        os.link(self.ckpt, self.hardlink)
        self.symlink = r / "symlink.pth"
        self.symlink.symlink_to(self.ckpt)
        self.missing = r / "does_not_exist.pth"
        self.fake_root = r / "fake_nuscenes"
        (self.fake_root / "v1.0-mini").mkdir(parents=True)
        self.root_info = self.fake_root / "nuscenes_infos_train.pkl"  # a checkpoint where an info file goes
        torch.save({"state_dict": {}}, self.root_info)
        self.yaml_bad = r / "bad.yaml"
        self.yaml_bad.write_text("a: [1, 2\n")
        self.yaml_tag = r / "tag.yaml"
        self.yaml_tag.write_text(f'a: !!python/object/apply:os.system ["touch {self.marker}"]\n')
        self.yaml_inj = r / "inj.yaml"
        self.yaml_inj.write_text(f'a: 1\nb: ${{__import__("os").system("touch {self.marker}")}}\n')


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("bad_inputs"))


@dataclass
class Case:
    id: str
    tool: str
    argv: Callable[[Files], list]
    code: int
    culprits: Callable[[Files], list[str]]
    protect: Callable[[Files], list[Path]] = lambda f: []


def C(id, tool_name, argv, code, culprits, protect=lambda f: [], marks=()):
    return pytest.param(Case(id, tool_name, argv, code, culprits, protect), id=f"{tool_name}:{id}", marks=marks)


def _train(*extra):
    return lambda f: [f.config, "--work-dir", f.root / "work_never_made", *extra]


def _test(*extra, ckpt="ckpt"):
    return lambda f: [f.config, getattr(f, ckpt), *[(a(f) if callable(a) else a) for a in extra]]


def _val(f):
    return ["--set", f"dataset_root={f.root}/", "data.workers_per_gpu=0"]


def PROTECT_ALL(f: Files) -> list[Path]:
    return [f.ckpt, f.config, f.text, f.results, f.metrics, f.folder, f.nan_ckpt, f.ckpt_copy]



CASES = [
    # ---- print_config: config files and overrides -------------------------------------------------
    C("missing-config", "print_config", lambda f: [f.root / "nope.yaml"], 2, lambda f: ["nope.yaml"]),
    C("config-is-folder", "print_config", lambda f: [f.folder], 2, lambda f: ["a_folder"]),
    C("yaml-syntax", "print_config", lambda f: [f.yaml_bad], 2, lambda f: ["bad.yaml", "line 2"]),
    C("yaml-python-tag", "print_config", lambda f: [f.yaml_tag], 2, lambda f: ["tag.yaml"]),
    C("yaml-injection", "print_config", lambda f: [f.yaml_inj], 2, lambda f: ["inj.yaml", "key b"]),
    C("override-injection", "print_config",
      lambda f: [f.config, "--set", f'optimizer.lr=${{__import__("os").system("touch {f.marker}")}}'], 2,
      lambda f: ["optimizer.lr"]),
    C("override-unknown-key", "print_config", lambda f: [f.config, "--set", "optimizer.lrr=1"], 2,
      lambda f: ["optimizer.lrr"]),
    C("override-no-equals", "print_config", lambda f: [f.config, "--set", "optimizer"], 2, lambda f: ["optimizer"]),
    C("set-without-value", "print_config", lambda f: [f.config, "--set"], 2, lambda f: ["--set"]),
    C("dotted-without-value", "print_config", lambda f: [f.config, "--optimizer.lr"], 2,
      lambda f: ["--optimizer.lr"]),
    C("unknown-option", "print_config", lambda f: [f.config, "--bogus"], 2, lambda f: ["--bogus"]),
    C("chain-missing-config", "print_config", lambda f: [f.root / "nope.yaml", "--chain"], 2,
      lambda f: ["nope.yaml"]),
    # ---- train: every engine setting is type-checked before anything is built -------------------
    C("lr-not-a-number", "train", _train("optimizer.lr=abc"), 1, lambda f: ["optimizer.lr", "abc"]),
    C("lr-negative", "train", _train("optimizer.lr=-1"), 1, lambda f: ["optimizer.lr"]),
    C("lr-null", "train", _train("optimizer.lr=null"), 1, lambda f: ["optimizer.lr"]),
    C("weight-decay-text", "train", _train("optimizer.weight_decay=abc"), 1, lambda f: ["optimizer.weight_decay"]),
    C("optimizer-type", "train", _train("optimizer.type=Adagrad"), 1, lambda f: ["optimizer.type"]),
    C("max-epochs-negative", "train", _train("max_epochs=-1"), 1, lambda f: ["max_epochs", "-1"]),
    C("max-epochs-zero", "train", _train("max_epochs=0"), 1, lambda f: ["max_epochs"]),
    C("max-epochs-fraction", "train", _train("max_epochs=1.5"), 1, lambda f: ["max_epochs", "1.5"]),
    C("max-epochs-text", "train", _train("max_epochs=ten"), 1, lambda f: ["max_epochs"]),
    C("batch-fraction", "train", _train("data.samples_per_gpu=1.5"), 1, lambda f: ["data.samples_per_gpu", "1.5"]),
    C("batch-zero", "train", _train("data.samples_per_gpu=0"), 1, lambda f: ["data.samples_per_gpu"]),
    C("batch-text", "train", _train("data.samples_per_gpu=abc"), 1, lambda f: ["data.samples_per_gpu"]),
    C("batch-bool", "train", _train("data.samples_per_gpu=true"), 1, lambda f: ["data.samples_per_gpu"]),
    C("workers-negative", "train", _train("data.workers_per_gpu=-1"), 1, lambda f: ["data.workers_per_gpu"]),
    C("grad-clip-text", "train", _train("optimizer_config.grad_clip.max_norm=abc"), 1,
      lambda f: ["optimizer_config.grad_clip.max_norm"]),
    C("grad-clip-number", "train", _train("optimizer_config.grad_clip=5"), 1, lambda f: ["optimizer_config.grad_clip"]),
    C("grad-clip-negative", "train", _train("optimizer_config.grad_clip.max_norm=-3"), 1,
      lambda f: ["optimizer_config.grad_clip.max_norm"]),
    C("ckpt-interval-text", "train", _train("checkpoint_config.interval=often"), 1,
      lambda f: ["checkpoint_config.interval"]),
    C("max-keep-fraction", "train", _train("checkpoint_config.max_keep_ckpts=1.5"), 1,
      lambda f: ["checkpoint_config.max_keep_ckpts"]),
    C("log-interval-zero", "train", _train("log_config.interval=0"), 1, lambda f: ["log_config.interval"]),
    C("eval-interval-text", "train", _train("evaluation.interval=x"), 1, lambda f: ["evaluation.interval"]),
    C("seed-text", "train", _train("seed=abc"), 1, lambda f: ["seed"]),
    C("deterministic-text", "train", _train("+deterministic=maybe"), 1, lambda f: ["deterministic"]),
    C("lr-policy", "train", _train("lr_config.policy=bogus"), 1, lambda f: ["lr_config.policy"]),
    C("lr-target-ratio", "train", _train("+lr_config.target_ratio=abc"), 1, lambda f: ["lr_config.target_ratio"]),
    C("lr-step-ratio-up", "train", _train("+lr_config.step_ratio_up=2"), 1, lambda f: ["lr_config.step_ratio_up"]),
    C("momentum-cycles", "train", _train("+momentum_config.cyclic_times=0"), 1,
      lambda f: ["momentum_config.cyclic_times"]),
    C("warmup-iters-text", "train", _train("+lr_config.warmup=linear", "+lr_config.warmup_iters=abc"), 1,
      lambda f: ["lr_config.warmup_iters"]),
    C("work-dir-is-file", "train", lambda f: [f.config, "--work-dir", f.text], 2, lambda f: ["--work-dir", "notes.txt"],
      lambda f: [f.text]),
    C("resume-missing", "train", _train("--resume", "/nowhere/latest.pth"), 1, lambda f: ["/nowhere/latest.pth"]),
    C("load-from-missing", "train", _train("--load-from", "/nowhere/w.pth"), 1, lambda f: ["/nowhere/w.pth"]),
    C("device-cuda-missing", "train", _train("--device", "cuda"), 1, lambda f: ["--device cuda"],
      marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    C("amp-choice", "train", _train("--amp", "fp8"), 2, lambda f: ["--amp"]),
    C("device-choice", "train", _train("--device", "tpu"), 2, lambda f: ["--device"]),
    # ---- convert_checkpoint: never over its input, never over another file without --force -------
    C("out-is-in", "convert_checkpoint", lambda f: [f.config, f.ckpt, f.ckpt], 2, lambda f: ["model.pth"],
      lambda f: [f.ckpt]),
    C("out-is-in-forced", "convert_checkpoint", lambda f: [f.config, f.ckpt, f.ckpt, "--force"], 2,
      lambda f: ["model.pth"], lambda f: [f.ckpt]),
    C("out-hardlink-of-in", "convert_checkpoint", lambda f: [f.config, f.ckpt, f.hardlink, "--force"], 2,
      lambda f: ["hardlink.pth"], lambda f: [f.ckpt, f.hardlink]),
    C("out-symlink-to-in", "convert_checkpoint", lambda f: [f.config, f.ckpt, f.symlink, "--force"], 2,
      lambda f: ["symlink.pth"], lambda f: [f.ckpt]),
    C("out-is-config", "convert_checkpoint", lambda f: [f.config, f.ckpt, f.config, "--force"], 2,
      lambda f: ["fusion.yaml"], lambda f: [f.config]),
    C("out-is-folder", "convert_checkpoint", lambda f: [f.config, f.ckpt, f.folder], 2, lambda f: ["a_folder"],
      lambda f: [f.folder]),
    C("in-missing", "convert_checkpoint", lambda f: [f.config, f.missing, f.root / "c1.pth"], 1,
      lambda f: ["does_not_exist.pth"]),
    C("in-garbage", "convert_checkpoint", lambda f: [f.config, f.garbage, f.root / "c2.pth"], 1,
      lambda f: ["garbage.pth"], lambda f: [f.garbage]),
    C("in-injected-code", "convert_checkpoint", lambda f: [f.config, f.evil_ckpt, f.root / "c3.pth"], 1,
      lambda f: ["evil.pth"]),
    C("in-nan", "convert_checkpoint", lambda f: [f.config, f.nan_ckpt, f.root / "c4.pth"], 1,
      lambda f: ["nan.pth", "bad.weight", "NaN"]),
    C("in-text", "convert_checkpoint", lambda f: [f.config, f.text, f.root / "c5.pth"], 1, lambda f: ["notes.txt"]),
    # ---- test: outputs, requests and checkpoints, all before any data or inference --------------
    C("nothing-to-do", "test", _test(), 2, lambda f: ["--eval"]),
    C("metrics-without-eval", "test", _test("--out", lambda f: f.root / "r.pkl", "--metrics-out",
                                            lambda f: f.root / "m.json"), 2, lambda f: ["--metrics-out"]),
    C("out-is-checkpoint", "test", _test("--out", lambda f: f.ckpt), 2, lambda f: ["--out", "model.pth"],
      PROTECT_ALL),
    C("out-is-checkpoint-forced", "test", _test("--out", lambda f: f.ckpt, "--force"), 2,
      lambda f: ["--out", "model.pth"], PROTECT_ALL),
    C("out-is-config", "test", _test("--out", lambda f: f.config, "--force"), 2, lambda f: ["--out", "fusion.yaml"],
      PROTECT_ALL),
    C("out-over-other-checkpoint", "test", _test("--out", lambda f: f.ckpt_copy), 2,
      lambda f: ["--out", "other.pth", "checkpoint", "--force"], PROTECT_ALL),
    C("out-over-text", "test", _test("--out", lambda f: f.text), 2, lambda f: ["--out", "notes.txt"], PROTECT_ALL),
    C("out-is-folder", "test", _test("--out", lambda f: f.folder), 2, lambda f: ["--out", "a_folder"], PROTECT_ALL),
    C("metrics-out-is-checkpoint", "test", _test("--eval", "map", "--metrics-out", lambda f: f.ckpt), 2,
      lambda f: ["--metrics-out", "model.pth"], PROTECT_ALL),
    C("metrics-out-over-text", "test", _test("--eval", "map", "--metrics-out", lambda f: f.text), 2,
      lambda f: ["--metrics-out", "notes.txt"], PROTECT_ALL),
    C("metrics-out-same-as-out", "test", _test("--eval", "map", "--out", lambda f: f.results, "--metrics-out",
                                               lambda f: f.results), 2, lambda f: ["--metrics-out"], PROTECT_ALL),
    C("jsonfile-prefix-is-file", "test", _test("--format-only", "--jsonfile-prefix", lambda f: f.text), 2,
      lambda f: ["--jsonfile-prefix", "notes.txt"], PROTECT_ALL),
    C("eval-set-unknown", "test", _test("--eval", "bbox", "--eval-set", "bogus"), 2, lambda f: ["--eval-set", "bogus"]),
    C("eval-map-without-head", "test", _test("--eval", "map", "--set", "model.heads.map=null"), 2,
      lambda f: ["--eval map", "model.heads.map"]),
    C("split-unknown", "test", _test("--eval", "map", "--split", "train"), 2, lambda f: ["--split"]),
    C("workers-negative", "test", _test("--eval", "map", "--workers", "-1"), 2, lambda f: ["--workers"]),
    C("max-sweeps-negative", "test", _test("--eval", "map", "--max-sweeps", "-1"), 2, lambda f: ["--max-sweeps"]),
    C("missing-sensors-policy", "test", _test("--eval", "map", "--missing-sensors", "ignore"), 2,
      lambda f: ["--missing-sensors"]),
    C("drop-cameras-empty-name", "test", _test("--eval", "map", "--drop-cameras", "CAM_FRONT,,"), 2,
      lambda f: ["--drop-cameras"]),
    C("device-unknown", "test", _test("--eval", "map", "--device", "tpu"), 2, lambda f: ["--device", "tpu"]),
    C("device-cuda-missing", "test", _test("--eval", "map", "--device", "cuda:7" if torch.cuda.device_count() < 8
                                           else "cuda:99"), 2, lambda f: ["--device", "cuda"]),
    C("checkpoint-missing", "test", _test("--eval", "map", ckpt="missing"), 1, lambda f: ["does_not_exist.pth"]),
    C("checkpoint-garbage", "test", _test("--eval", "map", ckpt="garbage"), 1, lambda f: ["garbage.pth"]),
    C("checkpoint-injected-code", "test", _test("--eval", "map", ckpt="evil_ckpt"), 1, lambda f: ["evil.pth"]),
    C("checkpoint-nan", "test", _test("--eval", "bbox", ckpt="nan_ckpt"), 1,
      lambda f: ["nan.pth", "bad.weight", "NaN"]),
    C("checkpoint-empty", "test", _test("--eval", "map", ckpt="empty_ckpt"), 1, lambda f: ["empty.pth"]),
    C("info-file-missing", "test", _test("--eval", "map", "--set", lambda f: f"data.test.ann_file={f.missing}"), 1,
      lambda f: ["does_not_exist.pth"]),
    C("info-file-injected-code", "test",
      _test("--eval", "map", "--set", lambda f: f"data.test.ann_file={f.evil_pkl}"), 1,
      lambda f: ["evil_infos.pkl", "system"]),
    C("info-file-is-checkpoint", "test", _test("--eval", "map", "--set", lambda f: f"data.test.ann_file={f.ckpt}"), 1,
      lambda f: ["model.pth"], PROTECT_ALL),
    C("dataset-type", "test", _test("--eval", "map", "--set", "data.test.type=Bogus"), 1,
      lambda f: ["data.test", "Bogus"]),
    C("config-key-typo", "test", _test("--eval", "map", "--set", "data.tset.ann_file=x"), 2, lambda f: ["data.tset"]),
    # ---- visualize ----------------------------------------------------------------------------------
    C("max-samples-negative", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--max-samples", "-3"], 2,
      lambda f: ["--max-samples", "-3"]),
    C("max-samples-zero", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--max-samples", "0"], 2,
      lambda f: ["--max-samples"]),
    C("max-samples-fraction", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--max-samples", "1.5"],
      2, lambda f: ["--max-samples"]),
    C("sweeps-negative", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--sweeps", "-1"], 2,
      lambda f: ["--sweeps"]),
    C("score-threshold", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--score-threshold", "2"], 2,
      lambda f: ["--score-threshold"]),
    C("map-threshold-nan", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--map-threshold", "nan"], 2,
      lambda f: ["--map-threshold"]),
    C("no-sink", "visualize", lambda f: [f.config], 2, lambda f: ["--out"]),
    C("results-and-checkpoint", "visualize",
      lambda f: [f.config, "--out", f.root / "v.rrd", "--results", f.results, "--checkpoint", f.ckpt], 2,
      lambda f: ["--checkpoint"]),
    C("out-is-config", "visualize", lambda f: [f.config, "--out", f.config, "--force"], 2,
      lambda f: ["--out", "fusion.yaml"], PROTECT_ALL),
    C("out-is-results", "visualize", lambda f: [f.config, "--results", f.results, "--out", f.results, "--force"], 2,
      lambda f: ["--out", "results.pkl"], PROTECT_ALL),
    C("out-over-text", "visualize", lambda f: [f.config, "--out", f.text], 2, lambda f: ["--out", "notes.txt"],
      PROTECT_ALL),
    C("device-unknown", "visualize", lambda f: [f.config, "--out", f.root / "v.rrd", "--device", "quantum"], 2,
      lambda f: ["--device", "quantum"]),
    C("results-missing", "visualize", lambda f: [f.config, "--results", f.missing, "--out", f.root / "v.rrd"], 1,
      lambda f: ["--results", "does_not_exist.pth"]),
    # ---- create_data ----------------------------------------------------------------------------------
    C("extra-tag-traversal", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-mini", "--extra-tag", "../../x"], 2,
      lambda f: ["--extra-tag", "../../x"]),
    C("extra-tag-slash", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-mini", "--extra-tag", "a/b"], 2,
      lambda f: ["--extra-tag"]),
    C("extra-tag-hidden", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-mini", "--extra-tag", ".x"], 2,
      lambda f: ["--extra-tag"]),
    C("root-missing", "create_data",
      lambda f: ["nuscenes", "--root-path", f.root / "nowhere", "--version", "v1.0-mini"], 2,
      lambda f: ["--root-path", "nowhere"]),
    C("version-unknown", "create_data", lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v2.0"], 2,
      lambda f: ["--version"]),
    C("version-folder-missing", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-trainval"], 2,
      lambda f: ["--version", "v1.0-trainval"]),
    C("max-sweeps-negative", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-mini", "--max-sweeps", "-2"], 2,
      lambda f: ["--max-sweeps"]),
    C("out-dir-is-file", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-mini", "--out-dir", f.text], 2,
      lambda f: ["--out-dir", "notes.txt"], lambda f: [f.text]),
    C("info-over-checkpoint", "create_data",
      lambda f: ["nuscenes", "--root-path", f.fake_root, "--version", "v1.0-mini"], 2,
      lambda f: ["nuscenes_infos_train.pkl", "--force"], lambda f: [f.root_info]),
    # ---- make_synthetic -------------------------------------------------------------------------------
    C("image-too-small", "make_synthetic", lambda f: ["--out", f.root / "syn_a", "--image-size", "8", "8"], 2,
      lambda f: ["--image-size"]),
    C("one-sample-per-scene", "make_synthetic", lambda f: ["--out", f.root / "syn_a", "--samples-per-scene", "1"], 2,
      lambda f: ["--samples-per-scene"]),
    C("scenes-negative", "make_synthetic", lambda f: ["--out", f.root / "syn_a", "--scenes", "-1"], 2,
      lambda f: ["--scenes"]),
    C("workers-zero", "make_synthetic", lambda f: ["--out", f.root / "syn_a", "--workers", "0"], 2,
      lambda f: ["--workers"]),
    C("seed-negative", "make_synthetic", lambda f: ["--out", f.root / "syn_a", "--seed", "-1"], 2,
      lambda f: ["--seed"]),
    C("out-is-file", "make_synthetic", lambda f: ["--out", f.text], 2, lambda f: ["--out", "notes.txt"],
      lambda f: [f.text]),
    C("out-is-foreign-folder", "make_synthetic", lambda f: ["--out", f.folder, "--overwrite"], 2,
      lambda f: ["--out", "a_folder"], lambda f: [f.folder]),
    C("out-is-foreign-folder-no-overwrite", "make_synthetic", lambda f: ["--out", f.folder], 2,
      lambda f: ["--out", "a_folder"], lambda f: [f.folder]),
    # ---- demo -------------------------------------------------------------------------------------------
    C("config-missing", "demo", lambda f: ["--config", f.root / "nope.yaml"], 2, lambda f: ["--config", "nope.yaml"]),
    C("work-dir-is-file", "demo", lambda f: ["--work-dir", f.text], 2, lambda f: ["--work-dir"], lambda f: [f.text]),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, files: Files, capsys):
    protected = case.protect(files)
    before = {p: digest(p) for p in protected}
    rc, err, _ = run_inproc(capsys, case.tool, case.argv(files))
    check_one_error(rc, err, case.code, [str(c) for c in case.culprits(files)])
    assert {p: digest(p) for p in protected} == before, "a protected file changed"
    assert not files.marker.exists(), "injected code ran"
    assert not (files.root / "work_never_made").exists()


def test_the_table_is_large():
    assert len(CASES) >= 100
    assert {c.values[0].tool for c in CASES} == {"print_config", "train", "convert_checkpoint", "test", "visualize",
                                                 "create_data", "make_synthetic", "demo"}


# ---------------------------------------------------------------------------------------------------
# Cases that need the synthetic drive (session fixture `converted`)


def _data_overrides(root: Path, written: dict, ann: Path | None = None) -> list[str]:
    return ["--set", f"dataset_root={root}/", f"data.test.ann_file={ann or written['val']}", "data.workers_per_gpu=0"]


def test_eval_set_of_another_version_fails_before_inference(converted, files, capsys, monkeypatch):
    root, _, written, _, _ = converted
    import bevfusion.evaluation.runner as runner

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran")

    monkeypatch.setattr(runner, "run_inference", no_inference)
    rc, err, out = run_inproc(capsys, "test", [CONFIG, files.ckpt, "--eval", "bbox", "--eval-set", "val",
                                          *_data_overrides(root, written)])
    check_one_error(rc, err, 2, ["--eval-set val", "v1.0-trainval", "v1.0-mini"])


def test_unknown_camera_is_named(converted, files, capsys):
    root, _, written, _, _ = converted
    rc, err, out = run_inproc(capsys, "test", [CONFIG, files.ckpt, "--eval", "map",
                                               "--drop-cameras", "CAM_FRONT,CAM_NOSE", *_data_overrides(root, written)])
    check_one_error(rc, err, 1, ["CAM_NOSE"])


@pytest.fixture(scope="module")
def fusion_ckpt(tmp_path_factory):
    from bevfusion.config import load_config
    from bevfusion.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fusion_ckpt") / "fusion.pth"
    torch.save({"state_dict": build_model(load_config(CONFIG).model).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def infos_with_missing_camera(converted, tmp_path_factory):
    """The val infos with sample 0's CAM_BACK image pointing at a file that does not exist."""
    from bevfusion.utils.io import dump_pickle, load_pickle

    _, _, written, _, _ = converted
    data = load_pickle(written["val"])
    info = sorted(data["infos"], key=lambda i: i["timestamp"])[0]
    info["cams"]["CAM_BACK"]["data_path"] = str(tmp_path_factory.mktemp("gone") / "CAM_BACK_gone.jpg")
    path = tmp_path_factory.mktemp("infos_missing") / "val_missing.pkl"
    dump_pickle(data, path)
    return path, info["token"], len(data["infos"])


def test_convert_refuses_an_existing_output_without_force(fusion_ckpt, files, tmp_path, capsys):
    """A good input, an existing output of another kind: refused (exit 2, unchanged); --force replaces it."""
    out = tmp_path / "converted.pth"
    out.write_text("not yours")
    rc, err, _ = run_inproc(capsys, "convert_checkpoint", [CONFIG, fusion_ckpt, out])
    check_one_error(rc, err, 2, ["converted.pth", "--force"])
    assert out.read_text() == "not yours"
    rc, err, _ = run_inproc(capsys, "convert_checkpoint", [CONFIG, fusion_ckpt, out, "--force"])
    assert rc == 0, err[-2000:]
    assert torch.load(out, weights_only=True)["meta"]["converted_from"] == str(fusion_ckpt)


def test_missing_file_is_an_error_naming_file_and_sample(converted, fusion_ckpt, infos_with_missing_camera, capsys):
    root, _, written, _, _ = converted
    ann, token, _ = infos_with_missing_camera
    rc, err, out = run_inproc(capsys, "test", [CONFIG, fusion_ckpt, "--eval", "map",
                                          *_data_overrides(root, written, ann)])
    check_one_error(rc, err, 1, ["CAM_BACK_gone.jpg", token[:8]])


def test_dropout_flags_and_missing_files_are_reported(converted, fusion_ckpt, infos_with_missing_camera, tmp_path,
                                                      capsys):
    """--missing-sensors drop runs on; --drop-cameras / --drop-lidar / --max-sweeps leave sensors out; the
    printed summary and --metrics-out's "dropout" section count them (expected counts from the infos)."""
    from bevfusion.utils.io import load_pickle

    root, _, written, _, _ = converted
    ann, token, n = infos_with_missing_camera
    metrics = tmp_path / "metrics.json"
    rc, err, out = run_inproc(capsys, "test", [CONFIG, fusion_ckpt, "--eval", "map", "--metrics-out", metrics,
                                          "--missing-sensors", "drop", "--drop-cameras", "CAM_FRONT,CAM_FRONT_LEFT",
                                          "--max-sweeps", "1", *_data_overrides(root, written, ann)])
    assert rc == 0, err[-3000:]
    report = json.loads(metrics.read_text())["dropout"]
    assert report["samples"] == n
    # the two cameras on purpose in every sample, CAM_BACK in the one sample whose file is missing
    assert report["cameras_dropped"] == {"CAM_FRONT": n, "CAM_FRONT_LEFT": n, "CAM_BACK": 1}
    assert report["missing_files"] == {"camera": 1, "lidar": 0, "sweep": 0}
    assert report["counts"]["dropped_cameras"] == 2 * n
    assert report["samples_without_lidar"] == 0
    assert report["requested"]["missing_sensors"] == "drop" and report["requested"]["max_sweeps"] == 1
    # sweeps beyond the first: the sweeps the pipeline would load (its sweeps_num) minus one per sample
    from bevfusion.config import load_config

    pipeline = load_config(CONFIG).data.test.pipeline
    sweeps_num = next(t["sweeps_num"] for t in pipeline if t["type"] == "LoadPointsFromMultiSweeps")
    infos = load_pickle(ann)["infos"]
    expected = sum(max(min(len(i["sweeps"]), sweeps_num) - 1, 0) for i in infos)
    assert report["sweeps_dropped"] == expected
    assert "map/mean/iou@max" in json.loads(metrics.read_text())
    summary = [ln for ln in out.splitlines() if ln.startswith("dropout:")]
    assert len(summary) == 1 and f"CAM_FRONT {n}" in summary[0] and "1 camera" in summary[0], out


def test_no_dropout_section_without_dropout(converted, fusion_ckpt, tmp_path, capsys):
    root, _, written, _, _ = converted
    metrics = tmp_path / "metrics.json"
    rc, err, out = run_inproc(capsys, "test", [CONFIG, fusion_ckpt, "--eval", "map", "--metrics-out", metrics,
                                          *_data_overrides(root, written)])
    assert rc == 0, err[-3000:]
    data = json.loads(metrics.read_text())
    assert "dropout" not in data and all(isinstance(v, float) for v in data.values())


# ---------------------------------------------------------------------------------------------------
# The writer helper itself


def test_check_writable_output_accepts_its_own_kind(files, tmp_path):
    from bevfusion.utils.io import (OutputRefusedError, check_writable_output, is_info_pickle, is_metrics_json,
                                    is_results_pickle)

    assert check_writable_output(files.results, option="--out", kind="results pickle", accept=is_results_pickle)
    assert check_writable_output(files.metrics, option="--m", kind="metrics", accept=is_metrics_json)
    assert check_writable_output(tmp_path / "new" / "r.pkl", option="--out", kind="results pickle")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(pickle.dumps([], protocol=2))
    assert is_results_pickle(empty)
    info = tmp_path / "info.pkl"
    info.write_bytes(pickle.dumps({"infos": [], "metadata": {"version": "v1.0-mini"}}, protocol=4))
    assert is_info_pickle(info) and not is_results_pickle(info)
    for other in (files.ckpt, files.text, files.garbage, files.evil_pkl, files.metrics):
        assert not is_results_pickle(other), other
        with pytest.raises(OutputRefusedError, match="--force"):
            check_writable_output(other, option="--out", kind="results pickle", accept=is_results_pickle)
    assert check_writable_output(files.text, option="--out", kind="results pickle", force=True)
    with pytest.raises(OutputRefusedError, match="is the input"):
        check_writable_output(files.hardlink, option="--out", kind="x", inputs=[files.ckpt], force=True)
    assert not files.marker.exists()


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    from bevfusion.utils.io import atomic_writer

    target = tmp_path / "ckpt.pth"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")  # ENOSPC from inside the write

    with pytest.raises(OSError, match="no space left.*previous file is unchanged") as info:
        atomic_writer(target, broken)
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_describe_error_formats(tmp_path):
    import errno

    from bevfusion.utils.cli import describe_error

    code, text = describe_error(OSError(errno.EROFS, "Read-only file system", "/data/x.pth"))
    assert (code, text) == (1, "/data/x.pth: Read-only file system")
    code, text = describe_error(KeyError("data.test: missing key 'pipeline'"))
    assert text == "data.test: missing key 'pipeline'"  # not quoted as KeyError would
    code, text = describe_error(ZeroDivisionError("division by zero"))
    assert code == 1 and "ZeroDivisionError" in text and "--debug" in text
    worker = ("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in f\nbevfusion.datasets.errors.DataError: infos.pkl: sample ab12: bad box\n')
    code, text = describe_error(ValueError(worker))
    assert text == "infos.pkl: sample ab12: bad box (in DataLoader worker process 1)"
    assert "\n" not in describe_error(ValueError("a:\n  b -> c\n  d -> e"))[1]


def test_keyboard_interrupt_is_one_line_and_130(capsys):
    from bevfusion.utils.cli import tool_main

    @tool_main
    def fake(argv):
        raise KeyboardInterrupt

    assert fake([]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "error: interrupted"


# ---------------------------------------------------------------------------------------------------
# make_synthetic cleans what a killed run of its own left, and nothing else


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_make_synthetic_removes_only_its_own_stale_partials(tmp_path, capsys):
    out = tmp_path / "drive"
    dead, foreign = _dead_pid(), _dead_pid()
    ours = tmp_path / f".drive.partial-{dead}"
    (ours / "samples").mkdir(parents=True)
    (ours / "samples" / "big.bin").write_bytes(b"\0" * 1000)
    (tmp_path / f".drive.partial-{dead}.owner").write_text(
        json.dumps({"tool": "make_synthetic", "host": socket.gethostname(), "pid": dead}))
    theirs = tmp_path / f".drive.partial-{foreign}"  # no owner file: not provably ours
    theirs.mkdir()
    (theirs / "keep.txt").write_text("keep")
    live = tmp_path / f".drive.partial-{os.getpid()}x"  # not our name pattern
    live.mkdir()
    args = ["--out", out, "--scenes", "1", "--samples-per-scene", "2", "--image-size", "64", "36",
            "--lidar-azimuth-steps", "64", "--workers", "1", "--no-progress"]
    assert tool("make_synthetic").main([str(a) for a in args]) == 0
    assert not ours.exists() and not (tmp_path / f".drive.partial-{dead}.owner").exists()
    assert (theirs / "keep.txt").read_text() == "keep" and live.exists()
    assert (out / "synthetic.json").is_file()
    assert not list(tmp_path.glob(".drive.partial-*.owner"))  # this run's owner file is gone too


# ---------------------------------------------------------------------------------------------------
# The real processes: exit status, stderr, --debug and BEVFUSION_DEBUG, a full disk


def _run(args: list, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "BEVFUSION_DEBUG"}
    full_env.update(BEVFUSION_NO_PROGRESS="1", **env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_processes_exit_with_one_line(files):
    proc = _run([TOOLS / "print_config.py", files.root / "nope.yaml"])
    check_one_error(proc.returncode, proc.stderr, 2, ["nope.yaml"])
    before = digest(files.ckpt)
    proc = _run([TOOLS / "convert_checkpoint.py", CONFIG, files.ckpt, files.ckpt, "--force"])
    check_one_error(proc.returncode, proc.stderr, 2, ["model.pth"])
    assert digest(files.ckpt) == before
    proc = _run([TOOLS / "train.py", CONFIG, "--work-dir", files.root / "w_sub", "optimizer.lr=abc"])
    check_one_error(proc.returncode, proc.stderr, 1, ["optimizer.lr"])
    assert not (files.root / "w_sub").exists()


def test_debug_shows_the_traceback(files):
    train = [TOOLS / "train.py", CONFIG, "--work-dir", files.root / "w_dbg", "max_epochs=-1"]
    for args, env in ((train + ["--debug"], {}), (train, {"BEVFUSION_DEBUG": "1"})):
        proc = _run(args, **env)
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "error: runner.max_epochs: must be >= 1, got -1"


def test_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path):
    """The operating system refuses the 2nd checkpoint write (file size limit, as a full disk would):
    one error line naming it, exit 1, epoch_1.pth and latest.pth intact, no temp file left."""
    sys.path.insert(0, str(REPO / "tests" / "engine"))
    try:
        import engine_toy as toy
    finally:
        sys.path.pop(0)
    cfg = toy.write_config(tmp_path / "toy.yaml", max_epochs=3)
    work = tmp_path / "work"
    proc = _run([REPO / "tests" / "engine" / "engine_toy.py", cfg, "--work-dir", work], TOY_FULL_AT_SAVE="2",
                TOY_NO_EVAL="1", OMP_NUM_THREADS="1")
    line = check_one_error(proc.returncode, proc.stderr, 1, ["epoch_2.pth", "latest.pth", "--resume"])
    assert "file too large" in line
    assert sorted(p.name for p in work.iterdir() if p.suffix in (".pth", ".tmp")) == ["epoch_1.pth", "latest.pth"]
    assert not list(work.glob(".*"))  # no temp file
    ckpt = torch.load(work / "latest.pth", weights_only=True)
    assert ckpt["meta"]["epoch"] == 1
    assert (work / "latest.pth").read_bytes() == (work / "epoch_1.pth").read_bytes()

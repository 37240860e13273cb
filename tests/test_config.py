"""The config loader against a fixture tree shaped like the official configs/ directory."""
from __future__ import annotations

import math
import os
import types
from pathlib import Path

import numpy as np

import pytest
import yaml

from bevfusion.config import (
    Config,
    ConfigError,
    config_chain,
    dump_config,
    evaluate_expression,
    load_config,
)

ROOT = Path(__file__).parent / "fixtures" / "configs"
LIDAR = ROOT / "nuscenes/det/transfusion/lidar/voxelnet_0p075.yaml"
FUSION = ROOT / "nuscenes/det/transfusion/camera+lidar/convfuser.yaml"
COSINE = ROOT / "nuscenes/det/transfusion/camera+lidar/cosine.yml"
SEG = ROOT / "nuscenes/seg/fusion.yaml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestInheritance:
    def test_chain_is_root_first_leaf_last(self):
        chain = [p.relative_to(ROOT).as_posix() for p in config_chain(LIDAR)]
        assert chain == [
            "default.yaml",
            "nuscenes/default.yaml",
            "nuscenes/det/default.yaml",
            "nuscenes/det/transfusion/default.yaml",
            "nuscenes/det/transfusion/lidar/voxelnet_0p075.yaml",
        ]

    def test_default_yml_is_read(self):
        chain = [p.name for p in config_chain(SEG)]
        assert chain == ["default.yaml", "default.yaml", "default.yml", "fusion.yaml"]
        cfg = load_config(SEG)
        assert cfg.model.heads.map.type == "BEVSegmentationHead"
        assert cfg.model.heads.object is None

    def test_deeper_file_wins_and_mappings_merge(self):
        cfg = load_config(LIDAR)
        lidar = cfg.model.encoders.lidar
        assert lidar.backbone.sparse_shape == [1440, 1440, 41]  # leaf replaced the list whole
        assert lidar.backbone.type == "SparseEncoder"  # sibling key kept from the parent
        assert lidar.voxelize.max_voxels == [120000, 160000]
        assert lidar.voxelize.max_num_points == 10
        assert cfg.optimizer == {"type": "AdamW", "lr": 1.0e-4, "weight_decay": 0.01}

    def test_null_removes_a_submodule(self):
        cfg = load_config(LIDAR)
        assert cfg.model.encoders.camera is None
        assert cfg.model.fuser is None

    def test_mapping_replaces_null_in_parent(self):
        cfg = load_config(FUSION)
        assert cfg.model.fuser == {"type": "ConvFuser", "in_channels": [80, 256], "out_channels": 256}
        assert cfg.lr_config is None  # camera+lidar/default.yaml nulls the parent's cyclic schedule

    def test_null_then_mapping_gives_a_fresh_mapping(self):
        cfg = load_config(COSINE)
        # No key of the grandparent's cyclic lr_config survives the null in between.
        assert cfg.lr_config == {"policy": "CosineAnnealing", "warmup_iters": 500}

    def test_root_must_contain_the_file(self, tmp_path):
        leaf = _write(tmp_path / "a" / "b.yaml", "x: 1\n")
        with pytest.raises(ConfigError, match="not inside the root"):
            config_chain(leaf, root=tmp_path / "elsewhere")

    def test_relative_path_walks_up_as_written(self, tmp_path, monkeypatch):
        _write(tmp_path / "cfgs" / "default.yaml", "a: 1\nb: ${a + 1}\n")
        _write(tmp_path / "cfgs" / "sub" / "default.yaml", "a: 10\n")
        _write(tmp_path / "cfgs" / "sub" / "leaf.yaml", "c: ${b * 2}\n")
        monkeypatch.chdir(tmp_path)
        assert load_config("cfgs/sub/leaf.yaml") == {"a": 10, "b": 11, "c": 22}

    @pytest.mark.parametrize("kind,message", [
        ("loop", "symbolic link loop"), ("broken", "broken symbolic link"), ("directory", "directory"),
        ("fifo", "not a regular file"), ("latin1", "not UTF-8"),
    ])
    def test_a_bad_default_is_an_error_not_skipped(self, tmp_path, kind, message):
        _write(tmp_path / "configs" / "default.yaml", "a: 1\n")
        leaf = _write(tmp_path / "configs" / "sub" / "leaf.yaml", "b: 2\n")
        bad = tmp_path / "configs" / "sub" / "default.yaml"
        if kind == "loop":
            os.symlink("default.yaml", bad)  # points at itself
        elif kind == "broken":
            os.symlink("missing.yaml", bad)
        elif kind == "directory":
            bad.mkdir()
        elif kind == "fifo":
            os.mkfifo(bad)  # reading it would block: it must be refused without opening it
        else:
            bad.write_bytes("a: caf\xe9\n".encode("latin-1"))
        for call in (config_chain, load_config) if kind != "latin1" else (load_config,):  # chain: no read
            with pytest.raises(ConfigError, match=message) as info:
                call(leaf)
            assert info.value.file == str(bad)

    def test_a_bad_default_yaml_does_not_fall_back_to_default_yml(self, tmp_path):
        leaf = _write(tmp_path / "configs" / "leaf.yaml", "b: 2\n")
        _write(tmp_path / "configs" / "default.yml", "a: 1\n")
        os.symlink("default.yaml", tmp_path / "configs" / "default.yaml")
        with pytest.raises(ConfigError, match="symbolic link loop"):
            load_config(leaf)

    def test_a_symlinked_default_is_followed(self, tmp_path):
        _write(tmp_path / "shared" / "base.yaml", "a: 1\n")
        leaf = _write(tmp_path / "configs" / "leaf.yaml", "b: ${a + 1}\n")
        os.symlink(tmp_path / "shared" / "base.yaml", tmp_path / "configs" / "default.yaml")
        assert load_config(leaf) == {"a": 1, "b": 2}

    def test_a_leaf_that_is_a_link_loop_says_so(self, tmp_path):
        leaf = tmp_path / "configs" / "leaf.yaml"
        leaf.parent.mkdir()
        os.symlink("leaf.yaml", leaf)
        with pytest.raises(ConfigError, match="symbolic link loop") as info:
            load_config(leaf)
        assert info.value.file == str(leaf)


class TestInterpolation:
    def test_late_binding_reaches_parents(self):
        cfg = load_config(LIDAR)
        assert cfg.model.encoders.lidar.voxelize.voxel_size == [0.075, 0.075, 0.2]
        assert cfg.model.heads.object.train_cfg.point_cloud_range == [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
        assert cfg.model.heads.object.bbox_coder.voxel_size == [0.075, 0.075]  # ${voxel_size[:2]}
        assert cfg.model.heads.object.bbox_coder.pc_range == [-54.0, -54.0]

    def test_expression_forms(self):
        cfg = load_config(FUSION)
        assert cfg.runner.max_epochs == 6  # leaf max_epochs reaches the root file
        vt = cfg.model.encoders.camera.vtransform
        assert vt.feature_size == [32, 88]  # ${[image_size[0] // 8, image_size[1] // 8]}
        assert vt.image_size == [256, 704]
        train = cfg.data.train.dataset
        assert train.ann_file == "data/nuscenes/nuscenes_infos_train.pkl"
        assert train.type == "NuScenesDataset"
        assert train.object_classes[-1] == "traffic_cone"
        assert cfg.data.val.ann_file == "data/nuscenes/nuscenes_infos_val.pkl"

    def test_whole_list_with_nested_expressions(self):
        cfg = load_config(LIDAR)
        pipeline = cfg.data.train.dataset.pipeline
        assert [step.type for step in pipeline] == [
            "LoadPointsFromFile", "ImageAug3D", "ObjectPaste", "PointsRangeFilter", "ObjectNameFilter"]
        assert pipeline[0].load_dim == 5
        assert pipeline[1].resize_lim == [0.38, 0.55]  # ${augment2d.resize[0]}
        assert pipeline[2].stop_epoch == 15  # the leaf's gt_paste_stop_epoch
        assert pipeline[3].point_cloud_range[0] == -54.0
        assert cfg.evaluation.pipeline[0].resize_lim == [0.48, 0.48]
        # Resolved values are independent copies, not shared references.
        assert cfg.data.train.dataset.pipeline is not cfg.train_pipeline

    def test_result_that_is_an_expression_is_evaluated_again(self, tmp_path):
        leaf = _write(tmp_path / "configs" / "x.yaml",
                      'a: 3\nb: "${a}"\nc: ${b}\nd: ${"${a}"}\ne: ${[b, "${a}"]}\n')
        cfg = load_config(leaf)
        assert (cfg.b, cfg.c, cfg.d, cfg.e) == (3, 3, 3, [3, 3])

    def test_partial_strings_are_not_interpolated(self, tmp_path):
        leaf = _write(tmp_path / "configs" / "x.yaml", 'a: 1\nb: "x ${a}"\nc: "${a} y"\n')
        cfg = load_config(leaf)
        assert cfg.b == "x ${a}" and cfg.c == "${a} y"

    @pytest.mark.parametrize("expr", [
        "voxel_size[:2]",
        "voxel_size[::-1]",
        "point_cloud_range[3] - point_cloud_range[0]",
        "[image_size[0] // 8, image_size[1] // 8]",
        "root + 'infos.pkl'",
        "classes + ['extra']",
        "-(voxel_size[0] * 2) ** 2 / 3 % 5",
        "aug.resize[1][0]",
        "aug['resize'][0]",
        "(1, 2)[1]",
        "image_size[0] if image_size[1] > 100 else 0",
        "not flag",
        "1 < image_size[0] <= 256",
    ])
    def test_agrees_with_python_on_allowed_forms(self, expr):
        tree = {
            "voxel_size": [0.075, 0.075, 0.2],
            "point_cloud_range": [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
            "image_size": [256, 704],
            "root": "data/nuscenes/",
            "classes": ["car", "truck"],
            "aug": {"resize": [[0.38, 0.55], [0.48, 0.48]]},
            "flag": False,
        }
        # Python itself is the oracle here, on trusted test expressions only.
        namespace = {k: types.SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in tree.items()}
        expected = eval(expr.replace("aug['resize']", "aug.resize"), {"__builtins__": {}}, namespace)  # noqa: S307
        got = evaluate_expression(expr, tree)
        expected = list(expected) if isinstance(expected, tuple) else expected
        if isinstance(expected, float):
            assert math.isclose(got, expected)
        else:
            assert got == expected


class TestOverrides:
    def test_typed_by_yaml(self):
        cfg = load_config(LIDAR, [
            "max_epochs=3", "optimizer.lr=5e-4", "model.heads.object.train_cfg.grid_size=[8, 8, 1]",
            "deterministic=true", "model.heads.map=null", "dataset_root=/data/ns/", "seed='7'",
        ])
        assert cfg.max_epochs == 3 and cfg.runner.max_epochs == 3
        assert cfg.optimizer.lr == pytest.approx(5e-4) and isinstance(cfg.optimizer.lr, float)
        assert cfg.model.heads.object.train_cfg.grid_size == [8, 8, 1]
        assert cfg.deterministic is True
        assert cfg.seed == "7"
        assert cfg.data.train.dataset.ann_file == "/data/ns/nuscenes_infos_train.pkl"

    def test_override_propagates_through_interpolation(self):
        cfg = load_config(LIDAR, ["voxel_size=[0.2, 0.2, 8.0]"])
        assert cfg.model.encoders.lidar.voxelize.voxel_size == [0.2, 0.2, 8.0]
        assert cfg.model.heads.object.bbox_coder.voxel_size == [0.2, 0.2]

    def test_list_index_and_mapping_into_null(self):
        cfg = load_config(LIDAR, ["train_pipeline.0.load_dim=4", "+model.fuser.type=ConvFuser"])
        assert cfg.data.train.dataset.pipeline[0].load_dim == 4
        assert cfg.model.fuser == {"type": "ConvFuser"}

    def test_unknown_key_is_an_error_with_a_hint(self):
        with pytest.raises(ConfigError) as info:
            load_config(LIDAR, ["optimizer.lrr=1"])
        assert info.value.key == "optimizer.lrr" and "did you mean: lr" in str(info.value)
        with pytest.raises(ConfigError, match="model.encoders.lidr"):
            load_config(LIDAR, ["model.encoders.lidr.x=1"])

    def test_new_keys_when_allowed(self):
        cfg = load_config(LIDAR, ["new_key.sub=1", "+other=[1]"], allow_new_keys=True)
        assert cfg.new_key.sub == 1 and cfg.other == [1]

    @pytest.mark.parametrize("bad", ["noequals", "a..b=1", "=1", "train_pipeline.9.load_dim=1",
                                     "max_epochs.sub=1", "optimizer.lr=[1"])
    def test_malformed_overrides(self, bad):
        with pytest.raises(ConfigError):
            load_config(LIDAR, [bad])

    @pytest.mark.parametrize("item,key", [
        ("optimizer.lr=[1", "optimizer.lr"), ("optimizer.lr={a: 1", "optimizer.lr"),
        ("max_epochs=a: b: c", "max_epochs"), ("+new.key=!!python/name:os.system", "new.key"),
        ("seed=" + "[" * 100 + "]" * 100, "seed"),
    ])
    def test_parse_errors_name_the_key(self, item, key):
        with pytest.raises(ConfigError) as info:
            load_config(LIDAR, [item])
        assert info.value.key == key and info.value.file == "<command line>"
        assert "cannot parse override value" in str(info.value) and "\n" not in str(info.value)


class TestMappingOverrides:
    STRINGS = ["max_epochs=3", "optimizer.lr=5e-4", "model.heads.object.train_cfg.grid_size=[8, 8, 1]",
               "deterministic=true", "model.heads.map=null", "dataset_root=/data/ns/", "seed='7'",
               "train_pipeline.0.load_dim=4", "optimizer={type: SGD, lr: 0.1}"]
    MAPPING = {"max_epochs": 3, "optimizer.lr": 5e-4, "model.heads.object.train_cfg.grid_size": (8, 8, 1),
               "deterministic": True, "model.heads.map": None, "dataset_root": "/data/ns/", "seed": "7",
               "train_pipeline.0.load_dim": 4, "optimizer": {"type": "SGD", "lr": 0.1}}

    def test_same_result_as_the_string_form(self):
        # The string form (typed by YAML) is the reference for the mapping form (typed already).
        # The later `optimizer` replaces the earlier `optimizer.lr` whole in both.
        assert list(self.MAPPING) == [item.split("=", 1)[0] for item in self.STRINGS]
        by_mapping = load_config(LIDAR, self.MAPPING)
        assert by_mapping == load_config(LIDAR, self.STRINGS)
        assert by_mapping.optimizer == {"type": "SGD", "lr": 0.1}  # replaced, not merged
        assert by_mapping.data.train.dataset.pipeline[0].load_dim == 4
        assert by_mapping.data.train.dataset.ann_file == "/data/ns/nuscenes_infos_train.pkl"

    def test_values_are_not_parsed_again(self):
        cfg = load_config(LIDAR, {"dataset_root": "[1, 2]", "seed": "null", "optimizer.type": "1e-3"})
        assert cfg.dataset_root == "[1, 2]" and cfg.seed == "null" and cfg.optimizer.type == "1e-3"

    def test_expressions_numpy_scalars_and_configs(self):
        cfg = load_config(LIDAR, {"max_epochs": "${gt_paste_stop_epoch + 1}", "optimizer.lr": np.float32(0.5),
                                  "optimizer.weight_decay": np.int64(2),
                                  "+model.fuser": Config(type="ConvFuser", in_channels=(80, 256))})
        assert cfg.max_epochs == 16 and cfg.runner.max_epochs == 16
        assert cfg.optimizer.lr == 0.5 and type(cfg.optimizer.lr) is float
        assert cfg.optimizer.weight_decay == 2 and type(cfg.optimizer.weight_decay) is int
        assert cfg.model.fuser == {"type": "ConvFuser", "in_channels": [80, 256]}

    def test_new_keys(self):
        with pytest.raises(ConfigError) as info:
            load_config(LIDAR, {"new_key.sub": 1})
        assert info.value.key == "new_key" and info.value.file == "<overrides>"
        assert load_config(LIDAR, {"+new_key.sub": 1}).new_key.sub == 1
        assert load_config(LIDAR, {"new_key.sub": [1]}, allow_new_keys=True).new_key.sub == [1]

    def test_the_source_mapping_is_not_shared(self):
        value = {"type": "ConvFuser", "in_channels": [80, 256]}
        cfg = load_config(LIDAR, {"+model.fuser": value})
        cfg.model.fuser.in_channels.append(1)
        assert value == {"type": "ConvFuser", "in_channels": [80, 256]}

    @pytest.mark.parametrize("overrides,key,message", [
        ({"optimizer.lrr": 1}, "optimizer.lrr", "did you mean: lr"),
        ({"optimizer.lr": object()}, "optimizer.lr", "type object"),
        ({"optimizer.lr": {1, 2}}, "optimizer.lr", "type set"),
        ({"optimizer.lr": [1, b"x"]}, "optimizer.lr.1", "type bytes"),
        ({"optimizer.lr": {("a",): 1}}, "optimizer.lr", "mapping key"),
        ({"optimizer..lr": 1}, "optimizer..lr", "malformed key"),
        ({"max_epochs.sub": 1}, "max_epochs.sub", "cannot set a key under a int"),
        ({"train_pipeline.9.load_dim": 1}, "train_pipeline.9", "out of range"),
        ({"optimizer.lr": [0] * 30_000}, "optimizer.lr", "MAX_YAML_NODES"),
        ({"+" + ".".join(["a"] * 60): 1}, None, "MAX_DEPTH"),
    ])
    def test_errors_name_the_key(self, overrides, key, message):
        with pytest.raises(ConfigError, match=message) as info:
            load_config(LIDAR, overrides)
        assert info.value.file == "<overrides>"
        if key is not None:
            assert info.value.key == key

    def test_a_value_that_contains_itself_is_refused(self):
        loop: list = []
        loop.append(loop)
        with pytest.raises(ConfigError, match="MAX_DEPTH") as info:
            load_config(LIDAR, {"optimizer.lr": loop})
        assert info.value.key.startswith("optimizer.lr")

    @pytest.mark.parametrize("bad,message", [
        ("optimizer.lr=1", "single string"), ({1: 2}, "not a string"),
        ([("optimizer.lr", 1)], "not a 'key.sub=value'"),
    ])
    def test_malformed_containers(self, bad, message):
        with pytest.raises(ConfigError, match=message):
            load_config(LIDAR, bad)


class TestErrors:
    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "configs" / "nope.yaml")
        assert "nope.yaml" in str(info.value) and "not found" in str(info.value)

    def test_yaml_syntax_error_names_file_and_line(self, tmp_path):
        bad = _write(tmp_path / "configs" / "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
        with pytest.raises(ConfigError) as info:
            load_config(bad)
        assert info.value.file == str(bad) and "line 3" in str(info.value)

    def test_duplicate_key_is_rejected(self, tmp_path):
        bad = _write(tmp_path / "configs" / "dup.yaml", "a: 1\nb: 2\na: 3\n")
        with pytest.raises(ConfigError, match="duplicate key 'a'"):
            load_config(bad)

    def test_merge_keys(self, tmp_path):
        text = ("b0: &b0 {a: 0, z: 0}\nbase: &base\n  <<: *b0\n  a: 1\n  b: [1, 2]\n"
                "derived:\n  <<: *b0\n  b: 3\n  a: 2\nboth: {<<: [*base, {c: 4}], z: 5}\n")
        cfg = load_config(_write(tmp_path / "configs" / "x.yaml", text))
        assert cfg.base == {"a": 1, "z": 0, "b": [1, 2]}  # a key written next to `<<` wins
        assert cfg.derived == {"a": 2, "z": 0, "b": 3}
        assert cfg.both["c"] == 4 and cfg.both["z"] == 5
        assert cfg == yaml.safe_load(text)  # PyYAML's own merge semantics

    @pytest.mark.parametrize("text,message", [
        ("base: &b {a: 1}\nx:\n  <<: *b\n  c: 1\n  c: 2\n", "duplicate key 'c'"),
        ("base: &b {a: 1}\nx:\n  <<: *b\n  <<: *b\n", "duplicate key <<"),
        ("x: {[1]: 2}\n", "unhashable key"),
    ])
    def test_duplicates_next_to_merge_keys(self, tmp_path, text, message):
        leaf = _write(tmp_path / "configs" / "x.yaml", text)
        with pytest.raises(ConfigError, match=message):
            load_config(leaf)

    def test_unsafe_yaml_tags_are_refused(self, tmp_path):
        bad = _write(tmp_path / "configs" / "tag.yaml", "a: !!python/object/apply:os.system ['true']\n")
        with pytest.raises(ConfigError):
            load_config(bad)

    def test_cycle_names_keys_and_file(self, tmp_path):
        _write(tmp_path / "configs" / "default.yaml", "a: ${b.c}\n")
        leaf = _write(tmp_path / "configs" / "x" / "leaf.yaml", "b:\n  c: ${d}\nd: ${a}\n")
        with pytest.raises(ConfigError) as info:
            load_config(leaf)
        message = str(info.value)
        assert "cycle" in message and "b.c" in message and "d" in message
        assert info.value.file is not None and info.value.file.endswith(".yaml")

    def test_self_reference_is_a_cycle(self, tmp_path):
        leaf = _write(tmp_path / "configs" / "x.yaml", "a: ${a}\n")
        with pytest.raises(ConfigError, match="cycle"):
            load_config(leaf)

    @pytest.mark.parametrize("expr", [
        "len(a)",
        "__import__('os').system('true')",
        "a.__class__",
        "().__class__.__bases__",
        "a['__class__']",
        "s.upper",
        "(lambda: 1)()",
        "[x for x in a]",
        "{'k': 1}",
        "a if True else __builtins__",
        "10 ** 1000",
        "'x' * 10**9",
    ])
    def test_disallowed_expressions(self, tmp_path, expr):
        leaf = _write(tmp_path / "configs" / "x.yaml", f'a: [1, 2]\ns: str\nbad: "${{{expr}}}"\n')
        with pytest.raises(ConfigError) as info:
            load_config(leaf)
        assert info.value.key == "bad" and info.value.file == str(leaf)

    def test_unknown_name_in_expression(self, tmp_path):
        leaf = _write(tmp_path / "configs" / "x.yaml", "voxel_size: [1]\nv: ${voxel_sise}\n")
        with pytest.raises(ConfigError, match="voxel_size"):
            load_config(leaf)

    def test_error_points_at_the_file_that_set_the_key(self, tmp_path):
        parent = _write(tmp_path / "configs" / "default.yaml", "x: ${missing_name}\n")
        leaf = _write(tmp_path / "configs" / "a" / "leaf.yaml", "y: 1\n")
        with pytest.raises(ConfigError) as info:
            load_config(leaf)
        assert info.value.file == str(parent) and info.value.key == "x"


class TestConfigObject:
    def test_attribute_access_and_missing_keys(self):
        cfg = load_config(LIDAR)
        assert isinstance(cfg, Config) and isinstance(cfg.model, Config)
        assert isinstance(cfg.data.train.dataset.pipeline[0], Config)
        with pytest.raises(AttributeError, match="nope"):
            _ = cfg.nope
        assert getattr(cfg, "nope", 5) == 5
        cfg.new = {"a": 1}
        assert cfg.new.a == 1

    def test_dump_round_trip(self, tmp_path):
        cfg = load_config(FUSION)
        out = tmp_path / "run" / "configs.yaml"
        dump_config(cfg, out)
        assert yaml.safe_load(out.read_text()) == cfg
        assert not [p for p in out.parent.iterdir() if p.name != "configs.yaml"]  # no temp file left

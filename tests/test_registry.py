"""The type registry: lazy lookup, close-match errors, signature-checked building."""
from __future__ import annotations

import pytest

from bevfusion.registry import REGISTRY, Partial, Registry, RegistryError


class ConvFuser:
    def __init__(self, in_channels, out_channels, *, bias=False):
        self.in_channels, self.out_channels, self.bias = in_channels, out_channels, bias


class Flexible:
    def __init__(self, a, **rest):
        self.a, self.rest = a, rest


@pytest.fixture
def registry():
    return Registry("test", {
        "ConvFuser": ConvFuser,
        "Flexible": Flexible,
        "OrderedDict": "collections:OrderedDict",  # imported lazily
        "DepthLSSTransform": ConvFuser,
        "LSSTransform": ConvFuser,
    })


def test_build_passes_keys_as_keyword_arguments(registry):
    fuser = registry.build({"type": "ConvFuser", "in_channels": [80, 256], "out_channels": 256})
    assert isinstance(fuser, ConvFuser) and fuser.in_channels == [80, 256] and fuser.out_channels == 256


def test_lazy_string_targets_are_imported(registry):
    import collections

    assert registry.get("OrderedDict") is collections.OrderedDict


def test_unknown_type_lists_close_matches(registry):
    with pytest.raises(RegistryError) as info:
        registry.get("DepthLSSTransfrom", path="model.encoders.camera.vtransform")
    message = str(info.value)
    assert message.startswith("model.encoders.camera.vtransform: unknown test type 'DepthLSSTransfrom'")
    assert "DepthLSSTransform" in message


def test_case_mismatch_is_suggested(registry):
    with pytest.raises(RegistryError, match="did you mean ConvFuser"):
        registry.get("convfuser")


def test_unknown_key_names_path_and_expected_keys(registry):
    with pytest.raises(RegistryError) as info:
        registry.build({"type": "ConvFuser", "in_channel": [80], "out_channels": 256}, path="model.fuser")
    message = str(info.value)
    assert message.startswith("model.fuser: unknown key in_channel (did you mean in_channels?)")
    assert "expected in_channels, out_channels, bias" in message


def test_missing_required_key(registry):
    with pytest.raises(RegistryError, match=r"model.fuser: missing key out_channels for ConvFuser"):
        registry.build({"type": "ConvFuser", "in_channels": [80]}, path="model.fuser")


def test_missing_type_and_non_mapping(registry):
    with pytest.raises(RegistryError, match="missing 'type'"):
        registry.build({"in_channels": 1}, path="model.fuser")
    with pytest.raises(RegistryError, match="expected a mapping"):
        registry.build([1, 2], path="model.fuser")


def test_var_keyword_constructors_accept_extra_keys(registry):
    obj = registry.build({"type": "Flexible", "a": 1, "b": 2}, extra_arg=3)
    assert obj.a == 1 and obj.rest == {"b": 2, "extra_arg": 3}


def test_every_registered_name_resolves_to_a_class():
    for name in REGISTRY.names():
        assert callable(REGISTRY.get(name)), name


class Head:
    def __init__(self, loss, settings=None, layers=(), positive: int = 1):
        if positive <= 0:
            raise ValueError(f"positive must be > 0, got {positive}")
        self.loss, self.settings, self.layers = loss, settings, layers


class Loss:
    def __init__(self, weight: float = 1.0):
        self.weight = weight


class Block:
    def __init__(self, channels: int, depth: int = 1):
        self.channels, self.depth = channels, depth


class Container:
    """Builds its own sections (gets the raw mapping, its path and build()'s extra keyword arguments)."""

    def __init__(self, parts, flag):
        self.parts, self.flag = parts, flag

    @classmethod
    def from_config(cls, cfg, path, flag=False):
        return cls({k: REG.build(v, f"{path}.{k}") for k, v in cfg.items()}, flag)


REG = Registry("nested", {"Head": Head, "Loss": Loss, "Block": Block, "Container": Container}, partial=("Block",),
               nested=True)


def test_nested_sections_are_built_first_in_mappings_and_lists():
    head = REG.build({"type": "Head", "loss": {"type": "Loss", "weight": 0.5},
                      "settings": {"assigner": {"type": "Loss"}, "radius": 2},
                      "layers": [{"type": "Loss", "weight": 2.0}, 3]}, "model.heads.object")
    assert isinstance(head.loss, Loss) and head.loss.weight == 0.5
    assert isinstance(head.settings["assigner"], Loss) and head.settings["radius"] == 2
    assert isinstance(head.layers[0], Loss) and head.layers[0].weight == 2.0 and head.layers[1] == 3


def test_nested_errors_name_the_full_path():
    with pytest.raises(RegistryError, match=r"^model.heads.object.settings.assigner: unknown key wieght "
                                            r"\(did you mean weight\?\) for Loss"):
        REG.build({"type": "Head", "loss": {"type": "Loss"}, "settings": {"assigner": {"type": "Loss", "wieght": 1}}},
                  "model.heads.object")
    with pytest.raises(RegistryError, match=r"^model.heads.object.layers\[1\]: unknown nested type 'Los'"):
        REG.build({"type": "Head", "loss": {"type": "Loss"}, "layers": [{"type": "Loss"}, {"type": "Los"}]},
                  "model.heads.object")


def test_constructor_errors_become_registry_errors_with_the_path():
    with pytest.raises(RegistryError, match=r"^model.heads.object: positive must be > 0, got 0"):
        REG.build({"type": "Head", "loss": {"type": "Loss"}, "positive": 0}, "model.heads.object")


def test_partial_entries_are_completed_by_their_user():
    block = REG.build({"type": "Block", "depth": 3}, "model.block")
    assert isinstance(block, Partial)
    made = block(channels=8)
    assert isinstance(made, Block) and (made.channels, made.depth) == (8, 3)
    with pytest.raises(RegistryError, match=r"^model.block: unknown key width \(did you mean depth\?\) for Block"):
        block(width=8)


def test_from_config_classes_build_their_own_sections():
    c = REG.build({"type": "Container", "a": {"type": "Loss"}}, "model", flag=True)
    assert isinstance(c.parts["a"], Loss) and c.flag is True


def test_registered_adds_names_for_a_block_only():
    with REGISTRY.registered({"ToyThing": Loss}):
        assert isinstance(REGISTRY.build({"type": "ToyThing"}), Loss)
    assert "ToyThing" not in REGISTRY


def test_layer_specs_from_config_sections():
    from torch import nn

    norm = REGISTRY.build({"type": "BN", "eps": 1e-3, "momentum": 0.01}, "norm_cfg")
    layer = norm(16)
    assert isinstance(layer, nn.BatchNorm2d) and layer.eps == 1e-3 and layer.momentum == 0.01
    assert isinstance(norm(8, dims=1), nn.BatchNorm1d) and norm.abbr == "bn"
    frozen = REGISTRY.build({"type": "BN2d", "requires_grad": False})(4)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="BN2d is a 2-d norm"):
        REGISTRY.build({"type": "BN2d"})(4, dims=1)
    with pytest.raises(RegistryError, match=r"^norm_cfg: unknown key esp \(did you mean eps\?\) for BN"):
        REGISTRY.build({"type": "BN", "esp": 1e-3}, "norm_cfg")
    act = REGISTRY.build({"type": "ReLU", "inplace": True})
    assert isinstance(act(), nn.ReLU) and act().inplace and not act(inplace=False).inplace
    conv = REGISTRY.build({"type": "Conv2d", "bias": False})
    assert conv(3, 4, 3).bias is None and REGISTRY.build({"type": "Conv2d"})(3, 4, 3).bias is not None
    assert isinstance(REGISTRY.build({"type": "deconv"})(3, 4, 2, stride=2), nn.ConvTranspose2d)

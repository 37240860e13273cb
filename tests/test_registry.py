"""The type registry: lazy lookup, close-match errors, signature-checked building."""
from __future__ import annotations

import pytest

from bevfusion.registry import REGISTRY, Registry, RegistryError


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

"""Whole fused det + seg models give the outputs stored before a refactor (tests/fixtures/whole_model).

Two cases: the synthetic fusion model (ResNet + LSS, sparse encoder, ConvFuser, SECOND/FPN, TransFusion, map head)
and the same with DepthLSS and a CenterHead with rotated NMS. Weights are filled by key (`cases.fill_parameters`),
BatchNorm statistics come from the fixture; the state_dict keys and shapes, the eval predictions, the training
losses and the per-part gradient norms must all match what the code gave when the fixture was written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures" / "whole_model"))
import cases  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module", params=cases.CASES)
def case(request):
    blob = cases.load(request.param)
    model = cases.build(cases.case_config(request.param))
    return blob, model


def test_state_dict_keys_and_shapes(case):
    blob, model = case
    assert cases.shapes_of(model) == blob["shapes"]


def test_outputs_match_the_fixture(case):
    blob, model = case
    cases.fill_parameters(model)
    missing, unexpected = model.load_state_dict(blob["buffers"], strict=False)
    assert not unexpected
    assert set(blob["buffers"]).isdisjoint(missing)
    got = cases.run(model, blob["batch"])
    want = blob["expected"]

    assert len(got["preds"]) == len(want["preds"])
    for k, (g, w) in enumerate(zip(got["preds"], want["preds"])):
        assert set(g) == set(w), k
        assert torch.equal(g["labels_3d"], w["labels_3d"]), f"sample {k}: labels"
        for key in ("boxes_3d", "scores_3d", "masks_bev"):
            torch.testing.assert_close(g[key], w[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"sample {k} {key}: {m}")
    assert set(got["losses"]) == set(want["losses"])
    for key in want["losses"]:
        torch.testing.assert_close(got["losses"][key], want["losses"][key], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{key}: {m}")
    for key in want["grad_norms"]:
        torch.testing.assert_close(got["grad_norms"][key], want["grad_norms"][key], rtol=1e-3, atol=1e-6,
                                   msg=lambda m: f"grad norm of {key}: {m}")


def test_fixture_is_sensitive_to_a_weight():
    """Control: one changed weight moves the predictions beyond the tolerance."""
    blob = cases.load("transfusion")
    model = cases.build(cases.case_config("transfusion"))
    cases.fill_parameters(model)
    model.load_state_dict(blob["buffers"], strict=False)
    with torch.no_grad():
        model.get_parameter("decoder.neck.deblocks.0.0.weight").mul_(1.01)
    model.eval()
    with torch.no_grad():
        preds = model(blob["batch"])
    want = blob["expected"]["preds"][0]
    assert not torch.allclose(preds[0]["masks_bev"], want["masks_bev"], rtol=RTOL, atol=ATOL)

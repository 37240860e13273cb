"""The whole fused camera + LiDAR det + seg model on the device under test (CUDA; BEVFUSION_GPU_TEST_DEVICE=cpu
dry-runs it on the CPU) against the same model on the CPU in fp32: inference in fp32 and under fp16 autocast,
one training step in fp32 and one with fp16 autocast and a GradScaler through the engine's Trainer.

The model and batch are described in gpu_case.py. The CPU run records its discrete decisions (BEV-pool plan,
TransFusion proposals, Hungarian matches) and the device run replays them, so every head tensor is compared
element by element; the device's own decisions are checked to agree with the CPU's up to near-ties.

Tolerances, as max |device - CPU| / max |CPU| per tensor:
* fp32 (TF32 off): 2e-4. The same model in fp32 vs float64 on the CPU differs by at most 3.4e-6 in every
  captured tensor (measured), so summation-order noise between devices is ~1e-5; TF32 (10-bit mantissa) or a
  half-precision kernel anywhere gives >= 1e-3, an indexing bug O(1).
* fp16 autocast: 5e-2. fp16 autocast vs fp32 on the CPU differs by up to 9e-3 (measured: fp16 rounding of the
  activations through ~40 layers, the sparse encoder included; the LSS lift stays in fp32, by design).
* Decoded records (boxes, scores, labels) are mapped back to their queries and compared per query. A box may be
  kept on one device only where a near-tie of the coder's filters allows it; labels are equal in fp32, and under
  fp16 may differ only at a near-tie of the query's class scores or at a proposal suppressed on one device only
  (every class then scores 0); the counts are reported (`labels_flipped`, `boxes_one_side`).
* Losses (scalars, relative): 2e-4 in fp32, 2e-2 under AMP (measured on the CPU with fp16 autocast: 3e-4).
* Gradients (after unscaling and clipping), per parameter: |g - g_cpu| <= rel |g_cpu| + floor |G_cpu|, with G all
  gradients together. fp32: rel 2e-2, floor 1e-4: weight gradients of convolutions followed by train-mode
  BatchNorm are sums of ~1e5 terms that nearly cancel, so the summation order alone moves them by up to 2.2e-3
  (measured on the CPU: the sparse encoder with the gather vs the im2col dataflow). AMP: rel 0.5, floor 1e-3:
  after the overflow skips the loss scale is down to ~1e3, so the camera branch's small gradients partly
  underflow in fp16 (measured with fp16 autocast on the CPU: up to 0.29 |g_cpu| for its BatchNorm parameters,
  0.19 for its first convolution, 3.4e-4 |G_cpu| at most); a wrong gradient (a swapped index, a lost term) is off
  by about |g_cpu| or more. All together: |G - G_cpu| <= 5e-3 |G_cpu| in fp32 (measured 4.7e-4 from the
  summation order), 0.15 |G_cpu| under AMP (measured 0.042-0.057).
"""
from __future__ import annotations

import contextlib
import logging
import math
from types import SimpleNamespace

import pytest
import torch

import gpu_case as gc
from bevfusion.evaluation.runner import move_batch

pytestmark = pytest.mark.gpu

FP32_REL = 2e-4
FP16_REL = 5e-2
LOSS_REL = {"fp32": 2e-4, "amp": 2e-2}
GRAD_REL = {"fp32": 2e-2, "amp": 0.5}  # of each parameter's gradient norm
GRAD_FLOOR = {"fp32": 1e-4, "amp": 1e-3}  # of the global gradient norm
GRAD_GLOBAL = {"fp32": 5e-3, "amp": 0.15}
# frustum points allowed in a neighbouring cell on the device: fp32 rounding (~1e-5 m) moves ~2e-5 of them
# across a 1.6 m cell boundary; the fp16-geometry bug moved 1 %
PLAN_FRACTION = 5e-4
# heatmap probability differences that may flip a proposal: the logit tolerance above x the largest logit (~3)
# x the sigmoid's largest slope (1/4), rounded up
TIE = {"fp32": 2e-4, "amp": 2e-2}
NMS_KERNEL = 3  # TransFusion proposal window of the config


@pytest.fixture(scope="module")
def case(device):
    """The CPU model (eval mode, calibrated BN), the batch and the CPU fp32 inference with its decisions."""
    cfg = gc.load_case_config()
    batch = gc.make_batch(cfg)
    model = gc.build_case_model(cfg, batch)
    replay = gc.Replay()
    with torch.no_grad(), gc.capture(model) as captured, replay.active("record"):
        outputs = model(batch)
    assert len(replay.recorded["plan"]) == 1 and len(replay.recorded["queries"]) == 1
    return SimpleNamespace(cfg=cfg, batch=batch, model=model, replay=replay, captured=captured, outputs=outputs)


def _device_model(case, device):
    model = gc.move_model(case.model, device)
    gc.set_sparse_impl(model, **gc.sparse_impl_for(device))
    return model


def _autocast(device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16) if amp else contextlib.nullcontext()


def _query_positions(cells: torch.Tensor, grid_y: int) -> torch.Tensor:
    """(B, P) flattened x-major cells → (B, 2, P) query positions (x + 0.5, y + 0.5), as the head builds them."""
    return torch.stack([cells // grid_y, cells % grid_y], 1).float() + 0.5


def _check_inference(case, got: dict, outputs: list, replay: gc.Replay, rel: float, tie: float,
                     strict_labels: bool) -> dict:
    ref = case.captured
    report: dict[str, float] = {}
    for name in ("camera_bev", "lidar_bev", "fused", "decoder", "map"):
        gc.check_close(name, got[name], ref[name], rel, report)
    obj, ref_obj = got["object"], ref["object"]
    assert torch.equal(obj["query_labels"], ref_obj["query_labels"])
    for key in ("dense_heatmap", "heatmap", "height", "dim", "rot", "vel"):
        gc.check_close(f"object.{key}", obj[key], ref_obj[key], rel, report)
    # centres: the predicted offsets from the (replayed, identical) query positions, in BEV cells
    grid_y = ref_obj["dense_heatmap"].shape[-1]
    cells = case.replay.recorded["queries"][0][1]
    pos = _query_positions(cells, grid_y)
    gc.check_close("object.center_offset", obj["center"] - pos, ref_obj["center"] - pos, rel, report)

    # query_heatmap_score: the suppressed heatmap at the proposals. A proposal that is a local maximum on one
    # device only (a near-tie with a neighbour) scores 0 on the other; elsewhere the values compare as usual.
    prob = ref_obj["dense_heatmap"].sigmoid()
    neighbours = gc.neighbour_max(prob, NMS_KERNEL)
    q_dev, q_ref = obj["query_heatmap_score"], ref_obj["query_heatmap_score"]
    one_sided = (q_dev == 0) != (q_ref == 0)
    for b, c, p in torch.nonzero(one_sided).tolist():
        cell = int(cells[b, p])
        assert gc.near_tie(prob, neighbours, -1.0, b, c, cell, tie), \
            f"query_heatmap_score: sample {b} class {c} proposal {p} suppressed on one device only, not a near-tie"
    report["proposals_suppressed_one_side"] = int(one_sided.sum())
    both = ~one_sided
    report["object.query_heatmap_score"] = gc.rel_max_err(q_dev[both], q_ref[both])
    assert report["object.query_heatmap_score"] <= rel, report

    # the device's own decisions agree with the CPU's except at near-ties
    report["plan_points_moved"] = gc.check_plans(replay.recorded["plan"], replay.natural["plan"], PLAN_FRACTION)
    report["proposals_changed"] = gc.check_queries(replay.recorded["queries"], replay.natural["queries"],
                                                   ref_obj["dense_heatmap"], NMS_KERNEL, tie)

    # decoded records: the boxes of the (replayed) queries, in query order, minus those the coder filtered out.
    # Each record is mapped back to its query from the captured head outputs, so that a box kept on one device
    # only (a near-tie with post_center_range or score_threshold) or a label decided by a near-tie (fp16) is
    # checked as such instead of shifting or failing the comparison of every other record.
    head = case.model.get_submodule(gc.CAPTURED["object"])
    coder, n = head.bbox_coder, head.num_proposals
    extent = 51.2  # positions in metres against the BEV extent
    dev_scores, dev_xyz = _query_records(obj, coder, n)
    ref_scores, ref_xyz = _query_records(ref_obj, coder, n)
    dev_keep = _query_keep(dev_scores, dev_xyz, coder)
    ref_keep = _query_keep(ref_scores, ref_xyz, coder)
    assert len(outputs) == len(case.outputs)
    for b, (out, exp) in enumerate(zip(outputs, case.outputs)):
        assert set(out) == set(exp) == {"boxes_3d", "scores_3d", "labels_3d", "masks_bev"}
        for v in out.values():
            assert v.device.type == "cpu"
        _check_records_are_queries("device", b, out, dev_scores[b], dev_keep[b])
        _check_records_are_queries("CPU", b, exp, ref_scores[b], ref_keep[b])
        # a box kept on one device only: its CPU centre within the position tolerance of post_center_range, or
        # its CPU score within `tie` of score_threshold
        for p in torch.nonzero(dev_keep[b] ^ ref_keep[b]).flatten().tolist():
            assert _keep_near_tie(ref_scores[b, :, p], ref_xyz[b, p], coder, rel * extent, tie), (
                f"decoded boxes: query {p} of sample {b} kept on the {'device' if dev_keep[b, p] else 'CPU'} only, "
                f"not a near-tie of the coder's filters (CPU centre {ref_xyz[b, p].tolist()}, "
                f"score {float(ref_scores[b, :, p].max()):.6f})")
        report[f"boxes_one_side[{b}]"] = int((dev_keep[b] ^ ref_keep[b]).sum())
        both = dev_keep[b] & ref_keep[b]
        queries = torch.nonzero(both).flatten()
        rows = (dev_keep[b].long().cumsum(0) - 1)[both]
        exp_rows = (ref_keep[b].long().cumsum(0) - 1)[both]

        # labels: the argmax of the query's class scores. fp32: equal. fp16: a label may differ only where the
        # CPU's class scores of that query are within `tie` of each other (the device's label scores within `tie`
        # of the CPU's winner on the CPU), or where the query's proposal is suppressed on one device only (score 0
        # there, every class scores 0 and the argmax is meaningless; checked as a near-tie above)
        labels, exp_labels = out["labels_3d"][rows], exp["labels_3d"][exp_rows]
        qlabels = ref_obj["query_labels"][b, queries]
        suppressed = one_sided[b, qlabels, queries]
        flipped = torch.nonzero(labels != exp_labels).flatten().tolist()
        if strict_labels:
            assert not flipped, (f"labels_3d of sample {b}: {len(flipped)} differ from the CPU's, at queries "
                                 f"{queries[flipped].tolist()[:10]}")
        for i in flipped:
            p, got_l, exp_l = int(queries[i]), int(labels[i]), int(exp_labels[i])
            gap = float(ref_scores[b, exp_l, p] - ref_scores[b, got_l, p])
            assert bool(suppressed[i]) or gap <= tie, (
                f"labels_3d: query {p} of sample {b} labelled {got_l} on the device, {exp_l} on the CPU, but the "
                f"CPU's class scores differ by {gap:.6f} (tie {tie:g}) and the proposal is not suppressed on one "
                f"device only")
        report[f"labels_flipped[{b}]"] = len(flipped)

        boxes, exp_boxes = out["boxes_3d"][rows].double(), exp["boxes_3d"][exp_rows].double()
        assert torch.isfinite(out["boxes_3d"]).all()
        # positions against the BEV extent, sizes and velocities against their own scale, yaw in radians
        report[f"boxes_xyz[{b}]"] = float((boxes[:, :3] - exp_boxes[:, :3]).abs().max()) / extent if len(boxes) else 0.0
        for name, cols in (("dims", slice(3, 6)), ("vel", slice(7, 9))):
            report[f"boxes_{name}[{b}]"] = gc.rel_max_err(boxes[:, cols], exp_boxes[:, cols]) if len(boxes) else 0.0
        # yaw = atan2(sin, cos): its error scales with the regression error over |(sin, cos)| of the query
        yaw_err = gc.angle_diff(boxes[:, 6], exp_boxes[:, 6]).abs()
        sincos = ref_obj["rot"][b, :, -n:][:, queries].double().norm(dim=0).clamp(min=1e-3)
        report[f"boxes_yaw[{b}]"] = float((yaw_err * sincos).max()) / float(ref_obj["rot"].abs().max()) \
            if len(boxes) else 0.0
        # scores, compared where the labels agree; a score of 0 on one device only is a one-sided suppression
        scores, exp_scores = out["scores_3d"][rows], exp["scores_3d"][exp_rows]
        same = labels == exp_labels
        zero_one_side = same & ((scores > 0) != (exp_scores > 0))
        assert not (zero_one_side & ~suppressed).any(), (
            f"scores_3d of sample {b}: 0 on one device only at queries "
            f"{queries[zero_one_side & ~suppressed].tolist()[:10]}, whose proposals are suppressed on both or neither")
        scored = same & (scores > 0) & (exp_scores > 0)
        report[f"scores[{b}]"] = gc.rel_max_err(scores[scored], exp_scores[scored]) if scored.any() else 0.0
        report[f"masks_bev[{b}]"] = gc.rel_max_err(out["masks_bev"], exp["masks_bev"])
        for key in ("boxes_xyz", "boxes_dims", "boxes_vel", "boxes_yaw", "scores", "masks_bev"):
            assert report[f"{key}[{b}]"] <= rel, (key, b, report)
    return report


def _query_records(obj: dict, coder, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the head's captured outputs, per query, in float64: the class scores whose max and argmax the coder
    decodes into score and label, (B, C, P) = sigmoid(class logit) x query_heatmap_score x one_hot(query label),
    as TransFusionHead.get_bboxes builds them; and the box centres in metres, (B, P, 3) (x, y, bottom z), which
    post_center_range filters on."""
    prob = obj["heatmap"][..., -n:].double().sigmoid()
    one_hot = torch.nn.functional.one_hot(obj["query_labels"], prob.shape[1]).permute(0, 2, 1).double()
    scores = prob * obj["query_heatmap_score"].double() * one_hot
    center = obj["center"][..., -n:].double()
    x = center[:, 0] * coder.out_size_factor * coder.voxel_size[0] + coder.pc_range[0]
    y = center[:, 1] * coder.out_size_factor * coder.voxel_size[1] + coder.pc_range[1]
    z = obj["height"][:, 0, -n:].double() - obj["dim"][:, 2, -n:].double().exp() * 0.5
    return scores, torch.stack([x, y, z], -1)


def _query_keep(scores: torch.Tensor, xyz: torch.Tensor, coder) -> torch.Tensor:
    """(B, P) bool: the queries whose boxes the coder keeps (centre in post_center_range, score > threshold)."""
    keep = torch.ones(xyz.shape[:2], dtype=torch.bool)
    if coder.post_center_range is not None:
        rng = torch.tensor(coder.post_center_range, dtype=torch.float64)
        keep &= (xyz >= rng[:3]).all(-1) & (xyz <= rng[3:]).all(-1)
    if coder.score_threshold:  # as the coder: a falsy threshold disables the filter
        keep &= scores.amax(1) > coder.score_threshold
    return keep


def _keep_near_tie(scores: torch.Tensor, xyz: torch.Tensor, coder, pos_tol: float, tie: float) -> bool:
    """Whether a query's box could be kept on one device only: a centre coordinate within `pos_tol` metres of
    post_center_range, or its score within `tie` of score_threshold."""
    if coder.post_center_range is not None:
        rng = torch.tensor(coder.post_center_range, dtype=torch.float64)
        if bool(((xyz - rng[:3]).abs() <= pos_tol).any() or ((xyz - rng[3:]).abs() <= pos_tol).any()):
            return True
    return bool(coder.score_threshold) and abs(float(scores.max()) - coder.score_threshold) <= tie


def _check_records_are_queries(side: str, b: int, out: dict, scores: torch.Tensor, keep: torch.Tensor) -> None:
    """The decoded records of sample b are the kept queries in query order: as many, and each with the score and
    (where its score is not 0, so that the argmax is defined) the label of its query's class scores (C, P)."""
    assert len(out["labels_3d"]) == len(out["scores_3d"]) == len(out["boxes_3d"]) == int(keep.sum()), (
        f"{side} sample {b}: {len(out['labels_3d'])} decoded boxes, but {int(keep.sum())} queries pass the "
        f"coder's filters (post_center_range, score_threshold)")
    best, label = scores[:, keep].max(0)
    torch.testing.assert_close(out["scores_3d"].double(), best, rtol=1e-5, atol=1e-7,
                               msg=lambda m: f"{side} sample {b}: decoded scores vs the query class scores: {m}")
    defined = best > 0
    assert torch.equal(out["labels_3d"][defined], label[defined]), (
        f"{side} sample {b}: decoded labels are not the argmax of the query class scores")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_inference_matches_cpu(case, device, precision):
    """Eval-mode forward on the device (fp32, or fp16 autocast as tools/test.py runs it) vs the CPU in fp32."""
    amp = precision == "fp16"
    model = _device_model(case, device)
    batch = move_batch(case.batch, device)
    replay = case.replay.fork()
    with torch.no_grad(), gc.capture(model) as got, replay.active("replay"), _autocast(device, amp):
        outputs = model(batch)
    report = _check_inference(case, got, outputs, replay, FP16_REL if amp else FP32_REL,
                              TIE["amp"] if amp else TIE["fp32"], strict_labels=not amp)
    print(f"{precision} on {device}: " + ", ".join(f"{k} {v:.2g}" for k, v in report.items()))


# ----------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def _trainer(model, cfg, device, work_dir, amp: bool):
    """The engine's Trainer around `model` (one batch per epoch), with the config's optimizer, schedules,
    gradient clipping and, for fp16, the GradScaler that tools/train.py would make."""
    from bevfusion.engine.dist import DistInfo
    from bevfusion.engine.launch import make_scaler
    from bevfusion.engine.optim import build_optimizer
    from bevfusion.engine.schedules import build_schedules
    from bevfusion.engine.trainer import Trainer

    amp_dtype = torch.float16 if amp else None
    optimizer = build_optimizer(model, cfg["optimizer"])
    scaler = make_scaler(cfg, amp_dtype, device)
    assert (scaler is not None) == amp
    root = logging.getLogger("bevfusion")
    handlers = set(root.handlers)
    trainer = Trainer(model, optimizer, [None], build_schedules(cfg, 1, 1), 1, work_dir, cfg,
                      DistInfo(device=device), amp_dtype=amp_dtype, scaler=scaler,
                      grad_clip=cfg["optimizer_config"]["grad_clip"], tensorboard=False)
    try:
        yield trainer
    finally:
        for h in set(root.handlers) - handlers:
            root.removeHandler(h)
            h.close()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def cpu_step(case, tmp_path_factory):
    """One fp32 training step on the CPU: its logged values, gradients (after clipping) and decisions."""
    model = gc.move_model(case.model, torch.device("cpu")).train()
    replay = gc.Replay()
    with _trainer(model, case.cfg, torch.device("cpu"), tmp_path_factory.mktemp("cpu_step"), amp=False) as trainer, \
            gc.capture(model) as captured, replay.active("record"):
        log_vars = trainer.train_step(case.batch)
    assert len(replay.recorded["assignment"]) >= 2  # one per sample (one decoder layer)
    return SimpleNamespace(log_vars={k: float(v) for k, v in log_vars.items()}, grads=_grads(model),
                           replay=replay, captured=captured)


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_train_step_matches_cpu(case, cpu_step, device, precision, tmp_path):
    """One optimisation step through Trainer.train_step on the device, fp32 or fp16 autocast + GradScaler:
    finite losses equal to the CPU step's per name, finite unscaled gradients close to the CPU's, the
    optimizer step taken."""
    amp = precision == "amp"
    model = _device_model(case, device).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with _trainer(model, case.cfg, device, tmp_path, amp) as trainer:
        # A dynamic GradScaler starts at 2**16 and skips the steps whose scaled gradients overflow fp16, halving
        # the scale each time (as in real training); from the same weights every retry is the same step.
        for attempt in range(24):
            replay = cpu_step.replay.fork()
            scale = trainer.scaler.get_scale() if amp else 1.0
            with replay.active("replay"), gc.capture(model) as captured:
                log_vars = {k: float(v) for k, v in trainer.train_step(case.batch).items()}
            if not amp or trainer.scaler.get_scale() >= scale:
                break
        else:
            pytest.fail(f"GradScaler skipped 24 steps in a row (scale now {trainer.scaler.get_scale()})")
    report = {"attempts": attempt + 1, "loss_scale": scale}

    ref = cpu_step.log_vars
    assert set(log_vars) == set(ref), sorted(set(log_vars) ^ set(ref))
    assert any(k.startswith("loss/object/") for k in ref) and any(k.startswith("loss/map/") for k in ref)
    for key, value in log_vars.items():
        assert math.isfinite(value), (key, value)
        if key.startswith("stats/"):
            continue  # matched IoUs, GT counts: statistics, compared through the losses they lead to
        err = abs(value - ref[key]) / max(abs(ref[key]), 1e-12)
        report[key] = err
        assert err <= LOSS_REL[precision], f"{key}: {value} on {device}, {ref[key]} on the CPU (rel {err:.3g})"

    # the dense heatmap the losses start from, and the Hungarian costs computed on the device
    gc.check_close("dense_heatmap", captured["object"]["dense_heatmap"],
                   cpu_step.captured["object"]["dense_heatmap"], FP16_REL if amp else FP32_REL, report)
    gc.check_assignment_costs(cpu_step.replay.recorded["assignment"], replay.natural["assignment"],
                              FP16_REL if amp else FP32_REL, report)
    report["proposals_changed"] = gc.check_queries(cpu_step.replay.recorded["queries"], replay.natural["queries"],
                                                   cpu_step.captured["object"]["dense_heatmap"], NMS_KERNEL,
                                                   TIE[precision])
    report["plan_points_moved"] = gc.check_plans(cpu_step.replay.recorded["plan"], replay.natural["plan"],
                                                 PLAN_FRACTION)

    grads, ref_grads = _grads(model), cpu_step.grads
    assert set(grads) == set(ref_grads)
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in ref_grads.values()))
    assert total > 0
    worst, worst_name = 0.0, None
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient after unscaling"
        diff, norm = float((g - ref_grads[name]).norm()), float(ref_grads[name].norm())
        ratio = diff / (GRAD_REL[precision] * norm + GRAD_FLOOR[precision] * total)
        if ratio > worst:
            worst, worst_name = ratio, name
    report["grad_worst_ratio"] = worst
    assert worst <= 1.0, f"{worst_name}: gradient differs from the CPU's beyond tolerance ({worst:.3g} x allowed)"
    global_err = math.sqrt(sum(float((g - ref_grads[n]).norm()) ** 2 for n, g in grads.items())) / total
    report["grad_global"] = global_err
    assert global_err <= GRAD_GLOBAL[precision], f"all gradients: relative difference {global_err:.3g}"

    changed = sum(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert changed >= 0.9 * len(grads), f"optimizer step: only {changed} of {len(grads)} parameters changed"
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{n}: non-finite after the step"
    print(f"train step {precision} on {device}: " + ", ".join(f"{k} {v:.2g}" for k, v in report.items()))

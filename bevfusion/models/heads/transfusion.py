"""TransFusion detection head (official `TransFusionHead`, LiDAR-feature queries; facts §4).

Data flow for a BEV feature (B, C_in, X, Y), indexed [x, y] like every BEV tensor in the model:

    shared_conv (3×3, bias) → F (B, 128, X, Y)
    heatmap_head → dense_heatmap logits (B, 10, X, Y)
    local-max NMS on sigmoid(dense_heatmap) (3×3, border suppressed; classes 8 and 9 skipped) → top-P
        (class, cell) pairs jointly → queries = F[cell] + class_encoding(one_hot(class)), query_pos = cell
        centre (x_idx + 0.5, y_idx + 0.5)
    decoder layers (self-attn, cross-attn on F with learned position embeddings, FFN; post-norm)
    prediction_heads: center (offset added to query_pos), height, dim, rot, vel, heatmap (class logits)

Box conventions at the head boundary. `loss` takes GT boxes and `get_bboxes` returns boxes in our
internal convention (x, y, z centre, dx along the heading, dy, dz, yaw counter-clockwise from +x, vx, vy;
`bevfusion.structures.boxes`). Inside, the head works in the official layout (x, y, z, w, l, h, yaw_mm,
vx, vy) with yaw_mm = -yaw - pi/2, so targets, decoding and assignment costs are the official ones
number for number. The z value is **not** shifted at either boundary: the official info files store the
geometric-centre z where the official code expects the bottom (the "z quirk", facts §6.3), and the
released checkpoints learned `height = z_centre + h/2`. Passing our centre z as the official "bottom"
reproduces that training target, and decoding `z = height - h/2` gives back the centre, so official
checkpoints produce the same boxes (and correct centres) through this head. The 3D IoU cost likewise
uses the official [z, z + h] vertical extent.

Differences from the official code (documented choices):
- `forward` returns one dict (not a nested list); the query labels travel in it (`query_labels`)
  instead of an attribute on the module, and `get_bboxes` handles any batch size (upstream asserts 1).
- The dense heatmap target is (C, X, Y) for non-square grids too (upstream allocates (C, Y, X) and still
  draws at [x, y]; identical for the square grids of every official config).
- GT labels outside [0, num_classes) are dropped before assignment (the pipeline's name filter already
  removes them upstream).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bevfusion.models.heads.settings import TransFusionTestSettings, TransFusionTrainSettings, settings_from
from bevfusion.models.heads.assigners import HungarianAssigner3D
from bevfusion.models.heads.coders import TransFusionBBoxCoder
from bevfusion.models.heads.targets import draw_heatmap_gaussian, gaussian_radius
from bevfusion.ops.boxes import circle_nms, nms_bev
from bevfusion.registry import built
from bevfusion.structures.boxes import internal_to_official, official_to_internal

__all__ = ["TransFusionHead", "TransformerDecoderLayer", "PositionEmbeddingLearned", "FFN", "ConvBNReLU",
           "local_max_suppression", "select_queries"]


class ConvBNReLU(nn.Sequential):
    """mmcv ConvModule layout (`conv`, `bn`, ReLU): conv without bias, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dims: int = 2):
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        super().__init__()
        self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = bn(out_channels)
        self.activate = nn.ReLU(inplace=True)


class PositionEmbeddingLearned(nn.Module):
    """(B, P, 2) positions → (B, C, P): Conv1d 2→C, BN1d, ReLU, Conv1d C→C."""

    def __init__(self, input_channel: int = 2, num_pos_feats: int = 128):
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Conv1d(input_channel, num_pos_feats, 1), nn.BatchNorm1d(num_pos_feats), nn.ReLU(inplace=True),
            nn.Conv1d(num_pos_feats, num_pos_feats, 1))

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.position_embedding_head(xyz.transpose(1, 2).contiguous())


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, cross-attention (positional embedding added to key and
    value), FFN. Attention modules are torch's (packed `in_proj_weight` in (q, k, v) row blocks, as the
    official checkpoints store them)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", self_posembed: nn.Module | None = None,
                 cross_posembed: nn.Module | None = None, cross_only: bool = False):
        super().__init__()
        self.cross_only = cross_only
        if not cross_only:
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        activations = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
        if activation not in activations:
            raise ValueError(f"activation should be relu, gelu or glu, not {activation!r}")
        self.activation = activations[activation]
        self.self_posembed = self_posembed
        self.cross_posembed = cross_posembed

    def forward(self, query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor,
                key_pos: torch.Tensor) -> torch.Tensor:
        """query (B, C, Pq), key (B, C, Pk), query_pos (B, Pq, 2), key_pos (B, Pk, 2) → (B, C, Pq)."""
        q_embed = self.self_posembed(query_pos).permute(2, 0, 1) if self.self_posembed is not None else 0
        k_embed = self.cross_posembed(key_pos).permute(2, 0, 1) if self.cross_posembed is not None else 0
        query = query.permute(2, 0, 1)  # (Pq, B, C)
        key = key.permute(2, 0, 1)  # (Pk, B, C)
        if not self.cross_only:
            q = query + q_embed
            query = self.norm1(query + self.dropout1(self.self_attn(q, q, q, need_weights=False)[0]))
        k = key + k_embed
        query2 = self.multihead_attn(query + q_embed, k, k, need_weights=False)[0]
        query = self.norm2(query + self.dropout2(query2))
        query2 = self.linear2(self.dropout(self.activation(self.linear1(query))))
        query = self.norm3(query + self.dropout3(query2))
        return query.permute(1, 2, 0)


class FFN(nn.Module):
    """Per-output 1×1 Conv1d branches: (num_conv - 1) × [Conv1d → BN1d → ReLU] then Conv1d → k (bias).

    Args:
        heads: {name: (out_channels, num_conv)}; insertion order is the module order.
    """

    def __init__(self, in_channels: int, heads: Mapping[str, Sequence[int]], head_conv: int = 64,
                 final_kernel: int = 1):
        super().__init__()
        self.heads = {k: tuple(v) for k, v in heads.items()}
        for name, (classes, num_conv) in self.heads.items():
            layers, c_in = [], in_channels
            for _ in range(num_conv - 1):
                layers.append(ConvBNReLU(c_in, head_conv, final_kernel, dims=1))
                c_in = head_conv
            layers.append(nn.Conv1d(head_conv, classes, final_kernel, padding=final_kernel // 2, bias=True))
            self.add_module(name, nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name in self.heads}


def local_max_suppression(heatmap: torch.Tensor, kernel_size: int = 3,
                          skip_classes: Sequence[int] = ()) -> torch.Tensor:
    """Zero every value that is not the maximum of its kernel window (the official proposal NMS).

    The window max is taken without padding and written inside a zero border of width kernel_size // 2,
    so border cells only survive if zero. Classes in `skip_classes` are not suppressed at all.

    Args:
        heatmap: (B, C, X, Y) scores (probabilities).
    Returns:
        (B, C, X, Y) with non-peaks set to 0.
    """
    pad = kernel_size // 2
    local_max = torch.zeros_like(heatmap)
    inner = F.max_pool2d(heatmap, kernel_size=kernel_size, stride=1, padding=0)
    if pad > 0:
        local_max[:, :, pad:-pad, pad:-pad] = inner
    else:
        local_max = inner
    for c in skip_classes:
        if c < heatmap.shape[1]:
            local_max[:, c] = heatmap[:, c]
    return heatmap * (heatmap == local_max)


def select_queries(heatmap: torch.Tensor, num_proposals: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`num_proposals` (class, cell) pairs over (B, C, X·Y) scores jointly, highest first.

    Returns:
        labels (B, P) long, cell indices (B, P) long into the flattened x-major X·Y grid.
    """
    B, C, N = heatmap.shape
    top = heatmap.reshape(B, -1).argsort(dim=-1, descending=True)[:, :num_proposals]
    return top // N, top % N


class TransFusionHead(nn.Module):
    """TransFusion-L head with the official constructor keys (see the module docstring).

    Args:
        num_proposals: queries per sample (200).
        auxiliary: supervise every decoder layer (with one layer, same as False).
        in_channels: BEV feature channels (512 for the SECOND-FPN decoder).
        hidden_channel: query / shared feature width (128).
        num_classes: 10 nuScenes classes in `object_classes` order.
        num_decoder_layers, num_heads, ffn_channel, dropout, activation: decoder settings.
        nms_kernel_size: proposal local-max window (3).
        bn_momentum: momentum of every BN in the head (0.1).
        common_heads: {name: (channels, num_conv)} regression outputs, in order (center, height, dim, rot,
            vel); `heatmap` (num_classes, num_heatmap_convs) is appended.
        num_heatmap_convs: convs of the class-logit branch (2).
        bbox_coder: a `TransFusionBBoxCoder` (or its {type: TransFusionBBoxCoder, ...} config); required.
        loss_cls, loss_bbox, loss_heatmap: loss modules (or their configs; default the official ones).
        loss_iou: accepted for config compatibility; unused (as upstream).
        train_cfg: `TransFusionTrainSettings` or its mapping (point_cloud_range, grid_size, voxel_size,
            out_size_factor, gaussian_overlap, min_radius, pos_weight, code_weights, assigner); None: no training.
        test_cfg: `TransFusionTestSettings` or its mapping (dataset: "nuScenes" skips proposal NMS on classes 8
            and 9; grid_size, out_size_factor, nms_type (None, "circle" or "rotate"), pc_range, voxel_size).
        conv_cfg, norm_cfg, bias, initialize_last_layer: accepted so official configs load, and ignored:
            the official choices (Conv1d/BN1d FFN, conv biases as listed in facts §2.4) are built in.
        heatmap_init_bias: not official (None, the default, keeps torch's init as upstream): the initial bias
            of the dense heatmap's last conv and of each decoder layer's class logits, e.g. -2.19 (a prior
            probability of 0.1, CenterNet's choice). Training from scratch starts with a small heatmap loss
            instead of one dominated by the background; the synthetic demo config uses it.
    """

    def __init__(self, num_proposals: int = 128, auxiliary: bool = True, in_channels: int = 128 * 3,
                 hidden_channel: int = 128, num_classes: int = 4, num_decoder_layers: int = 3, num_heads: int = 8,
                 nms_kernel_size: int = 1, ffn_channel: int = 256, dropout: float = 0.1, bn_momentum: float = 0.1,
                 activation: str = "relu", common_heads: Mapping[str, Sequence[int]] | None = None,
                 num_heatmap_convs: int = 2, conv_cfg: Any = None, norm_cfg: Any = None, bias: str = "auto",
                 loss_cls: Any = None, loss_iou: Any = None, loss_bbox: Any = None, loss_heatmap: Any = None,
                 train_cfg: TransFusionTrainSettings | Mapping[str, Any] | None = None,
                 test_cfg: TransFusionTestSettings | Mapping[str, Any] | None = None,
                 bbox_coder: TransFusionBBoxCoder | Mapping[str, Any] | None = None,
                 initialize_last_layer: bool = False, heatmap_init_bias: float | None = None):
        super().__init__()
        if in_channels is None:
            raise ValueError("TransFusionHead: in_channels must be set (the decoder's output channels)")
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.auxiliary = auxiliary
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.num_decoder_layers = num_decoder_layers
        self.bn_momentum = bn_momentum
        self.nms_kernel_size = nms_kernel_size
        self.train_cfg = settings_from(TransFusionTrainSettings, train_cfg, "train_cfg")
        self.test_cfg = settings_from(TransFusionTestSettings, test_cfg, "test_cfg") or TransFusionTestSettings()
        common_heads = dict(common_heads or {"center": (2, 2), "height": (1, 2), "dim": (3, 2), "rot": (2, 2),
                                             "vel": (2, 2)})

        self.loss_cls = built(loss_cls, "loss_cls", {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0,
                                                     "alpha": 0.25, "reduction": "mean", "loss_weight": 1.0})
        self.loss_bbox = built(loss_bbox, "loss_bbox", {"type": "L1Loss", "reduction": "mean", "loss_weight": 0.25})
        self.loss_heatmap = built(loss_heatmap, "loss_heatmap", {"type": "GaussianFocalLoss", "reduction": "mean"})
        self.loss_iou_cfg = loss_iou  # constructed but unused upstream

        # A raw Conv2d with bias="auto" upstream: the bias exists.
        self.shared_conv = nn.Conv2d(in_channels, hidden_channel, kernel_size=3, padding=1, bias=True)
        self.heatmap_head = nn.Sequential(
            ConvBNReLU(hidden_channel, hidden_channel, 3),
            nn.Conv2d(hidden_channel, num_classes, kernel_size=3, padding=1, bias=True))
        self.class_encoding = nn.Conv1d(num_classes, hidden_channel, 1)

        self.decoder = nn.ModuleList([
            TransformerDecoderLayer(hidden_channel, num_heads, ffn_channel, dropout, activation,
                                    self_posembed=PositionEmbeddingLearned(2, hidden_channel),
                                    cross_posembed=PositionEmbeddingLearned(2, hidden_channel))
            for _ in range(num_decoder_layers)])
        self.prediction_heads = nn.ModuleList()
        for _ in range(num_decoder_layers):
            heads = copy.deepcopy(common_heads)
            heads["heatmap"] = (num_classes, num_heatmap_convs)
            self.prediction_heads.append(FFN(hidden_channel, heads))
        self.init_weights()
        if heatmap_init_bias is not None:
            with torch.no_grad():
                self.heatmap_head[-1].bias.fill_(float(heatmap_init_bias))
                for ffn in self.prediction_heads:
                    ffn.heatmap[-1].bias.fill_(float(heatmap_init_bias))

        if bbox_coder is None:
            raise ValueError("bbox_coder is required ({type: TransFusionBBoxCoder, pc_range, out_size_factor, "
                             "voxel_size, ...})")
        self.bbox_coder = built(bbox_coder, "bbox_coder", kind=TransFusionBBoxCoder)
        self.bbox_assigner = None
        if self.train_cfg is not None:
            self.bbox_assigner = built(self.train_cfg.assigner, "train_cfg.assigner", {"type": "HungarianAssigner3D"},
                                       kind=HungarianAssigner3D)

        # Query / key positions: cell centres of the x-major BEV grid (a plain attribute, not saved).
        train = self.train_cfg
        grid = self.test_cfg.grid_size or (train.grid_size if train is not None else None)
        osf = self.test_cfg.out_size_factor or (train.out_size_factor if train is not None else None) or 8
        self.bev_pos = self.create_2D_grid(int(grid[0]) // osf, int(grid[1]) // osf) if grid is not None else None

    # ------------------------------------------------------------------ setup
    @staticmethod
    def create_2D_grid(x_size: int, y_size: int) -> torch.Tensor:
        """(1, X·Y, 2) cell centres (x_idx + 0.5, y_idx + 0.5), flattened x-major (index = x·Y + y)."""
        xs, ys = torch.meshgrid(torch.arange(x_size, dtype=torch.float32), torch.arange(y_size, dtype=torch.float32),
                                indexing="ij")
        return torch.stack([xs + 0.5, ys + 0.5], dim=-1).reshape(1, -1, 2)

    def init_weights(self) -> None:
        """As upstream: xavier_uniform on every decoder parameter with dim > 1, BN momentum for the head."""
        for p in self.decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.momentum = self.bn_momentum

    def _skip_nms_classes(self) -> tuple[int, ...]:
        dataset = self.test_cfg.dataset
        # Hard-coded class indices as upstream: pedestrian (8) and traffic_cone (9) in nuScenes order,
        # pedestrian (1) and cyclist (2) for Waymo. Another class order breaks this, as it does upstream.
        return {"nuScenes": (8, 9), "Waymo": (1, 2)}.get(dataset, ())

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor], metas: Any = None) -> dict[str, torch.Tensor]:
        """BEV features (B, C_in, X, Y) → predictions.

        Returns a dict: center (B, 2, L·P) absolute BEV cell coordinates, height (B, 1, L·P), dim (B, 3, L·P)
        log sizes, rot (B, 2, L·P) (sin, cos), vel (B, 2, L·P), heatmap (B, num_classes, L·P) class
        logits (L = decoder layers when auxiliary, else 1, layers concatenated on the last axis),
        query_heatmap_score (B, num_classes, P), dense_heatmap (B, num_classes, X, Y) logits,
        query_labels (B, P) long.
        """
        if not isinstance(inputs, torch.Tensor):
            inputs = inputs[0]
        B = inputs.shape[0]
        feat = self.shared_conv(inputs)
        X, Y = feat.shape[-2:]
        feat_flat = feat.reshape(B, feat.shape[1], -1)  # (B, C, X·Y)
        bev_pos = self.bev_pos
        if bev_pos is None or bev_pos.shape[1] != X * Y:
            bev_pos = self.create_2D_grid(X, Y)
        # at least fp32 under autocast, as upstream: fp16 rounds the cell centres of a 180-cell grid to 1/8 cell
        bev_pos = bev_pos.to(feat.device, torch.promote_types(feat.dtype, torch.float32)).expand(B, -1, -1)

        dense_heatmap = self.heatmap_head(feat)
        heatmap = local_max_suppression(dense_heatmap.detach().sigmoid(), self.nms_kernel_size,
                                        self._skip_nms_classes())
        heatmap = heatmap.reshape(B, self.num_classes, -1)
        labels, cells = select_queries(heatmap, self.num_proposals)

        query = feat_flat.gather(-1, cells[:, None, :].expand(-1, feat_flat.shape[1], -1))
        one_hot = F.one_hot(labels, num_classes=self.num_classes).permute(0, 2, 1).to(query.dtype)
        query = query + self.class_encoding(one_hot)
        query_pos = bev_pos.gather(1, cells[:, :, None].expand(-1, -1, 2))

        layers = []
        for i in range(self.num_decoder_layers):
            query = self.decoder[i](query, feat_flat, query_pos, bev_pos)
            res = self.prediction_heads[i](query)
            res["center"] = res["center"] + query_pos.permute(0, 2, 1)
            layers.append(res)
            query_pos = res["center"].detach().clone().permute(0, 2, 1)

        if self.auxiliary:
            preds = {k: torch.cat([r[k] for r in layers], dim=-1) for k in layers[0]}
        else:
            preds = dict(layers[-1])
        preds["query_heatmap_score"] = heatmap.gather(-1, cells[:, None, :].expand(-1, self.num_classes, -1))
        preds["dense_heatmap"] = dense_heatmap
        preds["query_labels"] = labels
        return preds

    # ------------------------------------------------------------------ training
    def _layers_supervised(self) -> int:
        return self.num_decoder_layers if self.auxiliary else 1

    def get_targets_single(self, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                           preds: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Targets of one sample. gt_boxes (M, 9 or 7) official layout; preds hold one sample (batch dim 1)."""
        P = preds["center"].shape[-1]
        device = preds["center"].device
        preds = {k: v.detach().float() for k, v in preds.items()}  # fp32 targets under autocast, as upstream
        score = preds["heatmap"]
        boxes = self.bbox_coder.decode(score, preds["rot"], preds["dim"], preds["center"], preds["height"],
                                       preds.get("vel"))[0]["bboxes"]
        gt_boxes = gt_boxes.to(device=device, dtype=boxes.dtype)
        gt_labels = gt_labels.to(device=device, dtype=torch.long)

        gt_inds = torch.zeros(P, dtype=torch.long, device=device)
        overlaps = boxes.new_zeros(P)
        n = self.num_proposals
        for layer in range(P // n):
            sl = slice(layer * n, (layer + 1) * n)
            res = self.bbox_assigner.assign(boxes[sl], gt_boxes, gt_labels, score[0, :, sl].T,
                                            self.train_cfg.point_cloud_range)
            gt_inds[sl], overlaps[sl] = res.gt_inds, res.max_overlaps
        pos = torch.nonzero(gt_inds > 0, as_tuple=False).flatten()
        code_size = self.bbox_coder.code_size
        bbox_targets = boxes.new_zeros(P, code_size)
        bbox_weights = boxes.new_zeros(P, code_size)
        labels = torch.full((P,), self.num_classes, dtype=torch.long, device=device)
        label_weights = boxes.new_ones(P)  # positives: pos_weight <= 0 means 1; negatives: 1
        if len(pos):
            matched = gt_inds[pos] - 1
            gt_for_code = gt_boxes[matched]
            if gt_for_code.shape[1] < 9 and code_size == 10:
                gt_for_code = F.pad(gt_for_code, (0, 9 - gt_for_code.shape[1]))
            bbox_targets[pos] = self.bbox_coder.encode(gt_for_code)
            bbox_weights[pos] = 1.0
            labels[pos] = gt_labels[matched]
            pos_weight = self.train_cfg.pos_weight
            if pos_weight > 0:
                label_weights[pos] = pos_weight
        ious = overlaps.clamp(0.0, 1.0)
        mean_iou = float(ious[pos].sum()) / max(len(pos), 1)
        heatmap = self.heatmap_target(gt_boxes, gt_labels, device)
        return {"labels": labels, "label_weights": label_weights, "bbox_targets": bbox_targets,
                "bbox_weights": bbox_weights, "num_pos": int(len(pos)), "mean_iou": mean_iou, "heatmap": heatmap}

    def heatmap_target(self, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(num_classes, X, Y) Gaussian heatmap target from official-layout boxes (facts §4.3)."""
        cfg = self.train_cfg
        osf = cfg.out_size_factor
        grid = [int(v) for v in cfg.grid_size[:2]]
        X, Y = grid[0] // osf, grid[1] // osf
        pcr = torch.tensor(cfg.point_cloud_range, dtype=torch.float32)
        vs = torch.tensor(cfg.voxel_size, dtype=torch.float32)
        heatmap = torch.zeros(self.num_classes, X, Y, dtype=torch.float32)
        boxes = gt_boxes.detach().float().cpu()
        for idx in range(len(boxes)):
            # float32 arithmetic in the official order, so truncation matches
            width = boxes[idx, 3] / vs[0] / osf
            length = boxes[idx, 4] / vs[1] / osf
            if not (width > 0 and length > 0):
                continue
            radius = gaussian_radius((float(length), float(width)), min_overlap=cfg.gaussian_overlap)
            radius = max(cfg.min_radius, int(radius))
            coor_x = (boxes[idx, 0] - pcr[0]) / vs[0] / osf
            coor_y = (boxes[idx, 1] - pcr[1]) / vs[1] / osf
            cx, cy = int(coor_x.to(torch.int32)), int(coor_y.to(torch.int32))  # truncation toward zero
            if not (0 <= cx < X and 0 <= cy < Y):
                continue
            # row = x index, col = y index (upstream's "NOTE: fix"): draw at (col=cy, row=cx).
            draw_heatmap_gaussian(heatmap[int(gt_labels[idx])], (cy, cx), radius)
        return heatmap.to(device)

    def loss(self, gt_bboxes_3d: Sequence[torch.Tensor], gt_labels_3d: Sequence[torch.Tensor],
             preds: Mapping[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Named losses (`loss_heatmap`, `layer_-1_loss_cls`, `layer_-1_loss_bbox`, ...) and `matched_ious`.

        Args:
            gt_bboxes_3d: per sample (M, 9) internal boxes (x, y, z centre, dx, dy, dz, yaw, vx, vy); (M, 7)
                gets zero velocity.
            gt_labels_3d: per sample (M,) class indices; values outside [0, num_classes) are ignored.
            preds: output of `forward`.
        """
        if self.train_cfg is None or self.bbox_assigner is None:
            raise RuntimeError("TransFusionHead.loss needs train_cfg")
        B = preds["center"].shape[0]
        per_sample = []
        for b in range(B):
            boxes = torch.as_tensor(gt_bboxes_3d[b])
            labels = torch.as_tensor(gt_labels_3d[b]).long().reshape(-1)
            boxes = boxes.reshape(-1, boxes.shape[-1] if boxes.numel() else 9).float()
            keep = (labels >= 0) & (labels < self.num_classes)
            boxes, labels = boxes[keep.to(boxes.device)], labels[keep]
            official = internal_to_official(boxes) if len(boxes) else boxes
            sample_preds = {k: v[b:b + 1] for k, v in preds.items() if k in ("center", "height", "dim", "rot",
                                                                            "vel", "heatmap")}
            per_sample.append(self.get_targets_single(official, labels, sample_preds))

        labels = torch.stack([t["labels"] for t in per_sample])  # (B, L·P)
        label_weights = torch.stack([t["label_weights"] for t in per_sample])
        bbox_targets = torch.stack([t["bbox_targets"] for t in per_sample])  # (B, L·P, code)
        bbox_weights = torch.stack([t["bbox_weights"] for t in per_sample])
        heatmap = torch.stack([t["heatmap"] for t in per_sample])  # (B, C, X, Y)
        num_pos = sum(t["num_pos"] for t in per_sample)
        matched_ious = float(np.mean([t["mean_iou"] for t in per_sample]))

        losses: dict[str, torch.Tensor] = {}
        dense = preds["dense_heatmap"].float().sigmoid().clamp(1e-4, 1 - 1e-4)
        losses["loss_heatmap"] = self.loss_heatmap(dense, heatmap, avg_factor=max(float(heatmap.eq(1).sum()), 1.0))

        code_weights = self.train_cfg.code_weights
        n = self.num_proposals
        num_layers = preds["center"].shape[-1] // n
        keys = ["center", "height", "dim", "rot"] + (["vel"] if "vel" in preds else [])
        for layer in range(num_layers):
            prefix = "layer_-1" if layer == num_layers - 1 else f"layer_{layer}"
            sl = slice(layer * n, (layer + 1) * n)
            cls_score = preds["heatmap"][..., sl].permute(0, 2, 1).reshape(-1, self.num_classes).float()
            loss_cls = self.loss_cls(cls_score, labels[:, sl].reshape(-1), label_weights[:, sl].reshape(-1),
                                     avg_factor=max(num_pos, 1))
            box_preds = torch.cat([preds[k][..., sl] for k in keys], dim=1).permute(0, 2, 1).float()
            weights = bbox_weights[:, sl]
            if code_weights is not None:
                weights = weights * weights.new_tensor([float(v) for v in code_weights])
            loss_bbox = self.loss_bbox(box_preds, bbox_targets[:, sl], weights, avg_factor=max(num_pos, 1))
            losses[f"{prefix}_loss_cls"] = loss_cls
            losses[f"{prefix}_loss_bbox"] = loss_bbox
        losses["matched_ious"] = torch.tensor(matched_ious, device=dense.device)
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def get_bboxes(self, preds: Mapping[str, torch.Tensor], metas: Any = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sample (boxes (K, 9) internal convention, scores (K,), labels (K,) long).

        score = sigmoid(class logit) × query_heatmap_score × one_hot(query label), so only the query's
        proposal class can win; boxes with centres outside post_center_range are dropped; no NMS unless
        test_cfg.nms_type is set (then NMS on pedestrians and cones only, radius 0.175, as upstream).
        """
        n = self.num_proposals
        preds = {k: (v.float() if v.is_floating_point() else v) for k, v in preds.items()}
        score = preds["heatmap"][..., -n:].sigmoid()
        one_hot = F.one_hot(preds["query_labels"], num_classes=self.num_classes).permute(0, 2, 1)
        score = score * preds["query_heatmap_score"] * one_hot
        vel = preds["vel"][..., -n:] if "vel" in preds else None
        decoded = self.bbox_coder.decode(score, preds["rot"][..., -n:], preds["dim"][..., -n:],
                                         preds["center"][..., -n:], preds["height"][..., -n:], vel, filter=True)
        nms_type = self.test_cfg.nms_type
        out = []
        for d in decoded:
            boxes, scores, labels = d["bboxes"], d["scores"], d["labels"]
            if nms_type is not None:
                keep = self._class_nms(boxes, scores, labels, nms_type)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            if boxes.shape[1] == 7:
                boxes = F.pad(boxes, (0, 2))
            out.append((official_to_internal(boxes.float()), scores.float(), labels.long()))
        return out

    def _class_nms(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, nms_type: str
                   ) -> torch.Tensor:
        """Upstream's optional post-NMS, by class group: nuScenes classes 0-7 untouched, pedestrian (8) and
        traffic_cone (9) each with radius 0.175 — circle NMS on squared centre distance, or ("rotate" or any
        other value) rotated BEV NMS with that IoU threshold and test_cfg pre_maxsize / post_maxsize."""
        keep = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
        dataset = self.test_cfg.dataset
        if dataset == "nuScenes":
            groups = [(list(range(8)), -1.0), ([8], 0.175), ([9], 0.175)]
        elif dataset == "Waymo":
            groups = [([0], 0.7), ([1], 0.7), ([2], 0.7)]
        else:
            groups = [(list(range(self.num_classes)), -1.0)]
        for classes, radius in groups:
            mask = torch.zeros_like(keep)
            for c in classes:
                mask |= labels == c
            idx = torch.nonzero(mask, as_tuple=False).flatten()
            if radius <= 0:
                keep[idx] = True
                continue
            if nms_type == "circle":
                # upstream calls mmdet3d's circle_nms with its default post_max_size=83
                kept = circle_nms(boxes[idx, :2], scores[idx], radius, post_max=83)
            else:
                # float64 IoU (the same decisions on CPU and GPU), union clamped at 1e-8 m² as nms_gpu's
                kept = nms_bev(official_to_internal(boxes[idx, :7]).double(), scores[idx], radius,
                               pre_max=self.test_cfg.pre_maxsize, post_max=self.test_cfg.post_maxsize,
                               min_union=1e-8)
            keep[idx[kept]] = True
        return torch.nonzero(keep, as_tuple=False).flatten()


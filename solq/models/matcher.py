"""Hungarian matching between predictions and ground truth (as in the authors' release).

The cost of assigning query q to ground-truth object j is

    C[q, j] = cost_bbox * |b_q - b_j|_1 + cost_class * focal(p_q[c_j]) + cost_giou * (-GIoU(b_q, b_j))

with boxes as normalised (cx, cy, w, h) for the L1 term and xyxy for GIoU, and the focal class cost
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``. Masks (and mask vectors) never enter the
matching. The cost matrix of the whole batch is computed at once on the outputs' device; only that matrix
is moved to the CPU, where ``scipy.optimize.linear_sum_assignment`` solves each image's block.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "build_matcher"]

_EPS = 1e-8  # inside the logs of the focal cost, as the release


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth objects, per image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the focal class cost, the L1 box cost and the
            negative-GIoU cost (release: 2, 5, 2).
        focal_alpha, focal_gamma: focal-cost parameters (release: 0.25, 2, hard-coded there).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """The batched cost matrix.

        Args:
            outputs: ``pred_logits`` [B,Q,C] and ``pred_boxes`` [B,Q,4] (sigmoid cxcywh).
            targets: B dicts with ``labels`` int64 [n_i] and ``boxes`` [n_i,4] normalised cxcywh.
        Returns:
            float32 [B,Q,sum n_i] on the outputs' device; image b's block is columns
            ``sum(n[:b]) : sum(n[:b+1])``.
        """
        logits = outputs["pred_logits"]
        B, Q, C = logits.shape
        if len(targets) != B:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {B} outputs")
        prob = logits.flatten(0, 1).float().sigmoid()  # [B*Q, C]
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(device=logits.device, dtype=torch.float32)
        if tgt_ids.numel() and (int(tgt_ids.min()) < 0 or int(tgt_ids.max()) >= C):
            bad = [(i, int(t["image_id"]) if "image_id" in t else None) for i, t in enumerate(targets)
                   if len(t["labels"]) and (int(t["labels"].min()) < 0 or int(t["labels"].max()) >= C)]
            raise ValueError(f"HungarianMatcher: target labels outside [0, {C}) in batch entries "
                             f"(index, image_id) {bad}; is model.num_classes large enough?")

        p = prob[:, tgt_ids]  # [B*Q, n]
        a, g = self.focal_alpha, self.focal_gamma
        pos = a * (1 - p).pow(g) * -(p + _EPS).log()
        neg = (1 - a) * p.pow(g) * -(1 - p + _EPS).log()
        cost_class = pos - neg
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"),
                                         box_convert(tgt_bbox, "cxcywh", "xyxy"))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(B, Q, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its ground truth.

        Args: as :meth:`cost_matrix`.
        Returns:
            B pairs ``(query_idx, target_idx)``, int64 CPU tensors of length min(Q, n_i) each
            (empty for an image without objects); query_idx is sorted ascending.
        """
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            if len(targets) != outputs["pred_logits"].shape[0]:
                raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of "
                                 f"{outputs['pred_logits'].shape[0]} outputs")
            return [(empty, empty.clone()) for _ in sizes]
        cost = self.cost_matrix(outputs, targets).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the cost matrix has NaN/inf entries "
                                     "(non-finite predictions or degenerate target boxes?)")
        indices = []
        for b, c in enumerate(cost.split(sizes, dim=-1)):
            if sizes[b] == 0:
                indices.append((empty, empty.clone()))
                continue
            qi, ti = linear_sum_assignment(c[b].numpy())
            indices.append((torch.as_tensor(qi, dtype=torch.int64), torch.as_tensor(ti, dtype=torch.int64)))
        return indices


def build_matcher(cfg) -> HungarianMatcher:
    """``HungarianMatcher`` from ``cfg.loss`` (set_cost_class/bbox/giou, focal_alpha)."""
    return HungarianMatcher(cost_class=cfg.loss.set_cost_class, cost_bbox=cfg.loss.set_cost_bbox,
                            cost_giou=cfg.loss.set_cost_giou, focal_alpha=cfg.loss.focal_alpha)

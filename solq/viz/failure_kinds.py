"""The failure kinds of one image (paper Fig. 6, Appendix A.5): one rule per function, over pairwise mask overlaps.

Per image, with the predictions above a score threshold and the non-crowd ground truth (mask IoUs from
pycocotools on RLEs, no pixel loops):

- ``missed``: a ground-truth object that no prediction (of any class) overlaps with mask IoU >= 0.5.
  Severity 1 - best IoU.
- ``merged``: one prediction covering >= ``cover_threshold`` of each of two or more ground-truth objects
  (intersection over the object's area). Severity score x the second-largest coverage.
- ``duplicate``: two predictions from different queries whose masks overlap with IoU >= ``duplicate_iou``.
  When the two masks together cover (>= ``cover_threshold``) two or more objects, the pair is the
  paper's "siamese" masks on overlapping objects. Severity min(score) x pair IoU.
- ``wrong_class``: the highest-scoring prediction among those with mask IoU >= 0.5 to an object has
  another category. Severity its score x IoU.
- ``poor_boundary``: an object whose best same-class match (mask IoU >= 0.5) has Boundary IoU
  (``solq.evaluation.boundary``) below ``boundary_threshold``. Severity 1 - boundary IoU.

The occlusion of a ground-truth object is the fraction of its box covered by the other objects' masks;
statistics are given per category and per occlusion bin.

Inputs: per-image prediction dicts ``{image_id, boxes [K,4] xyxy, scores [K], labels [K], masks}`` and
ground-truth dicts ``{image_id, boxes [n,4] xyxy, labels [n], masks, iscrowd [n] (optional)}``; masks as
bool [K,H,W] (numpy or torch), a list of COCO RLEs, or an RLE-backed array with ``.rles``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from pycocotools import mask as mask_utils

from solq.evaluation.boundary import boundary_iou

from .draw import as_numpy
from .overlaps import as_rles, intersections, occlusion, pairwise_iou

__all__ = ["KINDS", "FailureCase", "mine_image"]

KINDS = ("missed", "merged", "duplicate", "wrong_class", "poor_boundary")


@dataclass
class FailureCase:
    """One failure. ``gt`` / ``pred``: positions in the image's ground truth / prediction arrays (the
    predictions as given, before the score threshold). ``occlusion``: largest occlusion of the objects
    involved (NaN when none). ``reason``: the text written on gallery panels."""

    kind: str
    image_id: int
    severity: float
    gt: tuple[int, ...]
    pred: tuple[int, ...]
    category_id: int
    occlusion: float
    reason: str
    details: dict = field(default_factory=dict)


def _name(names: Optional[Mapping[int, str]], cat: int) -> str:
    return (names or {}).get(int(cat), f"class {int(cat)}")


@dataclass
class _Scene:
    """One image's objects (non-crowd GT, index j) and kept predictions (score >= threshold, best first,
    index i), with their pairwise overlaps; ``case`` records a failure (see :func:`mine_image`)."""

    image_id: int
    g_keep: np.ndarray  # [n] positions in the GT arrays
    g_rles: list
    g_labels: np.ndarray
    g_area: np.ndarray
    p_keep: np.ndarray  # [k] positions in the prediction arrays
    p_rles: list
    p_scores: np.ndarray
    p_labels: np.ndarray
    p_query: np.ndarray
    iou: np.ndarray  # [n,k] mask IoU
    cover: np.ndarray  # [n,k] share of each object covered by each mask
    occ: np.ndarray  # [n] occlusion of each object
    names: Optional[Mapping[int, str]]
    cases: list = field(default_factory=list)
    table: dict = field(default_factory=dict)

    def case(self, kind: str, severity: float, gts, preds, cat: int, reason: str, **details) -> None:
        gts = [int(j) for j in gts]
        self.cases.append(FailureCase(kind, self.image_id, float(severity), tuple(int(self.g_keep[j]) for j in gts),
                                      tuple(int(self.p_keep[i]) for i in preds), int(cat),
                                      float(self.occ[gts].max()) if gts else math.nan, reason, details))
        self.table[kind][gts] = True

    def name(self, cat: int) -> str:
        return _name(self.names, cat)


def _scene(pred: Mapping[str, Any], gt: Mapping[str, Any], score_threshold: float,
           names: Optional[Mapping[int, str]]) -> _Scene:
    image_id = int(gt.get("image_id", pred.get("image_id", -1)))
    g_labels = as_numpy(gt["labels"]).astype(np.int64).reshape(-1)
    crowd = as_numpy(gt["iscrowd"]).astype(bool).reshape(-1) if gt.get("iscrowd") is not None else \
        np.zeros(len(g_labels), bool)
    g_keep = np.flatnonzero(~crowd)
    g_rles_all = as_rles(gt["masks"])
    g_rles = [g_rles_all[j] for j in g_keep]
    g_boxes = as_numpy(gt["boxes"]).astype(np.float64).reshape(-1, 4)[g_keep]
    g_area = np.asarray(mask_utils.area(g_rles), np.float64) if g_rles else np.zeros(0)

    scores_all = as_numpy(pred["scores"]).astype(np.float64).reshape(-1)
    p_keep = np.flatnonzero(scores_all >= score_threshold)
    p_keep = p_keep[np.argsort(-scores_all[p_keep], kind="stable")]
    p_rles_all = as_rles(pred.get("masks"))
    if len(p_rles_all) != len(scores_all):
        raise ValueError(f"image_id={image_id}: {len(scores_all)} prediction scores but {len(p_rles_all)} masks")
    p_rles = [p_rles_all[i] for i in p_keep]
    p_query = (as_numpy(pred["query_index"]).astype(np.int64).reshape(-1)[p_keep]
               if pred.get("query_index") is not None else p_keep)
    p_area = np.asarray(mask_utils.area(p_rles), np.float64) if p_rles else np.zeros(0)

    iou = pairwise_iou(g_rles, p_rles)
    cover = intersections(iou, g_area, p_area) / np.maximum(g_area[:, None], 1)
    occ = occlusion(mask_utils.decode(g_rles).transpose(2, 0, 1), g_boxes) if g_rles else np.zeros(0)
    return _Scene(image_id, g_keep, g_rles, g_labels[g_keep], g_area, p_keep, p_rles, scores_all[p_keep],
                  as_numpy(pred["labels"]).astype(np.int64).reshape(-1)[p_keep], p_query, iou, cover, occ, names)


def _missed(sc: _Scene, best_iou: np.ndarray, iou_threshold: float) -> None:
    for j in np.flatnonzero(best_iou < iou_threshold):
        near = [int(np.argmax(sc.iou[j]))] if len(sc.p_rles) and best_iou[j] > 0 else []
        sc.case("missed", 1.0 - best_iou[j], [j], near, sc.g_labels[j],
                f"missed {sc.name(sc.g_labels[j])}: best IoU {best_iou[j]:.2f}, "
                f"{100 * sc.occ[j]:.0f}% occluded", best_iou=float(best_iou[j]), area=float(sc.g_area[j]))


def _merged(sc: _Scene, cover_threshold: float) -> None:
    """One mask over several objects."""
    cover = sc.cover
    for i in range(len(sc.p_rles)):
        covered = np.flatnonzero(cover[:, i] >= cover_threshold)
        if len(covered) >= 2:
            covered = covered[np.argsort(-cover[covered, i])]
            parts = " + ".join(f"{sc.name(sc.g_labels[j])} ({100 * cover[j, i]:.0f}%)" for j in covered)
            sc.case("merged", sc.p_scores[i] * cover[covered[1], i], covered, [i], sc.p_labels[i],
                    f"merged: one {sc.name(sc.p_labels[i])} mask ({sc.p_scores[i]:.2f}) covers {parts}",
                    coverage=[float(cover[j, i]) for j in covered], score=float(sc.p_scores[i]))


def _duplicates(sc: _Scene, duplicate_iou: float, cover_threshold: float) -> None:
    """Different queries with overlapping masks (siamese when they lie over two or more objects)."""
    n, k = len(sc.g_rles), len(sc.p_rles)
    if k < 2:
        return
    cover, scores, query = sc.cover, sc.p_scores, sc.p_query
    pp = pairwise_iou(sc.p_rles, sc.p_rles)
    i1, i2 = np.nonzero(np.triu(pp >= duplicate_iou, 1) & (query[:, None] != query[None, :]))
    owner = np.where(sc.iou.max(0) > 0, sc.iou.argmax(0), -1) if n else np.full(k, -1)
    for a, b in zip(i1.tolist(), i2.tolist()):
        under = np.flatnonzero(np.maximum(cover[:, a], cover[:, b]) >= cover_threshold) if n else []
        siamese = len(under) >= 2
        gts = sorted(int(j) for j in under) if len(under) else sorted({int(owner[a]), int(owner[b])} - {-1})
        what = "siamese masks on 2 objects" if siamese else "duplicate masks"
        sc.case("duplicate", min(scores[a], scores[b]) * pp[a, b], gts, [a, b], sc.p_labels[a],
                f"{what}: queries {query[a]} & {query[b]} ({scores[a]:.2f}, {scores[b]:.2f}), "
                f"mask IoU {pp[a, b]:.2f}", pair_iou=float(pp[a, b]), siamese=siamese)


def _wrong_class(sc: _Scene, best_iou: np.ndarray, good: np.ndarray, same: np.ndarray,
                 iou_threshold: float) -> list[tuple[int, int]]:
    """Objects whose best-scored overlapping mask has another class; returns the (object, prediction)
    pairs of correct detections (same class, best IoU) for the boundary check."""
    iou, scores, labels = sc.iou, sc.p_scores, sc.p_labels
    matched = []
    for j in np.flatnonzero(best_iou >= iou_threshold):
        cands = np.flatnonzero(good[j])
        top = cands[np.argmax(scores[cands])]  # what a viewer sees on this object
        if labels[top] != sc.g_labels[j]:
            sc.case("wrong_class", scores[top] * iou[j, top], [j], [top], sc.g_labels[j],
                    f"wrong class: {sc.name(labels[top])} {scores[top]:.2f} on a "
                    f"{sc.name(sc.g_labels[j])} (IoU {iou[j, top]:.2f})",
                    predicted=int(labels[top]), iou=float(iou[j, top]), correct_also=bool((good[j] & same[j]).any()))
        right = np.flatnonzero(good[j] & same[j])
        if len(right):
            matched.append((j, int(right[np.argmax(iou[j, right])])))
    return matched


def _poor_boundaries(sc: _Scene, matched: list[tuple[int, int]], boundary_threshold: float,
                     dilation_ratio: float) -> None:
    """Correct detections whose boundary IoU is below the threshold; fills the table's boundary_iou."""
    sc.table["boundary_iou"] = np.full(len(sc.g_rles), np.nan)
    if not matched:
        return
    gj, pi = map(list, zip(*matched))
    g_masks = mask_utils.decode([sc.g_rles[j] for j in gj]).transpose(2, 0, 1).astype(bool)
    p_masks = mask_utils.decode([sc.p_rles[i] for i in pi]).transpose(2, 0, 1).astype(bool)
    b_iou = np.diagonal(np.asarray(boundary_iou(g_masks, p_masks, dilation_ratio)))  # [dt,gt] -> pairs
    sc.table["boundary_iou"][gj] = b_iou
    for j, i, b in zip(gj, pi, b_iou.tolist()):
        if b < boundary_threshold:
            sc.case("poor_boundary", 1.0 - b, [j], [i], sc.g_labels[j],
                    f"poor boundary on {sc.name(sc.g_labels[j])}: boundary IoU {b:.2f} "
                    f"(mask IoU {sc.iou[j, i]:.2f})", boundary_iou=float(b), iou=float(sc.iou[j, i]))


def mine_image(pred: Mapping[str, Any], gt: Mapping[str, Any], *, score_threshold: float = 0.3,
               iou_threshold: float = 0.5, cover_threshold: float = 0.5, duplicate_iou: float = 0.7,
               boundary_threshold: float = 0.5, dilation_ratio: float = 0.02,
               category_names: Optional[Mapping[int, str]] = None) -> tuple[list[FailureCase], dict]:
    """Failures of one image (see the module docstring for the rules).

    Returns (cases, per-GT table) where the table holds numpy arrays over the non-crowd objects:
    ``gt_index``, ``category_id``, ``area``, ``occlusion``, ``best_iou`` (any class), ``matched`` (a
    same-class prediction with IoU >= iou_threshold) and one bool column per kind (object involved).
    """
    sc = _scene(pred, gt, score_threshold, category_names)
    n, k = len(sc.g_rles), len(sc.p_rles)
    same = sc.g_labels[:, None] == sc.p_labels[None, :]
    good = sc.iou >= iou_threshold
    best_iou = sc.iou.max(1) if k else np.zeros(n)
    sc.table.update({"image_id": np.full(n, sc.image_id), "gt_index": sc.g_keep, "category_id": sc.g_labels,
                     "area": sc.g_area, "occlusion": sc.occ, "best_iou": best_iou, "matched": (good & same).any(1)})
    sc.table.update({kind: np.zeros(n, bool) for kind in KINDS})
    _missed(sc, best_iou, iou_threshold)
    _merged(sc, cover_threshold)
    _duplicates(sc, duplicate_iou, cover_threshold)
    matched = _wrong_class(sc, best_iou, good, same, iou_threshold)
    _poor_boundaries(sc, matched, boundary_threshold, dilation_ratio)
    return sc.cases, sc.table

"""Failure-case mining over a validation set (paper Fig. 6, Appendix A.5), with statistics and galleries.

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
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from .draw import as_numpy, draw_instances
from .overlaps import OCCLUSION_BINS, as_rles, bin_labels, intersections, occlusion, occlusion_bin, pairwise_iou

__all__ = ["KINDS", "OCCLUSION_BINS", "FailureCase", "FailureReport", "as_rles", "pairwise_iou", "occlusion",
           "occlusion_bin", "mine_image", "mine_failures", "failure_statistics", "format_statistics",
           "plot_statistics", "failure_gallery", "ground_truths_from_dataset"]

KINDS = ("missed", "merged", "duplicate", "wrong_class", "poor_boundary")


# ------------------------------------------------------------------------------------------- mining
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


def mine_image(pred: Mapping[str, Any], gt: Mapping[str, Any], *, score_threshold: float = 0.3,
               iou_threshold: float = 0.5, cover_threshold: float = 0.5, duplicate_iou: float = 0.7,
               boundary_threshold: float = 0.5, dilation_ratio: float = 0.02,
               category_names: Optional[Mapping[int, str]] = None) -> tuple[list[FailureCase], dict]:
    """Failures of one image (see the module docstring for the rules).

    Returns (cases, per-GT table) where the table holds numpy arrays over the non-crowd objects:
    ``gt_index``, ``category_id``, ``area``, ``occlusion``, ``best_iou`` (any class), ``matched`` (a
    same-class prediction with IoU >= iou_threshold) and one bool column per kind (object involved).
    """
    image_id = int(gt.get("image_id", pred.get("image_id", -1)))
    g_labels = as_numpy(gt["labels"]).astype(np.int64).reshape(-1)
    crowd = as_numpy(gt["iscrowd"]).astype(bool).reshape(-1) if gt.get("iscrowd") is not None else \
        np.zeros(len(g_labels), bool)
    g_keep = np.flatnonzero(~crowd)
    g_rles_all = as_rles(gt["masks"])
    g_rles = [g_rles_all[j] for j in g_keep]
    g_labels = g_labels[g_keep]
    g_boxes = as_numpy(gt["boxes"]).astype(np.float64).reshape(-1, 4)[g_keep]
    g_area = np.asarray(mask_utils.area(g_rles), np.float64) if g_rles else np.zeros(0)

    scores_all = as_numpy(pred["scores"]).astype(np.float64).reshape(-1)
    p_keep = np.flatnonzero(scores_all >= score_threshold)
    p_keep = p_keep[np.argsort(-scores_all[p_keep], kind="stable")]
    p_rles_all = as_rles(pred.get("masks"))
    if len(p_rles_all) != len(scores_all):
        raise ValueError(f"image_id={image_id}: {len(scores_all)} prediction scores but {len(p_rles_all)} masks")
    p_rles = [p_rles_all[i] for i in p_keep]
    p_scores = scores_all[p_keep]
    p_labels = as_numpy(pred["labels"]).astype(np.int64).reshape(-1)[p_keep]
    p_query = (as_numpy(pred["query_index"]).astype(np.int64).reshape(-1)[p_keep]
               if pred.get("query_index") is not None else p_keep)
    p_area = np.asarray(mask_utils.area(p_rles), np.float64) if p_rles else np.zeros(0)

    n, k = len(g_rles), len(p_rles)
    iou = pairwise_iou(g_rles, p_rles)  # [n,k]
    cover = intersections(iou, g_area, p_area) / np.maximum(g_area[:, None], 1)  # share of each object covered
    occ = occlusion(mask_utils.decode(g_rles).transpose(2, 0, 1), g_boxes) if n else np.zeros(0)
    same = g_labels[:, None] == p_labels[None, :]
    good = iou >= iou_threshold
    best_iou = iou.max(1) if k else np.zeros(n)
    table = {"image_id": np.full(n, image_id), "gt_index": g_keep, "category_id": g_labels, "area": g_area,
             "occlusion": occ, "best_iou": best_iou, "matched": (good & same).any(1)}
    table.update({kind: np.zeros(n, bool) for kind in KINDS})
    cases: list[FailureCase] = []

    def case(kind, severity, gts, preds, cat, reason, **details):
        gts = [int(j) for j in gts]
        cases.append(FailureCase(kind, image_id, float(severity), tuple(int(g_keep[j]) for j in gts),
                                 tuple(int(p_keep[i]) for i in preds), int(cat),
                                 float(occ[gts].max()) if gts else math.nan, reason, details))
        table[kind][gts] = True

    for j in np.flatnonzero(best_iou < iou_threshold):  # missed
        near = [int(np.argmax(iou[j]))] if k and best_iou[j] > 0 else []
        case("missed", 1.0 - best_iou[j], [j], near, g_labels[j],
             f"missed {_name(category_names, g_labels[j])}: best IoU {best_iou[j]:.2f}, "
             f"{100 * occ[j]:.0f}% occluded", best_iou=float(best_iou[j]), area=float(g_area[j]))

    for i in range(k):  # merged: one mask over several objects
        covered = np.flatnonzero(cover[:, i] >= cover_threshold)
        if len(covered) >= 2:
            covered = covered[np.argsort(-cover[covered, i])]
            parts = " + ".join(f"{_name(category_names, g_labels[j])} ({100 * cover[j, i]:.0f}%)" for j in covered)
            case("merged", p_scores[i] * cover[covered[1], i], covered, [i], p_labels[i],
                 f"merged: one {_name(category_names, p_labels[i])} mask ({p_scores[i]:.2f}) covers {parts}",
                 coverage=[float(cover[j, i]) for j in covered], score=float(p_scores[i]))

    if k >= 2:  # duplicates: different queries, overlapping masks
        pp = pairwise_iou(p_rles, p_rles)
        i1, i2 = np.nonzero(np.triu(pp >= duplicate_iou, 1) & (p_query[:, None] != p_query[None, :]))
        owner = np.where(iou.max(0) > 0, iou.argmax(0), -1) if n else np.full(k, -1)
        for a, b in zip(i1.tolist(), i2.tolist()):
            under = np.flatnonzero(np.maximum(cover[:, a], cover[:, b]) >= cover_threshold) if n else []
            siamese = len(under) >= 2  # the two masks lie over two or more objects
            gts = sorted(int(j) for j in under) if len(under) else sorted({int(owner[a]), int(owner[b])} - {-1})
            what = "siamese masks on 2 objects" if siamese else "duplicate masks"
            case("duplicate", min(p_scores[a], p_scores[b]) * pp[a, b], gts, [a, b], p_labels[a],
                 f"{what}: queries {p_query[a]} & {p_query[b]} ({p_scores[a]:.2f}, {p_scores[b]:.2f}), "
                 f"mask IoU {pp[a, b]:.2f}", pair_iou=float(pp[a, b]), siamese=siamese)

    matched_pairs = []
    for j in np.flatnonzero(best_iou >= iou_threshold):
        cands = np.flatnonzero(good[j])
        top = cands[np.argmax(p_scores[cands])]  # what a viewer sees on this object
        if p_labels[top] != g_labels[j]:
            case("wrong_class", p_scores[top] * iou[j, top], [j], [top], g_labels[j],
                 f"wrong class: {_name(category_names, p_labels[top])} {p_scores[top]:.2f} on a "
                 f"{_name(category_names, g_labels[j])} (IoU {iou[j, top]:.2f})",
                 predicted=int(p_labels[top]), iou=float(iou[j, top]),
                 correct_also=bool((good[j] & same[j]).any()))
        right = np.flatnonzero(good[j] & same[j])
        if len(right):
            matched_pairs.append((j, int(right[np.argmax(iou[j, right])])))

    if matched_pairs:  # poor boundaries of correct detections
        from solq.evaluation.boundary import boundary_iou

        gj, pi = map(list, zip(*matched_pairs))
        g_masks = mask_utils.decode([g_rles[j] for j in gj]).transpose(2, 0, 1).astype(bool)
        p_masks = mask_utils.decode([p_rles[i] for i in pi]).transpose(2, 0, 1).astype(bool)
        b_iou = np.diagonal(np.asarray(boundary_iou(g_masks, p_masks, dilation_ratio)))  # [dt,gt] -> pairs
        table["boundary_iou"] = np.full(n, np.nan)
        table["boundary_iou"][gj] = b_iou
        for j, i, b in zip(gj, pi, b_iou.tolist()):
            if b < boundary_threshold:
                case("poor_boundary", 1.0 - b, [j], [i], g_labels[j],
                     f"poor boundary on {_name(category_names, g_labels[j])}: boundary IoU {b:.2f} "
                     f"(mask IoU {iou[j, i]:.2f})", boundary_iou=float(b), iou=float(iou[j, i]))
    table.setdefault("boundary_iou", np.full(n, np.nan))
    return cases, table


@dataclass
class FailureReport:
    """All failures of a set of images.

    ``cases``: list of FailureCase; ``gt``: per-object table (dict of numpy arrays, see
    :func:`mine_image`, concatenated over images); ``params``: the mining thresholds;
    ``category_names``: {id: name}.
    """

    cases: list
    gt: dict
    params: dict
    category_names: dict = field(default_factory=dict)

    def counts(self) -> dict:
        """{kind: number of cases} for every kind."""
        return {k: sum(c.kind == k for c in self.cases) for k in KINDS}

    def ranked(self, num_cases: Optional[int] = None, kinds: Optional[Sequence[str]] = None, *,
               interleave: bool = True) -> list:
        """Cases by descending severity (ties: larger occlusion first). With ``interleave`` the kinds take
        turns (the worst of each kind, then the second worst, ...), so a short gallery shows every kind."""
        kinds = list(KINDS if kinds is None else kinds)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown failure kind(s) {sorted(unknown)}; kinds are {list(KINDS)}")

        def key(c):
            return (-c.severity, -(0.0 if math.isnan(c.occlusion) else c.occlusion), c.image_id)

        lists = [sorted((c for c in self.cases if c.kind == k), key=key) for k in kinds]
        if interleave:
            out = [c for row in _zip_longest(lists) for c in row]
        else:
            out = sorted((c for lst in lists for c in lst), key=key)
        return out[:num_cases] if num_cases is not None else out

    def statistics(self) -> dict:
        return failure_statistics(self.gt, self.cases, category_names=self.category_names,
                                  edges=self.params.get("occlusion_bins", OCCLUSION_BINS))

    def to_records(self) -> list[dict]:
        """Cases as plain dicts (JSON-able)."""
        return [asdict(c) for c in self.cases]


def _zip_longest(lists: list[list]) -> Iterable[list]:
    for i in range(max((len(x) for x in lists), default=0)):
        yield [x[i] for x in lists if i < len(x)]


def mine_failures(predictions: Sequence[Mapping], ground_truths: Sequence[Mapping], *, score_threshold: float = 0.3,
                  iou_threshold: float = 0.5, cover_threshold: float = 0.5, duplicate_iou: float = 0.7,
                  boundary_threshold: float = 0.5, dilation_ratio: float = 0.02,
                  occlusion_bins: Sequence[float] = OCCLUSION_BINS,
                  category_names: Optional[Mapping[int, str]] = None) -> FailureReport:
    """Mine every image that has ground truth (an image without predictions has only misses).

    Raises KeyError naming a prediction whose image_id has no ground truth.
    """
    by_id = {int(g["image_id"]): g for g in ground_truths}
    preds = {}
    for p in predictions:
        image_id = int(p["image_id"])
        if image_id not in by_id:
            raise KeyError(f"prediction for image_id={image_id}: no ground truth for that image")
        preds[image_id] = p
    params = dict(score_threshold=score_threshold, iou_threshold=iou_threshold, cover_threshold=cover_threshold,
                  duplicate_iou=duplicate_iou, boundary_threshold=boundary_threshold,
                  dilation_ratio=dilation_ratio, occlusion_bins=tuple(occlusion_bins))
    cases, tables = [], []
    for image_id, gt in by_id.items():
        empty = {"image_id": image_id, "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                 "labels": np.zeros(0, np.int64), "masks": []}
        c, t = mine_image(preds.get(image_id, empty), gt, category_names=category_names,
                          **{k: v for k, v in params.items() if k != "occlusion_bins"})
        cases += c
        tables.append(t)
    keys = tables[0].keys() if tables else ["image_id", "gt_index", "category_id", "area", "occlusion", "best_iou",
                                            "matched", *KINDS, "boundary_iou"]
    table = {k: np.concatenate([t[k] for t in tables]) if tables else np.zeros(0) for k in keys}
    return FailureReport(cases, table, params, dict(category_names or {}))


# ------------------------------------------------------------------------------------------- statistics
def _summary(t: dict, sel: np.ndarray) -> dict:
    n = int(sel.sum())
    row = {"objects": n}
    if not n:
        return {**row, "recall": math.nan, **{k: math.nan for k in KINDS}, "mean_best_iou": math.nan}
    row["recall"] = float(t["matched"][sel].mean())
    for k in KINDS:
        row[k] = float(t[k][sel].mean())  # share of the objects involved in such a failure
    row["mean_best_iou"] = float(t["best_iou"][sel].mean())
    return row


def failure_statistics(gt_table: Mapping[str, np.ndarray], cases: Sequence[FailureCase] = (), *,
                       category_names: Optional[Mapping[int, str]] = None,
                       edges: Sequence[float] = OCCLUSION_BINS) -> dict:
    """Rates over ground-truth objects: {"overall": row, "per_category": {name: row}, "by_occlusion":
    {"0-10%": row, ...}, "cases": {kind: count}} where a row is {objects, recall, missed, merged,
    duplicate, wrong_class, poor_boundary (shares of the objects involved), mean_best_iou}."""
    t = {k: np.asarray(v) for k, v in gt_table.items()}
    n = len(t.get("category_id", []))
    everything = np.ones(n, bool)
    per_cat = {_name(category_names, c): _summary(t, t["category_id"] == c)
               for c in sorted(set(t["category_id"].tolist()))} if n else {}
    bins = occlusion_bin(t["occlusion"], edges) if n else np.zeros(0, int)
    by_occ = {label: _summary(t, bins == b) for b, label in enumerate(bin_labels(edges))}
    return {"overall": _summary(t, everything), "per_category": per_cat, "by_occlusion": by_occ,
            "cases": {k: sum(c.kind == k for c in cases) for k in KINDS}}


def format_statistics(stats: Mapping) -> str:
    """Markdown tables (per category, per occlusion bin) of :func:`failure_statistics`."""
    cols = ["objects", "recall", *KINDS, "mean_best_iou"]

    def table(title: str, rows: Mapping[str, Mapping]) -> str:
        head = f"| {title} | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1) + "\n"
        body = "".join(f"| {name} | " + " | ".join(
            str(r[c]) if c == "objects" else ("-" if math.isnan(r[c]) else f"{r[c]:.2f}") for c in cols) + " |\n"
            for name, r in rows.items())
        return head + body

    return (table("category", {**stats["per_category"], "all": stats["overall"]}) + "\n"
            + table("occlusion", stats["by_occlusion"]))


def plot_statistics(stats: Mapping, *, kinds: Sequence[str] = ("missed", "merged", "wrong_class", "poor_boundary")):
    """Two bar charts: failure shares per occlusion bin and per category (with object counts). Returns Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, key, title in ((axes[0], "by_occlusion", "by occlusion of the object's box"),
                           (axes[1], "per_category", "per category")):
        rows = stats[key]
        names = list(rows)
        x = np.arange(len(names))
        width = 0.8 / (len(kinds) + 1)
        for i, kind in enumerate(["recall", *kinds]):
            vals = [rows[nm][kind] for nm in names]
            ax.bar(x + (i - len(kinds) / 2) * width, np.nan_to_num(vals), width, label=kind)
        ax.set_xticks(x, [f"{nm}\n(n={rows[nm]['objects']})" for nm in names], fontsize=7,
                      rotation=0 if key == "by_occlusion" else 30)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of objects")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------------- gallery
def _lookup(source: Any, image_id: int, what: str, default: Any = KeyError):
    if callable(source) and not isinstance(source, Mapping):
        return source(image_id)
    if isinstance(source, Mapping) and image_id in source:
        return source[image_id]
    if not isinstance(source, Mapping):
        for item in source:
            if int(item["image_id"]) == image_id:
                return item
    if default is KeyError:
        raise KeyError(f"failure_gallery: no {what} for image_id={image_id}")
    return default


def _subset(inst: Mapping, idx: Sequence[int]) -> dict:
    idx = np.asarray(idx, dtype=np.int64)
    out = {}
    for key in ("boxes", "labels", "scores", "query_index"):
        if inst.get(key) is not None:
            out[key] = as_numpy(inst[key])[idx]
    if inst.get("masks") is not None:
        rles = as_rles(inst["masks"])
        sel = [rles[i] for i in idx]
        out["masks"] = mask_utils.decode(sel).transpose(2, 0, 1).astype(bool) if sel else None
    return out


def failure_gallery(cases: Sequence[FailureCase], images: Any, predictions: Any, ground_truths: Any, *,
                    ncols: int = 4, category_names: Optional[Mapping[int, str]] = None, zoom: bool = True,
                    margin: float = 0.25, panel_size: float = 3.2):
    """A gallery of failure cases, in the given (ranked) order, the reason written on each panel.

    Args:
        cases: e.g. ``report.ranked(8)``.
        images: image_id -> image (callable or mapping; any form ``to_uint8_image`` takes).
        predictions / ground_truths: per-image dicts (a list, or a mapping by image_id).
        zoom: crop each panel to the objects involved (plus ``margin`` of their extent).
    Each panel shows the objects involved as ground truth (dashed boxes, outlined masks) and the
    predictions involved (filled masks, with their scores). Returns the Figure.
    """
    import matplotlib.pyplot as plt

    n = max(len(cases), 1)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, (panel_size + 0.5) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for rank, (ax, c) in enumerate(zip(axes.flat, cases), start=1):
        gt = _subset(_lookup(ground_truths, c.image_id, "ground truth"), c.gt)
        none = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "scores": np.zeros(0)}
        pred = _subset(_lookup(predictions, c.image_id, "predictions", none), c.pred)  # an image may have none
        drawn = draw_instances(_lookup(images, c.image_id, "image"), pred, ground_truth=gt, ax=ax,
                               category_names=category_names, fontsize=6)
        if zoom and (len(c.gt) or len(c.pred)):
            boxes = np.concatenate([gt["boxes"].reshape(-1, 4), pred["boxes"].reshape(-1, 4)])
            x0, y0 = boxes[:, :2].min(0)
            x1, y1 = boxes[:, 2:].max(0)
            H, W = drawn.image.shape[:2]
            mx, my = margin * max(x1 - x0, 8), margin * max(y1 - y0, 8)
            ax.set_xlim(max(x0 - mx, -0.5), min(x1 + mx, W - 0.5))
            ax.set_ylim(min(y1 + my, H - 0.5), max(y0 - my, -0.5))
        lines = [f"#{rank} {c.kind} · image {c.image_id} · severity {c.severity:.2f}",
                 *textwrap.wrap(c.reason, width=int(panel_size * 14))]
        ax.set_title("\n".join(lines), fontsize=6.5)
    fig.tight_layout()
    return fig


def ground_truths_from_dataset(dataset, indices: Optional[Iterable[int]] = None) -> list[dict]:
    """Ground-truth dicts (masks as COCO RLEs) of raw-dataset items (CocoInstances without transforms)."""
    from .predictor import ground_truth

    out = []
    for i in (range(len(dataset)) if indices is None else indices):
        g = ground_truth(dataset[i][1])
        g["masks"] = as_rles(g["masks"])
        out.append(g)
    return out


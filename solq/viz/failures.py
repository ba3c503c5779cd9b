"""Failure-case mining over a validation set (paper Fig. 6, Appendix A.5), with statistics and galleries.

Per image, the rules of ``solq.viz.failure_kinds`` (missed, merged, duplicate, wrong class, poor boundary)
over the predictions above a score threshold and the non-crowd ground truth; here they run over a whole set
(``mine_failures``), give statistics per category and per occlusion bin, and draw galleries.

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
from .failure_kinds import KINDS, FailureCase, _name, mine_image
from .overlaps import OCCLUSION_BINS, as_rles, bin_labels, occlusion, occlusion_bin, pairwise_iou
from .predictor import ground_truth

__all__ = ["KINDS", "OCCLUSION_BINS", "FailureCase", "FailureReport", "as_rles", "pairwise_iou", "occlusion",
           "occlusion_bin", "mine_image", "mine_failures", "failure_statistics", "format_statistics",
           "plot_statistics", "failure_gallery", "ground_truths_from_dataset"]

# ------------------------------------------------------------------------------------------- mining
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
    out = []
    for i in (range(len(dataset)) if indices is None else indices):
        g = ground_truth(dataset[i][1])
        g["masks"] = as_rles(g["masks"])
        out.append(g)
    return out


"""Side-by-side galleries of two models on the same images (paper Fig. 3 and Fig. 5: SQR vs UQR).

Each row is one image: optionally its ground truth, then model A's and model B's detections above the
score threshold (or, when a model has none there, its few best ones, said so in the panel title, so that a
panel is never empty without a reason). With ground truth, each panel's title gives the model's mean mask IoU over the
objects (best-matching detection of the same class, 0 when none), so a gallery can be read at a glance.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .draw import as_numpy, draw_instances, select, threshold_summary
from .overlaps import pairwise_iou

__all__ = ["matched_iou", "compare_gallery", "compare_predictors"]


def matched_iou(prediction: Mapping[str, Any], gt: Mapping[str, Any], *, score_threshold: float = 0.0) -> float:
    """Mean over the (non-crowd) ground-truth objects of the best mask IoU with a same-class detection
    scoring >= ``score_threshold`` (box IoU for detections without masks); NaN without objects."""
    crowd = as_numpy(gt["iscrowd"]).astype(bool) if gt.get("iscrowd") is not None else None
    keep_g = np.flatnonzero(~crowd) if crowd is not None else np.arange(len(as_numpy(gt["labels"])))
    if not len(keep_g):
        return float("nan")
    sel, idx = select(prediction, score_threshold)
    if not len(idx):
        return 0.0
    use_masks = sel.get("masks") is not None and gt.get("masks") is not None
    if use_masks:
        g_masks = as_numpy(gt["masks"])[keep_g] if not isinstance(gt["masks"], list) else \
            [gt["masks"][j] for j in keep_g]
        iou = pairwise_iou(g_masks, sel["masks"])
    else:
        iou = pairwise_iou(as_numpy(gt["boxes"])[keep_g], sel["boxes"], boxes=True)
    same = as_numpy(gt["labels"])[keep_g][:, None] == sel["labels"][None, :]
    return float(np.where(same, iou, 0.0).max(1).mean())


def compare_gallery(images: Sequence[Any], predictions_a: Sequence[Mapping], predictions_b: Sequence[Mapping], *,
                    names: tuple[str, str] = ("SQR", "UQR"), ground_truths: Optional[Sequence[Mapping]] = None,
                    score_threshold: float = 0.5, category_names: Optional[Mapping[int, str]] = None,
                    panel_size: float = 3.2, show_boxes: bool = True, fallback_topk: int = 3):
    """Rows: images; columns: [ground truth,] model A, model B.

    Args:
        images: the original images (any form ``to_uint8_image`` takes).
        predictions_a / predictions_b: one result dict per image (``Predictor`` output or prediction dicts).
        ground_truths: optional ground-truth dicts per image (adds a column and the mean-IoU titles).
        fallback_topk: a model with no detection >= ``score_threshold`` on an image gets its best this many
            drawn instead, titled e.g. "UQR: none ≥ 0.30 · showing top 3 (best 0.12)"; 0 leaves the panel
            empty (titled "UQR: none ≥ 0.30 (best 0.12)").
    Returns (Figure, rows) where rows[i] = {name: {"detections": n drawn >= the threshold, "fallback": n
    below-threshold instances drawn instead (0 unless none reached it), "mean_iou": float or NaN}}; the
    mean IoU counts only detections >= the threshold, fallback or not.
    """
    import matplotlib.pyplot as plt

    if not (len(images) == len(predictions_a) == len(predictions_b)):
        raise ValueError(f"compare_gallery: {len(images)} images but {len(predictions_a)} and "
                         f"{len(predictions_b)} prediction sets")
    if ground_truths is not None and len(ground_truths) != len(images):
        raise ValueError(f"compare_gallery: {len(images)} images but {len(ground_truths)} ground truths")
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")
    with_gt = ground_truths is not None
    ncols = 2 + with_gt
    nrows = max(len(images), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False)
    rows = []
    for r, image in enumerate(images):
        col, row = 0, {}
        if with_gt:
            d = draw_instances(image, ground_truths[r], ax=axes[r, 0], style="gt", category_names=category_names,
                               show_boxes=show_boxes)
            axes[r, 0].set_title(f"ground truth ({d.count})", fontsize=8)
            col = 1
        for name, preds, ax in ((names[0], predictions_a[r], axes[r, col]),
                                (names[1], predictions_b[r], axes[r, col + 1])):
            d = draw_instances(image, preds, ax=ax, score_threshold=score_threshold, category_names=category_names,
                               show_boxes=show_boxes, fallback_topk=fallback_topk)
            miou = matched_iou(preds, ground_truths[r], score_threshold=score_threshold) if with_gt else float("nan")
            row[name] = {"detections": d.above_threshold, "fallback": d.count - d.above_threshold, "mean_iou": miou}
            ax.set_title(f"{name}: {threshold_summary(d, score_threshold)}"
                         + (f" · mean IoU {miou:.2f}" if with_gt else ""), fontsize=8)
        rows.append(row)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig, rows


def compare_predictors(predictor_a, predictor_b, images: Sequence[Any], **kwargs):
    """Run two ``Predictor``s on the same images and draw :func:`compare_gallery` (names from the
    predictors unless given; other keyword arguments, e.g. ``score_threshold`` or ``fallback_topk``, go to
    it). Returns (Figure, rows)."""
    kwargs.setdefault("names", (predictor_a.name, predictor_b.name))
    kwargs.setdefault("category_names", predictor_a.category_names or predictor_b.category_names)
    preds_a = [predictor_a(im) for im in images]
    preds_b = [predictor_b(im) for im in images]
    return compare_gallery(images, preds_a, preds_b, **kwargs)

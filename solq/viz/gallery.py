"""A gallery of one model's predictions over the ground truth (the notebooks' ``predictions.png``).

Each panel is one image: filled masks, boxes, class names and scores of the detections above the score
threshold, over the ground-truth outlines. An image where no detection reaches the threshold shows its few
best ones instead and says so in the title (e.g. "image 3: none ≥ 0.30 · showing top 3 (best 0.12)"), so a
gallery of an undertrained model is never a grid of blank panels without a reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .draw import draw_instances, threshold_summary
from .predictor import Predictor, ground_truth, raw_dataset

__all__ = ["draw_gallery", "prediction_gallery"]


def draw_gallery(images: Sequence[Any], predictions: Sequence[Optional[Mapping]], *,
                 ground_truths: Optional[Sequence[Mapping]] = None, labels: Optional[Sequence[str]] = None,
                 score_threshold: float = 0.3, category_names: Optional[Mapping[int, str]] = None,
                 columns: int = 2, panel_size: float = 3.2, fallback_topk: int = 3):
    """Draw each image with its predictions (and ground truth) in a grid of ``columns`` panels.

    Args:
        images: any form ``to_uint8_image`` takes. predictions: one instances dict per image (None: none).
        ground_truths: optional ground-truth dicts per image, drawn as outlines and counted in the title.
        labels: panel title prefixes (default "image {i}").
        fallback_topk: an image with no detection >= ``score_threshold`` gets its best this many drawn
            instead, said so in its title; 0 leaves it empty (the title still gives the best score).
    Returns (Figure, rows) where rows[i] = {"detections": n drawn >= the threshold, "fallback": n
    below-threshold instances drawn instead (0 unless none reached it)} plus "objects" (ground-truth count)
    with ``ground_truths``.
    """
    import matplotlib.pyplot as plt

    if len(predictions) != len(images):
        raise ValueError(f"draw_gallery: {len(images)} images but {len(predictions)} prediction sets")
    for what, seq in (("ground truths", ground_truths), ("labels", labels)):
        if seq is not None and len(seq) != len(images):
            raise ValueError(f"draw_gallery: {len(images)} images but {len(seq)} {what}")
    n = len(images)
    cols = max(1, min(columns, n))
    nrows = max(1, -(-n // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(panel_size * cols, panel_size * nrows), squeeze=False)
    rows = []
    for i, (image, pred) in enumerate(zip(images, predictions)):
        gt = ground_truths[i] if ground_truths is not None else None
        ax = axes.flat[i]
        drawn = draw_instances(image, pred, score_threshold=score_threshold, ax=ax, ground_truth=gt,
                               category_names=category_names, fallback_topk=fallback_topk)
        row = {"detections": drawn.above_threshold, "fallback": drawn.count - drawn.above_threshold}
        title = f"{labels[i] if labels is not None else f'image {i}'}: {threshold_summary(drawn, score_threshold)}"
        if gt is not None:
            row["objects"] = len(gt["labels"])
            title += f" ({row['objects']} objects)"
        ax.set_title(title, fontsize=8)
        rows.append(row)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig, rows


def prediction_gallery(checkpoint: str | Path, *, overrides: Sequence[str] = (), num_images: int = 4,
                       score_threshold: float = 0.3, device: str = "cpu", columns: int = 2, panel_size: float = 3.2,
                       fallback_topk: int = 3):
    """Draw a model's predictions (filled masks, boxes, class and score) over the ground-truth outlines
    for the first ``num_images`` validation images of its config (with ``overrides``); see
    :func:`draw_gallery` for ``fallback_topk``. (``solq.workbench.experiment`` re-exports it.)

    Returns (matplotlib Figure, rows) where rows[i] = {"image_id", "detections" (drawn, >= the threshold),
    "objects" (ground truth), "fallback" (below-threshold instances drawn instead)}.
    """
    predictor = Predictor.from_checkpoint(checkpoint, device=device, overrides=overrides)
    dataset = raw_dataset(predictor.cfg, "val", max_images=num_images)
    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    gts = [ground_truth(target) for _, target in items]
    fig, rows = draw_gallery([image for image, _ in items], [predictor(image) for image, _ in items],
                             ground_truths=gts, labels=[f"image {g['image_id']}" for g in gts],
                             score_threshold=score_threshold, category_names=predictor.category_names,
                             columns=columns, panel_size=panel_size, fallback_topk=fallback_topk)
    rows = [{"image_id": g["image_id"], "detections": r["detections"], "objects": r["objects"],
             "fallback": r["fallback"]} for g, r in zip(gts, rows)]
    return fig, rows

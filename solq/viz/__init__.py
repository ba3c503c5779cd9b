"""solq.viz: looking inside the model (paper Figs. 3-6, Appendix A.3/A.5).

- ``draw`` — :func:`draw_instances` (masks, boxes, names, scores, stable colours, threshold; predictions
  and ground truth) on numpy/tensor/PIL images, rasterised or onto a matplotlib Axes.
- ``predictor`` — :class:`Predictor` (single-image inference with decoder attention; from a checkpoint
  or run folder), :func:`raw_dataset`, :func:`ground_truth`.
- ``attention`` — decoder sampling locations per layer/level/head (Fig. 4), :func:`attention_on_outline`.
- ``failures`` — failure mining (missed, merged, duplicate/siamese, wrong class, poor boundary; Fig. 6),
  statistics per category and occlusion level, ranked galleries.
- ``compare`` — two models side by side (UQR vs SQR, Figs. 3/5).
- ``gallery`` — one model's predictions over the ground truth (the notebooks' ``predictions.png``).
  Galleries and the explorer draw an image's best few detections, saying so, when none reaches the threshold.
- ``codes`` — DCT coefficient maps and reconstructions as n_k grows.
- ``curves`` — training curves from ``log.jsonl``; precision-recall curves from COCOeval.
- ``explorer`` — :class:`Explorer`, an ipywidgets UI (import it explicitly: ``from solq.viz import Explorer``).
"""
from .attention import (attention_on_outline, attention_points, plot_decoder_attention, plot_query_attention,
                        queries_for_objects, query_detection, top_queries)
from .codes import coefficient_grid, plot_mask_code, progressive_reconstructions, reconstruction_iou
from .compare import compare_gallery, compare_predictors, matched_iou
from .curves import plot_ap_curves, plot_precision_recall, plot_training_curves, precision_recall, read_log
from .draw import PALETTE, Drawn, denormalize, draw_instances, instance_colors, threshold_summary, to_uint8_image
from .failures import (KINDS, FailureCase, FailureReport, failure_gallery, failure_statistics, format_statistics,
                       ground_truths_from_dataset, mine_failures, mine_image, occlusion, pairwise_iou,
                       plot_statistics)
from .gallery import draw_gallery, prediction_gallery
from .predictor import Predictor, ground_truth, raw_dataset, resolve_checkpoint

__all__ = [
    "PALETTE", "Drawn", "denormalize", "draw_instances", "instance_colors", "threshold_summary", "to_uint8_image",
    "Predictor", "ground_truth", "raw_dataset", "resolve_checkpoint",
    "attention_on_outline", "attention_points", "plot_decoder_attention", "plot_query_attention",
    "queries_for_objects", "query_detection", "top_queries",
    "KINDS", "FailureCase", "FailureReport", "failure_gallery", "failure_statistics", "format_statistics",
    "ground_truths_from_dataset", "mine_failures", "mine_image", "occlusion", "pairwise_iou", "plot_statistics",
    "compare_gallery", "compare_predictors", "matched_iou", "draw_gallery", "prediction_gallery",
    "coefficient_grid", "plot_mask_code", "progressive_reconstructions", "reconstruction_iou",
    "plot_ap_curves", "plot_precision_recall", "plot_training_curves", "precision_recall", "read_log",
    "Explorer",
]


def __getattr__(name):  # ipywidgets is imported only when the explorer is used
    if name == "Explorer":
        from .explorer import Explorer

        return Explorer
    raise AttributeError(f"module 'solq.viz' has no attribute {name!r}")

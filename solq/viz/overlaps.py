"""Overlaps between instance masks and boxes, and occlusion, for the failure mining and galleries.

Masks are handled as COCO RLEs (``pycocotools.mask.iou`` / ``area``): no pixel loops, and predictions kept
compact. Occlusion of an object = share of its box covered by the other objects' masks.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from solq.evaluation import masks_to_rle

from .draw import as_numpy

__all__ = ["OCCLUSION_BINS", "as_rles", "pairwise_iou", "intersections", "occlusion", "occlusion_bin", "bin_labels"]

OCCLUSION_BINS = (0.0, 0.1, 0.3, 0.5, 1.0)  # edges; the last bin includes 1.0


def as_rles(masks: Any) -> list[dict]:
    """COCO RLEs from bool masks [K,H,W] (numpy/torch), a list of RLE dicts, or an object with ``.rles``."""
    if masks is None:
        return []
    if hasattr(masks, "rles"):
        return list(masks.rles)
    if isinstance(masks, list) and (not masks or isinstance(masks[0], dict)):
        return masks
    m = as_numpy(masks).astype(bool)
    if m.ndim != 3:
        raise ValueError(f"masks: expected [K,H,W], got shape {m.shape}")
    return masks_to_rle(m) if len(m) else []


def pairwise_iou(a: Any, b: Any, *, boxes: bool = False) -> np.ndarray:
    """IoU of every item of ``a`` with every item of ``b``: float64 [len(a), len(b)].

    Masks (any form :func:`as_rles` takes) via ``pycocotools.mask.iou``; with ``boxes=True``, xyxy boxes
    [n,4] via ``torchvision.ops.box_iou``.
    """
    if boxes:
        import torch
        from torchvision.ops import box_iou

        ta = torch.as_tensor(as_numpy(a), dtype=torch.float64).reshape(-1, 4)
        tb = torch.as_tensor(as_numpy(b), dtype=torch.float64).reshape(-1, 4)
        return box_iou(ta, tb).numpy()
    ra, rb = as_rles(a), as_rles(b)
    if not ra or not rb:
        return np.zeros((len(ra), len(rb)))
    return np.asarray(mask_utils.iou(ra, rb, [0] * len(rb)), dtype=np.float64).reshape(len(ra), len(rb))


def intersections(iou: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """Pixel intersections from IoU and areas: I = IoU (|A| + |B|) / (1 + IoU)."""
    return iou * (area_a[:, None] + area_b[None, :]) / (1.0 + iou)


def occlusion(masks: Any, boxes: Any) -> np.ndarray:
    """Fraction of each object's box covered by the other objects' masks: bool [n,H,W], xyxy [n,4] -> [n].

    Box sums are separable: sum over rows and columns of the box of (covered by another mask), as one
    einsum over all objects.
    """
    m = as_numpy(masks).astype(bool)
    b = as_numpy(boxes).astype(np.float64).reshape(-1, 4)
    n = len(m)
    if n == 0:
        return np.zeros(0)
    count = m.sum(0, dtype=np.int32)
    others = (count[None] - m) > 0  # [n,H,W]: covered by some other object
    H, W = m.shape[1:]
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5  # pixel centres
    rows = ((ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])).astype(np.float64)  # [n,H]
    cols = ((xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])).astype(np.float64)  # [n,W]
    covered = np.einsum("nh,nhw,nw->n", rows, others.astype(np.float64), cols)
    area = rows.sum(1) * cols.sum(1)
    return np.where(area > 0, covered / np.maximum(area, 1), 0.0)


def occlusion_bin(values: Any, edges: Sequence[float] = OCCLUSION_BINS) -> np.ndarray:
    """Bin index of each occlusion value (the last bin includes its upper edge): int [n]."""
    v = np.asarray(values, dtype=np.float64)
    return np.clip(np.searchsorted(np.asarray(edges), v, side="right") - 1, 0, len(edges) - 2)


def bin_labels(edges: Sequence[float]) -> list[str]:
    return [f"{100 * lo:.0f}-{100 * hi:.0f}%" for lo, hi in zip(edges[:-1], edges[1:])]

"""Boundary IoU and Boundary AP (Cheng et al., "Boundary IoU", CVPR 2021; the SOLQ paper's Table 4).

The boundary band of a binary mask G is ``G_d ∩ G``: the mask pixels within Chebyshev distance d of the
background, i.e. the mask minus its erosion by a (2d+1)x(2d+1) square. Pixels outside the image count as
background, so a mask cut by the image border has a band along that border too. As in the authors' API,
``d = max(1, round(dilation_ratio * image_diagonal))`` (Python rounding) with dilation_ratio = 0.02.

Boundary IoU = |band(G) ∩ band(P)| / |band(G) ∪ band(P)|. Boundary AP is COCO mask AP where the IoU of a
detection with a non-crowd ground truth is ``min(mask IoU, boundary IoU)`` (what the authors' API and the
papers' numbers use: for small objects the band is the whole mask anyway, and the min keeps a detection
that is only a thin ring from scoring well); crowd ground truths keep COCO's crowd mask IoU. Object sizes for
APs/APm/APl stay the mask areas.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco_eval import (_check_mask_sizes, _load_results, _private_gt, _to_numpy,
                        masks_to_rle, predictions_to_coco_results, run_cocoeval, select_image_ids)

__all__ = ["boundary_dilation", "boundary_band", "boundary_iou", "BoundaryCOCOeval", "evaluate_boundary_ap"]

COMBINE_MODES = ("min", "boundary")


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """The band width d in pixels for an image of the given size: max(1, round(ratio * diagonal))."""
    if dilation_ratio <= 0:
        raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
    return max(1, int(round(dilation_ratio * math.sqrt(height ** 2 + width ** 2))))


def _as_bool_masks(masks: Any) -> torch.Tensor:
    """[K,H,W] / [K,1,H,W] / [H,W] bool or numeric (thresholded at 0.5), torch or numpy -> bool tensor [K,H,W]
    (no copy for a bool tensor or a bool numpy array)."""
    m = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"expected masks of shape [K,H,W] or [H,W], got {tuple(m.shape)}")
    return m if m.dtype == torch.bool else m > 0.5


def _window_all(x: torch.Tensor, dim: int, d: int) -> torch.Tensor:
    """out[i] = all(x[i-d .. i+d]) along ``dim`` with out-of-range positions False; same shape as x (bool).

    Doubling: a window of 2s ones is the AND of two shifted windows of s, so a window of k = 2d+1 costs
    ~log2(k)+1 whole-array ANDs whatever d is (repeated 3x3 erosion would cost d).
    """
    k = 2 * d + 1
    if k > x.shape[dim]:  # every window pokes out of the array: nothing survives (and no huge padding)
        return torch.zeros_like(x)
    pad_shape = list(x.shape)
    pad_shape[dim] = d
    pad = x.new_zeros(pad_shape)
    a = torch.cat([pad, x, pad], dim)  # a[j] covers x[j-d]
    s = 1
    while 2 * s <= k:  # invariant: a[j] = all over padded [j, j+s)
        n = a.shape[dim] - s
        a = a.narrow(dim, 0, n) & a.narrow(dim, s, n)
        s *= 2
    n = x.shape[dim]
    return a.narrow(dim, 0, n) & a.narrow(dim, k - s, n)  # two overlapping windows of s cover [j, j+k)


def _band(m: torch.Tensor, d: int) -> torch.Tensor:
    """bool [K,H,W] masks -> their bands [K,H,W] for a band width of d pixels."""
    band = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
    if m.shape[0] == 0:
        return band
    # [H,W] union of the masks; uint8 max rather than bool any(), which is ~50x slower on CPU
    occupied = m.view(torch.uint8).amax(0)
    rows, cols = occupied.amax(1).nonzero(), occupied.amax(0).nonzero()  # [n,1] indices of non-empty lines
    if len(rows):
        # Outside the masks' union box every mask is background, exactly like outside the image, so the
        # erosion can run on that crop alone (often a small part of the image).
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        crop = m[:, y0:y1, x0:x1]
        # erosion by a (2d+1)^2 square is separable: rows, then columns
        band[:, y0:y1, x0:x1] = crop & ~_window_all(_window_all(crop, 1, d), 2, d)
    return band


def boundary_band(masks: Any, dilation_ratio: float = 0.02, *, dilation: int | None = None):
    """The inner boundary band of each mask: pixels of the mask within d pixels (Chebyshev) of the background.

    Args:
        masks: bool (or numeric, thresholded at 0.5) [K,H,W] or [H,W]; torch tensor (any device) or numpy array.
        dilation_ratio: d = max(1, round(dilation_ratio * sqrt(H^2 + W^2))).
        dilation: explicit d in pixels (overrides dilation_ratio).
    Returns:
        bool [K,H,W] (or [H,W] for a 2-D input), a torch tensor on the input's device, or a numpy array when
        the input was numpy.
    """
    is_numpy = not isinstance(masks, torch.Tensor)
    squeeze = np.ndim(masks) == 2
    m = _as_bool_masks(masks)
    h, w = m.shape[-2:]
    d = boundary_dilation(h, w, dilation_ratio) if dilation is None else int(dilation)
    if d < 1:
        raise ValueError(f"dilation must be >= 1 pixel, got {d}")
    if m.shape[0] > 0 and m.stride(-2) < m.stride(-1):
        # column-major masks (pycocotools decode, Fortran numpy arrays): the band of the transpose is the
        # transposed band (square window, same d), and strided reductions/ANDs are many times slower
        band = _band(m.transpose(1, 2), d).transpose(1, 2)
    else:
        band = _band(m, d)
    if squeeze:
        band = band[0]
    return band.cpu().numpy() if is_numpy else band


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every mask of a [Ka,H,W] with every mask of b [Kb,H,W] (bool) -> float [Ka,Kb]; 0 if both empty."""
    a, b = a.flatten(1), b.flatten(1)
    # float32 sums of 0/1 products are exact up to 2^24 pixels; beyond that count in float64
    dtype = torch.float32 if a.shape[1] < 2 ** 24 else torch.float64
    fa, fb = a.to(dtype), b.to(dtype)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def boundary_iou(gt: Any, dt: Any, dilation_ratio: float = 0.02, *, dilation: int | None = None):
    """Boundary IoU between ground-truth and predicted masks of the same image.

    Args:
        gt: bool [H,W] or [K_gt,H,W]; dt: bool [H,W] or [K_dt,H,W] (torch or numpy, same H, W).
        dilation_ratio / dilation: as in ``boundary_band`` (d depends on the image size H, W).
    Returns:
        a float when both are 2-D, else the pairwise matrix [K_dt, K_gt] (torch float, or numpy if gt is
        numpy). 0 where both bands are empty.
    """
    g, p = _as_bool_masks(gt), _as_bool_masks(dt)
    if g.shape[-2:] != p.shape[-2:]:
        raise ValueError(f"boundary_iou: gt masks are {tuple(g.shape[-2:])} but dt masks are "
                         f"{tuple(p.shape[-2:])} (H, W)")
    p = p.to(g.device)
    ious = _pairwise_iou(boundary_band(p, dilation_ratio, dilation=dilation),
                         boundary_band(g, dilation_ratio, dilation=dilation))
    if np.ndim(gt) == 2 and np.ndim(dt) == 2:
        return float(ious[0, 0])
    return ious.cpu().numpy() if not isinstance(gt, torch.Tensor) else ious


class BoundaryCOCOeval(COCOeval):
    """pycocotools ``COCOeval`` (iouType "segm") whose IoU is the Boundary AP one.

    Every non-crowd annotation of the GT and the result COCO objects that can be matched must carry a
    ``"boundary"`` RLE (its boundary band); ``evaluate_boundary_ap`` adds them.

    Args:
        combine: "min" (Boundary AP as defined by Cheng et al.: min(mask IoU, boundary IoU)) or "boundary"
            (boundary IoU alone). Crowd GTs use COCO's crowd mask IoU either way.
    """

    def __init__(self, coco_gt: COCO, coco_dt: COCO, *, combine: str = "min"):
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode '{combine}'; expected one of {COMBINE_MODES}")
        super().__init__(coco_gt, coco_dt, iouType="segm")
        self.combine = combine

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        """IoU matrix [D, G] of the (score-sorted, maxDets-capped) detections vs the GTs of one image/category."""
        p = self.params
        cat_ids = [catId] if p.useCats else p.catIds
        gt = [g for c in cat_ids for g in self._gts[imgId, c]]
        dt = [d for c in cat_ids for d in self._dts[imgId, c]]
        if not gt or not dt:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")[:p.maxDets[-1]]
        dt = [dt[i] for i in order]
        crowd = np.array([bool(g["iscrowd"]) for g in gt])
        ious = np.asarray(mask_utils.iou([d["segmentation"] for d in dt], [g["segmentation"] for g in gt],
                                         crowd.astype(np.uint8).tolist()), dtype=np.float64)
        keep = np.flatnonzero(~crowd)
        if len(keep):
            try:
                gb = [gt[j]["boundary"] for j in keep]
                db = [d["boundary"] for d in dt]
            except KeyError as e:
                raise KeyError(f"image_id={imgId}: an annotation has no 'boundary' RLE (use "
                               f"evaluate_boundary_ap, which adds them)") from e
            b = np.asarray(mask_utils.iou(db, gb, [0] * len(keep)), dtype=np.float64).reshape(len(dt), len(keep))
            ious[:, keep] = np.minimum(ious[:, keep], b) if self.combine == "min" else b
        return ious


def _add_gt_boundaries(gt: COCO, image_ids: Iterable[int], dilation_ratio: float) -> None:
    """Attach ``"boundary"`` RLEs to the non-crowd GT annotations of the given images (one batch per image)."""
    for image_id in image_ids:
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        rles = []
        for a in anns:
            try:
                rles.append(gt.annToRLE(a))
            except Exception as e:  # malformed segmentation: name the annotation
                raise ValueError(f"image_id={image_id}: annotation id={a.get('id')} has an unreadable "
                                 f"segmentation") from e
        masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).bool()  # Fortran [H,W,N] -> [N,H,W]
        for ann, rle in zip(anns, masks_to_rle(boundary_band(masks, dilation_ratio))):
            ann["boundary"] = rle


def evaluate_boundary_ap(coco_gt: COCO | str | Path, predictions: Sequence[dict], *, dilation_ratio: float = 0.02,
                         combine: str = "min", image_ids: Iterable[int] | None = None, verbose: bool = False,
                         return_evaluator: bool = False):
    """Boundary AP of instance masks (COCO mask AP with the Boundary IoU of Cheng et al. 2021).

    Args:
        coco_gt: ground-truth ``COCO`` object (crowd annotations included) or instances JSON path; not modified.
        predictions: per-image dicts ``{image_id, scores [K], labels [K] category ids, masks bool [K,H,W] at the
            original size}`` as for ``evaluate_coco`` (torch on any device, or numpy; boxes are not needed).
        dilation_ratio: band width d = max(1, round(dilation_ratio * image diagonal)) pixels.
        combine: "min" (the official Boundary AP) or "boundary" (boundary IoU alone); see ``BoundaryCOCOeval``.
        image_ids, verbose: as in ``evaluate_coco``.
        return_evaluator: also return the ``BoundaryCOCOeval`` (``.eval["precision"]`` is [T,R,K,A,M]).
    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}`` as
        fractions in [0, 1] (-1.0 where undefined), the same keys as ``evaluate_coco(...)["segm"]``;
        with return_evaluator, ``(that dict, evaluator)``.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode '{combine}'; expected one of {COMBINE_MODES}")
    gt = _private_gt(coco_gt)
    predictions = list(predictions)
    image_ids = select_image_ids(gt, predictions, image_ids)
    _check_mask_sizes(gt, predictions)
    dt = _load_results(gt, predictions_to_coco_results(predictions, "segm"), "segm")

    # predictions_to_coco_results emits the K detections of each prediction in order and _load_results keeps
    # that order, so the bands can be attached by position.
    dt_anns = dt.dataset["annotations"]
    pos = 0
    for pred in predictions:
        k = _to_numpy(pred["scores"]).size
        if k == 0:
            continue
        for ann, rle in zip(dt_anns[pos:pos + k], masks_to_rle(boundary_band(_as_bool_masks(pred["masks"]),
                                                                           dilation_ratio))):
            ann["boundary"] = rle
        pos += k
    detected = {a["image_id"] for a in dt_anns}
    _add_gt_boundaries(gt, [i for i in image_ids if i in detected], dilation_ratio)

    evaluator = BoundaryCOCOeval(gt, dt, combine=combine)
    title = f"IoU metric: boundary (dilation_ratio={dilation_ratio}, combine={combine})"
    stats = run_cocoeval(evaluator, image_ids, title if verbose else None)
    return (stats, evaluator) if return_evaluator else stats

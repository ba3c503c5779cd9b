"""COCO box and mask evaluation with pycocotools (as in the authors' release).

Predictions are per-image dicts ``{image_id, boxes [K,4] xyxy absolute, scores [K], labels [K] category ids,
masks bool [K,H,W] at the original image size}`` (torch tensors or numpy arrays). They are converted to COCO
result entries (masks to compressed RLE, one batched ``pycocotools.mask.encode`` call per image), loaded into a
result ``COCO`` object and scored with ``COCOeval``; the 12 standard numbers come back under readable names.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from solq.files import write_text_atomic

__all__ = ["COCO_STAT_NAMES", "IOU_TYPES", "evaluate_coco", "masks_to_rle", "predictions_to_coco_results",
           "write_results_json", "format_table"]

# Order of COCOeval.stats for bbox/segm (COCOeval.summarize).
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like -> numpy array (no copy when already numpy on CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def masks_to_rle(masks: Any) -> list[dict]:
    """Encode masks as COCO compressed RLE in one batched call.

    Args:
        masks: [K,H,W] (or [K,1,H,W]) bool, or numeric thresholded at 0.5; torch tensor or numpy.
    Returns:
        K dicts ``{"size": [H, W], "counts": str}`` (counts decoded to utf-8 so they are JSON-serialisable).
    """
    m = _to_numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"masks_to_rle: expected masks of shape [K,H,W], got {tuple(m.shape)}")
    if m.shape[0] == 0:
        return []
    if m.dtype != np.bool_:
        m = m > 0.5
    # pycocotools wants a Fortran-ordered uint8 [H,W,K]: a C-ordered [K,W,H] transposed is exactly that,
    # so a single copy does both the dtype conversion and the layout change.
    fortran = np.ascontiguousarray(m.transpose(0, 2, 1), dtype=np.uint8).transpose(2, 1, 0)
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


def _image_id(pred: dict) -> int:
    """The image id of a prediction dict as a Python int (it may be an int, a 0-d tensor or an array)."""
    return int(_to_numpy(pred["image_id"]).reshape(-1)[0])


def _check_prediction(pred: dict, index: int, iou_type: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Validate one per-image prediction; returns (image_id, scores float [K], labels int [K])."""
    for key in ("image_id", "scores", "labels") + (("boxes",) if iou_type == "bbox" else ("masks",)):
        if key not in pred:
            raise KeyError(f"prediction #{index} (image_id={pred.get('image_id')}): missing key '{key}' "
                           f"needed for iou type '{iou_type}'")
    image_id = _image_id(pred)
    scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
    labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
    if len(scores) != len(labels):
        raise ValueError(f"prediction for image_id={image_id}: {len(scores)} scores but {len(labels)} labels")
    return image_id, scores, labels


def predictions_to_coco_results(predictions: Iterable[dict], iou_type: str) -> list[dict]:
    """Per-image predictions -> flat list of COCO result entries for one iou type.

    bbox entries: ``{image_id, category_id, bbox [x,y,w,h], score}``; segm entries:
    ``{image_id, category_id, segmentation (compressed RLE), score}`` (no bbox, so that ``loadRes`` takes the
    mask area, as the reference does). Images with zero detections contribute nothing.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou type '{iou_type}'; expected one of {IOU_TYPES}")
    results: list[dict] = []
    for index, pred in enumerate(predictions):
        image_id, scores, labels = _check_prediction(pred, index, iou_type)
        k = len(scores)
        if iou_type == "bbox":
            boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4) if k else np.zeros((0, 4))
            if len(boxes) != k:
                raise ValueError(f"prediction for image_id={image_id}: {len(boxes)} boxes but {k} scores")
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            results.extend({"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                           for c, b, s in zip(labels.tolist(), boxes.tolist(), scores.tolist()))
        else:
            masks = pred["masks"]
            rles = masks_to_rle(masks) if k else []
            if len(rles) != k:
                raise ValueError(f"prediction for image_id={image_id}: {len(rles)} masks but {k} scores")
            results.extend({"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                           for c, r, s in zip(labels.tolist(), rles, scores.tolist()))
    return results


def _load_results(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """Build the result COCO object as ``COCO.loadRes`` does, but batched and valid for an empty list.

    bbox: area = w*h; segm: area and bbox from the RLE (one batched pycocotools call each).
    """
    anns = [dict(r) for r in results]  # never mutate the caller's entries
    if anns:
        if iou_type == "bbox":
            for ann in anns:
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
        else:
            rles = [a["segmentation"] for a in anns]
            # pycocotools' batched area() overflows for more than 255 RLEs under numpy 2 (it sizes its output
            # with a uint8 array), hence chunks of 255.
            areas = np.concatenate([mask_utils.area(rles[i:i + 255]) for i in range(0, len(rles), 255)])
            bboxes = mask_utils.toBbox(rles)
            for ann, area, bbox in zip(anns, areas.tolist(), bboxes.tolist()):
                ann["area"] = area
                ann.setdefault("bbox", bbox)
    for i, ann in enumerate(anns):
        ann["id"] = i + 1
        ann["iscrowd"] = 0
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                   "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _private_gt(coco_gt: COCO | str | Path) -> COCO:
    """A COCO object whose annotation dicts COCOeval may mutate (it rewrites segmentations into RLE and adds
    'ignore' keys) without touching the caller's object, which a dataset may still be reading."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(coco_gt, (str, Path)):
            return COCO(str(coco_gt))
        gt = COCO()
        gt.dataset = dict(coco_gt.dataset)
        gt.dataset["annotations"] = [dict(a) for a in coco_gt.dataset.get("annotations", [])]
        gt.createIndex()
    return gt


def write_results_json(predictions: Sequence[dict] | None, results_dir: str | Path,
                       iou_types: Sequence[str] = IOU_TYPES, *,
                       coco_results: dict[str, list[dict]] | None = None) -> dict[str, Path]:
    """Write ``{iou_type}_results.json`` (COCO results format, e.g. for the test-dev server) into results_dir.

    Args:
        predictions: per-image prediction dicts (ignored for the iou types found in ``coco_results``).
        coco_results: already converted entries per iou type (saves a second mask encoding).
    Returns:
        {iou_type: path written}.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for iou_type in iou_types:
        entries = (coco_results or {}).get(iou_type)
        if entries is None:
            entries = predictions_to_coco_results(predictions or [], iou_type)
        path = results_dir / f"{iou_type}_results.json"
        write_text_atomic(path, json.dumps(entries), what="results file")
        paths[iou_type] = path
    return paths


def run_cocoeval(evaluator: COCOeval, image_ids: Sequence[int], title: str | None = None) -> dict[str, float]:
    """Evaluate, accumulate and summarise ``evaluator`` on ``image_ids`` with pycocotools' chatter silenced;
    print the standard table under ``title`` when given. Returns the 12 stats under COCO_STAT_NAMES."""
    evaluator.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    if title:
        print(f"{title}\n{summary.getvalue()}")
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}


def select_image_ids(gt: COCO, predictions: Sequence[dict], image_ids: Iterable[int] | None) -> list[int]:
    """Check every prediction's image id against ``gt``; return the sorted image ids to score (``image_ids``
    when given, else the predicted images, else every GT image, which then scores 0)."""
    known = set(gt.getImgIds())
    pred_ids = []
    for index, pred in enumerate(predictions):
        if "image_id" not in pred:
            raise KeyError(f"prediction #{index}: missing key 'image_id'")
        image_id = _image_id(pred)
        if image_id not in known:
            raise KeyError(f"prediction #{index}: image_id={image_id} is not an image of the ground truth")
        pred_ids.append(image_id)
    if image_ids is None:
        image_ids = pred_ids if pred_ids else gt.getImgIds()
    return sorted(set(int(i) for i in image_ids))


def evaluate_coco(coco_gt: COCO | str | Path, predictions: Sequence[dict],
                  iou_types: Sequence[str] = IOU_TYPES, *, results_dir: str | Path | None = None,
                  image_ids: Iterable[int] | None = None, verbose: bool = False,
                  return_evaluators: bool = False):
    """Score predictions against COCO ground truth with pycocotools ``COCOeval``.

    Args:
        coco_gt: the ground-truth ``COCO`` object (crowd annotations included: they are ignore regions), or
            the path of an instances JSON. It is not modified.
        predictions: per-image dicts ``{image_id: int, boxes: [K,4] xyxy absolute, scores: [K],
            labels: [K] category ids, masks: bool [K,H,W] at the original size (segm only)}``; torch or numpy.
            K may be 0. Labels that are not GT categories (e.g. background or unused ids) are ignored by COCOeval.
        iou_types: subset of ("bbox", "segm").
        results_dir: when given, also write ``bbox_results.json`` / ``segm_results.json`` there.
        image_ids: images to evaluate. Default: the images that have a prediction entry (as the reference's
            CocoEvaluator does, so evaluating a subset is not penalised); all GT images if predictions is empty.
            GT objects in an evaluated image without a prediction entry count as misses.
        verbose: print pycocotools' standard summary table (its other output is always suppressed).
        return_evaluators: also return the ``COCOeval`` objects (``.eval["precision"]`` is [T,R,K,A,M]).
    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}}``
        as fractions in [0, 1] (-1.0 where the GT has no object, e.g. no small objects: pycocotools' convention);
        with return_evaluators, ``(that dict, {iou_type: COCOeval})``.
    """
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"unknown iou type '{t}'; expected one of {IOU_TYPES}")
    gt = _private_gt(coco_gt)
    predictions = list(predictions)
    image_ids = select_image_ids(gt, predictions, image_ids)

    if "segm" in iou_types:
        _check_mask_sizes(gt, predictions)
    coco_results = {t: predictions_to_coco_results(predictions, t) for t in iou_types}
    if results_dir is not None:
        write_results_json(None, results_dir, iou_types, coco_results=coco_results)

    stats, evaluators = {}, {}
    for iou_type in iou_types:
        dt = _load_results(gt, coco_results[iou_type], iou_type)
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        stats[iou_type] = run_cocoeval(evaluator, image_ids, f"IoU metric: {iou_type}" if verbose else None)
        evaluators[iou_type] = evaluator
    return (stats, evaluators) if return_evaluators else stats


def _check_mask_sizes(gt: COCO, predictions: Sequence[dict]) -> None:
    """Masks must be at the original image size, else RLE IoUs are silently meaningless."""
    for index, pred in enumerate(predictions):
        if "masks" not in pred:
            raise KeyError(f"prediction #{index} (image_id={pred.get('image_id')}): missing key 'masks' "
                           f"needed for iou type 'segm'")
        masks = pred["masks"]
        shape = tuple(masks.shape)
        if len(shape) == 4 and shape[1] == 1:
            shape = shape[:1] + shape[2:]
        image_id = _image_id(pred)
        img = gt.imgs[image_id]
        if shape[0] and shape[-2:] != (img["height"], img["width"]):
            raise ValueError(f"prediction for image_id={image_id}: masks have size {shape[-2:]} but the image is "
                             f"{(img['height'], img['width'])} (h, w); paste masks at the original size")


def format_table(results: dict[str, dict[str, float]], *, percent: bool = True) -> str:
    """A compact text table, one row per iou type and one column per COCO stat ('-' for -1 = undefined).

    Args:
        results: the dict returned by ``evaluate_coco``.
    """
    names = [n for n in COCO_STAT_NAMES if any(n in r for r in results.values())]
    width = max(6, *(len(n) + 1 for n in names))
    lines = ["type".ljust(6) + "".join(n.rjust(width) for n in names)]
    for iou_type, row in results.items():
        cells = []
        for n in names:
            v = row.get(n, float("nan"))
            if v is None or v < 0 or v != v:
                cells.append("-".rjust(width))
            else:
                cells.append(f"{100 * v:.1f}".rjust(width) if percent else f"{v:.3f}".rjust(width))
        lines.append(iou_type.ljust(6) + "".join(cells))
    return "\n".join(lines)

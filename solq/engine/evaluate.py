"""Evaluation over a loader (as in the authors' release): forward, post-process at the original size, COCO box/mask AP.

Each rank post-processes its share of the images and keeps masks as COCO RLE (compact, picklable); the
predictions of all ranks are gathered with ``all_gather_object``, de-duplicated by image id (the val
sampler pads), scored on rank 0 with ``solq.evaluation.evaluate_coco`` and the metrics are broadcast.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from solq.engine import distributed as du
from solq.engine.builders import build_dataset, build_val_loader
from solq.engine.checkpoint import build_from_checkpoint
from solq.engine.logger import MeanMeter, progress
from solq.engine.runtime import autocast, configure_runtime, to_float32
from solq.evaluation import evaluate_boundary_ap, evaluate_coco, masks_to_rle
from solq.files import check_writable, write_text_atomic
from solq.models.inference import optimize_for_inference

__all__ = ["evaluate", "run_evaluation", "weighted_total", "RLEMasks", "iou_types_for"]

def weighted_total(loss_dict: dict, weight_dict: dict) -> tuple[torch.Tensor, dict]:
    """(sum_k loss[k] * weight[k], {k: weighted term}) over the keys of ``weight_dict`` present."""
    terms = {k: v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict}
    return sum(terms.values()), terms


def iou_types_for(model: torch.nn.Module, requested: Sequence[str]) -> tuple[str, ...]:
    """The requested iou types ``model`` can be scored on: no "segm" for a box-only model
    (``model.predicts_masks`` False, mode det)."""
    return tuple(t for t in requested if t != "segm" or model.predicts_masks)


class RLEMasks:
    """Masks of one image kept as compressed COCO RLE; behaves as a bool [K,H,W] array when read
    (``np.asarray``), so ``evaluate_coco`` decodes one image at a time instead of holding every mask."""

    def __init__(self, rles: list, height: int, width: int):
        self.rles = rles
        self.shape = (len(rles), height, width)

    def __array__(self, dtype=None, copy=None):
        if not self.rles:
            out = np.zeros(self.shape, dtype=bool)
        else:
            out = mask_utils.decode(self.rles).transpose(2, 0, 1).astype(bool)
        return out if dtype is None else out.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


def _compact(result: dict, image_id: int) -> dict:
    """One post-processed image on the CPU in numpy, masks as RLEMasks."""
    pred = {"image_id": image_id, "boxes": result["boxes"].float().cpu().numpy(),
            "scores": result["scores"].float().cpu().numpy(), "labels": result["labels"].cpu().numpy()}
    if "masks" in result:
        m = result["masks"]
        pred["masks"] = RLEMasks(masks_to_rle(m.cpu()), int(m.shape[-2]), int(m.shape[-1]))
    return pred


@torch.no_grad()
def evaluate(model: torch.nn.Module, postprocessor, loader: Iterable, coco_gt, *, device: torch.device,
             criterion=None, amp: str = "none", iou_types: Sequence[str] = ("bbox", "segm"),
             boundary: bool = False, results_dir: Optional[str | Path] = None, progress_bar: bool = True,
             desc: str = "eval") -> dict:
    """Score ``model`` on every image of ``loader`` (all ranks together when distributed).

    Args:
        model: the bare model (not DDP-wrapped); put in eval mode here.
        postprocessor: ``PostProcess``; called with the targets' ``orig_size`` [B,2] and ``size`` [B,2].
        loader: yields ``solq.data.Batch`` whose targets carry ``image_id``, ``orig_size``, ``size``.
        coco_gt: the pycocotools ground truth (``dataset.coco``).
        criterion: when given, the weighted val losses are averaged and returned under "loss".
        iou_types: subset of ("bbox", "segm").
        boundary: also Boundary AP of the masks (``solq.evaluation.evaluate_boundary_ap``, key "boundary").
        results_dir: also write ``bbox_results.json`` / ``segm_results.json`` (COCO results format).
    Returns:
        {"bbox": {AP, AP50, ...}, "segm": {...}, ["boundary": {...}], "num_images": int, "eval_seconds": seconds,
        ["loss": {...}]}
        (fractions in [0,1]); identical on every rank.
    """
    model.eval()
    start = time.perf_counter()
    with_masks = "segm" in iou_types
    preds: list[dict] = []
    meter = MeanMeter()
    for batch in progress(loader, total=len(loader) if hasattr(loader, "__len__") else None, desc=desc,
                          enabled=progress_bar and du.is_main_process()):
        batch = batch.to(device, non_blocking=True)
        with autocast(device, amp):
            outputs = model(batch.images, batch.mask)
        outputs = to_float32(outputs)
        if criterion is not None:
            loss_dict = criterion(outputs, batch.targets)
            total, terms = weighted_total(loss_dict, criterion.weight_dict)
            meter.update({"loss": float(total), **{k: float(v) for k, v in terms.items()}})
        orig = torch.stack([t["orig_size"] for t in batch.targets])
        size = torch.stack([t["size"] for t in batch.targets])
        results = postprocessor(outputs, orig, with_masks=with_masks, input_sizes=size)
        preds += [_compact(r, int(t["image_id"])) for r, t in zip(results, batch.targets)]

    gathered = du.all_gather_object(preds)
    metrics: dict = {}
    if du.is_main_process():
        unique: dict[int, dict] = {}
        for rank_preds in gathered:
            for p in rank_preds:
                unique.setdefault(p["image_id"], p)
        ordered = [unique[i] for i in sorted(unique)]
        metrics = evaluate_coco(coco_gt, ordered, tuple(iou_types), results_dir=results_dir)
        if boundary and with_masks:
            metrics["boundary"] = evaluate_boundary_ap(coco_gt, ordered)
        metrics["num_images"] = len(ordered)
    metrics = du.broadcast_object(metrics)
    if criterion is not None:
        means = meter.means()
        keys = sorted(means)
        reduced = du.all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device))
        metrics["loss"] = dict(zip(keys, reduced.tolist()))
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def run_evaluation(checkpoint: str | Path, *, config: Optional[str] = None, overrides: Sequence[str] = (),
                   output_dir: Optional[str | Path] = None, dump_dir: Optional[str | Path] = None,
                   progress_bar: bool = True) -> dict:
    """``solq eval``: score a solq or release checkpoint on the val set of its config (see
    ``checkpoint.config_for_checkpoint`` for how ``config``/``overrides`` combine with the stored one).

    Runs on all torchrun processes when launched by torchrun. Writes ``metrics.json`` into ``output_dir``
    and ``bbox_results.json`` / ``segm_results.json`` (COCO results format, e.g. for test-dev) into
    ``dump_dir`` when given; both folders are checked for writability first, and every file is written
    atomically (:class:`solq.files.OutputWriteError` names the file and the cause). Returns the metrics dict
    of :func:`evaluate`.
    """
    for folder in (output_dir, dump_dir):
        if folder is not None:
            check_writable(folder)
    created = not du.is_dist()
    cfg, model, criterion, postprocessor, _ = build_from_checkpoint(checkpoint, config=config, overrides=overrides)
    configure_runtime(cfg)
    info = du.init_distributed(cfg.runtime.dist_backend, cfg.runtime.device)
    try:
        model.to(info.device)
        if cfg.eval.inference_opt:
            model = optimize_for_inference(model, inplace=True)  # this model is never trained or saved
        criterion.to(info.device)
        val_ds = build_dataset(cfg, "val")
        loader = build_val_loader(val_ds, cfg, rank=info.rank, world_size=info.world_size,
                                  pin_memory=info.device.type == "cuda")
        metrics = evaluate(model, postprocessor, loader, val_ds.coco, device=info.device, amp=cfg.train.amp,
                           iou_types=iou_types_for(model, cfg.eval.iou_types),
                           boundary=cfg.eval.boundary, results_dir=dump_dir if info.is_main else None, progress_bar=progress_bar)
        if output_dir is not None and info.is_main:
            write_text_atomic(Path(output_dir) / "metrics.json",
                              json.dumps({"checkpoint": str(checkpoint), **metrics}, indent=2), what="metrics file")
        return metrics
    finally:
        if created:
            du.cleanup()

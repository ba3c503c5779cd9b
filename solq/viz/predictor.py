"""A model ready for single images, as the visualisation tools need it, and their ground-truth inputs.

``Predictor`` wraps (model, post-processor, config): it applies the evaluation transforms to a raw
image, runs the network on that one image (batch of one, so the padded frame of the decoder's
sampling locations is the image itself), post-processes at the original size and returns numpy
arrays. ``Predictor.from_checkpoint`` uses the engine's checkpoint loading (solq or release files,
run folders). Ground truth comes from a dataset built without transforms (images and masks at the
original size): :func:`ground_truth`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from solq.config import load_config
from solq.data import build_transforms
from solq.engine.builders import build_dataset, data_overrides
from solq.engine.checkpoint import LAST_NAME, build_from_checkpoint, list_checkpoints
from solq.engine.evaluate import RLEMasks
from solq.engine.logger import progress
from solq.engine.predict import COCO_NAMES, predict_image
from solq.engine.train import fit
from solq.evaluation import masks_to_rle
from solq.models import pretrained

from .draw import as_numpy, to_uint8_image

__all__ = ["Predictor", "resolve_checkpoint", "ground_truth", "raw_dataset", "image_of", "data_overrides",
           "train_smoke_checkpoint", "decoder_attention_arrays"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path or a run folder (its ``checkpoint.pth``, else the newest
    ``checkpoint*.pth``, else the same in the first subfolder holding one, e.g. an experiment point whose notebook
    trained into ``<point>/<run>/``), or the file of a shipped name (``smoke-uqr``, ``smoke-sqr``: see
    ``solq.models.pretrained``). Raises FileNotFoundError naming the path when there is none."""
    p = pretrained.resolve(path)
    if p.is_file():
        return p
    if p.is_dir():
        for folder in (p, *sorted(d for d in p.iterdir() if d.is_dir())):
            if (folder / LAST_NAME).is_file():
                return folder / LAST_NAME
            found = list_checkpoints(folder)
            if found:
                return found[0]
        raise FileNotFoundError(f"checkpoint: the run folder {p} (and its subfolders) holds no checkpoint*.pth")
    raise FileNotFoundError(f"checkpoint: {p} is neither a checkpoint file nor a run folder")


def image_of(image: Any) -> np.ndarray:
    """uint8 [H,W,3] from a path, a PIL image, an array or a tensor (see ``to_uint8_image``)."""
    return to_uint8_image(image)


class Predictor:
    """Single-image inference for the visualisation tools.

    Args:
        model: a SOLQ / SQR model (put in eval mode here). postprocessor: its ``PostProcess``.
        cfg: the run's Config (evaluation transforms from ``cfg.data``; mode; decoder layers).
        category_names: {category id: name}. device: where the model runs (default: its parameters').
        name: shown in figure titles (e.g. "UQR").

    Attributes: ``cfg``, ``category_names``, ``num_decoder_layers``, ``mode``, ``name``, ``device``.
    """

    def __init__(self, model: torch.nn.Module, postprocessor, cfg, *,
                 category_names: Optional[Mapping[int, str]] = None, device: Any = None, name: str = ""):
        self.model, self.postprocessor, self.cfg = model.eval(), postprocessor, cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.category_names = {int(k): str(v) for k, v in (category_names or {}).items()}
        self.num_decoder_layers = int(cfg.model.dec_layers)
        self.mode = cfg.model.mode
        self.name = name or self.mode.upper()
        self.transform = build_transforms(False, cfg.data)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: Any = "cpu", config: Optional[str] = None,
                        overrides: Sequence[str] = (), name: str = "") -> "Predictor":
        """Load a solq checkpoint, a run folder or an authors' release file (engine's loader)."""
        path = resolve_checkpoint(checkpoint)
        cfg, model, _, postprocessor, names = build_from_checkpoint(path, config=config, overrides=overrides,
                                                                    device=device)
        if not names and cfg.model.num_classes == 91:
            names = COCO_NAMES
        return cls(model, postprocessor, cfg, category_names=names, device=device, name=name)

    @torch.no_grad()
    def __call__(self, image: Any, *, return_attention: bool = False) -> dict:
        """Run one image.

        Returns numpy arrays at the original size, best first: ``scores`` [K], ``labels`` [K],
        ``boxes`` [K,4] xyxy, ``query_index`` [K], ``masks`` bool [K,H,W] (mask models), ``image_size``
        (H, W). With ``return_attention`` also ``attention``: {``locations`` [L,Q,M,L_f,P,2] (x, y) in
        [0,1] of the image, ``weights`` [L,Q,M,L_f,P], ``references`` [L,Q,2|4] (the reference each
        decoder layer attends around, normalised cx, cy[, w, h]; w, h are NaN for a point reference
        when others are boxes), ``layer_boxes`` [L,Q,4] (normalised
        cx, cy, w, h predicted by each layer), ``layer_scores`` [L,Q] (best class probability per layer)}.
        """
        rgb = image_of(image)
        h, w = rgb.shape[:2]
        res, outputs = predict_image(self.model, self.postprocessor, self.transform,
                                     torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
                                     return_attention=return_attention)
        result = {k: as_numpy(v) for k, v in res.items()}
        result["masks"] = result["masks"].astype(bool) if "masks" in result else None
        result["image_size"] = (h, w)
        if return_attention:
            result["attention"] = decoder_attention_arrays(outputs)
        return result

    @torch.no_grad()
    def predict_dataset(self, dataset, indices: Optional[Iterable[int]] = None, *, score_threshold: float = 0.0,
                        progress_bar: bool = False) -> list[dict]:
        """Predictions for raw-dataset items ``dataset[i]`` (CocoInstances without transforms).

        Returns per-image dicts {image_id, boxes, scores, labels, query_index, masks} (numpy; masks as an
        RLE-backed array, ``.rles`` holding COCO RLEs) keeping scores >= ``score_threshold``, in the
        format of ``solq.evaluation.evaluate_coco`` and ``solq.viz.failures.mine_failures``.
        """
        indices = range(len(dataset)) if indices is None else list(indices)
        out = []
        for i in progress(indices, desc="predict", enabled=progress_bar):
            image, target = dataset[i]
            res = self(image)
            keep = res["scores"] >= score_threshold
            pred = {"image_id": int(target["image_id"]), **{k: res[k][keep] for k in
                                                           ("boxes", "scores", "labels", "query_index")}}
            if res["masks"] is not None:
                h, w = res["image_size"]
                pred["masks"] = RLEMasks(masks_to_rle(res["masks"][keep]), h, w)
            out.append(pred)
        return out


def decoder_attention_arrays(outputs: Mapping[str, Any], batch_index: int = 0) -> dict:
    """The decoder's sampling locations, weights and references of one image of a batch, as numpy.

    ``outputs`` from ``model(..., return_attention=True)``. Locations are in the padded frame of the
    batch, which is the image itself for a batch of one. Returns the ``attention`` dict documented
    in :meth:`Predictor.__call__`.
    """
    att = outputs.get("dec_attention")
    if not att:
        raise KeyError("outputs have no 'dec_attention': run the model with return_attention=True")
    b = batch_index
    locations = np.stack([as_numpy(a["locations"][b]) for a in att])
    weights = np.stack([as_numpy(a["weights"][b]) for a in att])
    refs_after = as_numpy(outputs["dec_references"][:, b])  # [L,Q,2|4] after each layer
    init = as_numpy(outputs["init_reference"][b])[None]
    width = max(init.shape[-1], refs_after.shape[-1])

    def pad(r):  # point references (cx, cy) get NaN for w, h
        return np.concatenate([r, np.full(r.shape[:-1] + (width - r.shape[-1],), np.nan, r.dtype)], -1)

    references = np.concatenate([pad(init), pad(refs_after[:-1])], 0)  # layer l attends around layer l-1's
    layers = list(outputs.get("aux_outputs", [])) + [outputs]
    layer_boxes = np.stack([as_numpy(o["pred_boxes"][b]) for o in layers])
    layer_scores = np.stack([as_numpy(o["pred_logits"][b].float().sigmoid().amax(-1)) for o in layers])
    return {"locations": locations, "weights": weights, "references": references, "layer_boxes": layer_boxes,
            "layer_scores": layer_scores}


def raw_dataset(cfg, split: str = "val", *, max_images: Optional[int] = None):
    """The CocoInstances of ``split`` without transforms (images and masks at the original size), from the
    paths of ``cfg.data`` (``solq.engine.builders.build_dataset(..., transforms="none")``; synthetic scenes are
    generated when missing). Raises ConfigError (a ValueError) naming a missing path."""
    return build_dataset(cfg, split, transforms="none", max_images=max_images)


def ground_truth(target: Mapping[str, Any]) -> dict:
    """A raw-dataset target -> the instances dict of the viz tools: {image_id, boxes [n,4] xyxy,
    labels [n], masks bool [n,H,W], iscrowd [n]} as numpy (no scores)."""
    boxes = target.get("boxes_xyxy", target["boxes"])
    out = {"image_id": int(target["image_id"]), "boxes": as_numpy(boxes).astype(np.float64).reshape(-1, 4),
           "labels": as_numpy(target["labels"]).astype(np.int64), "masks": as_numpy(target["masks"]).astype(bool)}
    out["iscrowd"] = as_numpy(target["iscrowd"]).astype(np.int64) if "iscrowd" in target else \
        np.zeros(len(out["labels"]), np.int64)
    return out


def train_smoke_checkpoint(output_dir: str | Path, *, steps: int = 20, overrides: Sequence[str] = (),
                           seed: int = 0, progress_bar: bool = False) -> Path:
    """Train the ``smoke`` preset for ``steps`` optimiser steps into ``output_dir`` with the engine (so a
    notebook runs standalone without a checkpoint) and return the run folder. ``overrides`` ("a.b=c")
    come last (e.g. data paths, smaller sizes). A folder that already holds a finished run of the same
    config is reused."""
    out = Path(output_dir)
    cfg = load_config("smoke", [f"train.max_steps={int(steps)}", "train.epochs=1000", "train.eval_every=0",
                                f"train.seed={int(seed)}", f"runtime.output_dir={out}", *overrides])
    done = out / "config.yaml"
    if (out / "metrics.json").is_file() and done.is_file() and (out / "checkpoint.pth").is_file():
        saved = load_config(str(done))
        if cfg.model.num_classes == 0:
            saved.model.num_classes = 0  # the engine filled it from the data
        if saved.to_dict() == cfg.to_dict():
            return out
    fit(cfg, progress_bar=progress_bar, tensorboard=False)
    return out

"""``solq predict``: run a checkpoint on image files, folders or globs; write overlays and COCO results.

Outputs in ``output_dir``: ``<image stem>.png`` overlays (``<id>_<stem>.png`` when stems repeat; masks,
boxes, class names, scores above the threshold), ``predictions.json`` (COCO results format: image_id,
category_id, bbox [x,y,w,h], score, segmentation as compressed RLE) and ``images.json`` ({"images":
[{id, file_name, height, width, overlay}], "categories": [{id, name}]}) mapping those image ids to the inputs.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from solq.data import build_transforms, collate
from solq.engine.checkpoint import build_from_checkpoint
from solq.engine.distributed import resolve_device
from solq.engine.logger import progress
from solq.engine.runtime import autocast, configure_runtime, to_float32
from solq.evaluation import masks_to_rle
from solq.models.inference import optimize_for_inference

__all__ = ["IMAGE_SUFFIXES", "COCO_NAMES", "expand_inputs", "empty_target", "predict_image", "predict"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# COCO 2017 category id -> name (the release's 91-logit label space; ids absent from COCO stay unnamed)
COCO_NAMES = dict(enumerate(
    "_ person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant _ stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe _ backpack umbrella _ _ "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle _ wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed _ dining_table _ _ toilet _ tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator _ book clock vase "
    "scissors teddy_bear hair_drier toothbrush".split()))
COCO_NAMES = {k: v.replace("_", " ") for k, v in COCO_NAMES.items() if v != "_"}


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (their images, sorted, not recursive) and glob patterns.

    Raises FileNotFoundError naming every input that matched no image.
    """
    found, missing = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            hits = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            hits = [p]
        else:
            hits = sorted(Path(q) for q in glob.glob(item, recursive=True)
                          if Path(q).is_file() and Path(q).suffix.lower() in IMAGE_SUFFIXES)
        (found.extend(hits) if hits else missing.append(item))
    if missing:
        raise FileNotFoundError(f"no images found for: {missing} (files, folders or glob patterns of "
                                f"{'/'.join(IMAGE_SUFFIXES)})")
    return list(dict.fromkeys(found))  # de-duplicate, keep order


def empty_target(h: int, w: int) -> dict:
    """The raw target of an image without annotations, so the evaluation transforms apply unchanged."""
    return {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8)),
            "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0, dtype=torch.int64),
            "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w]),
            "image_id": torch.tensor(0), "area": torch.zeros(0)}


@torch.no_grad()
def predict_image(model: torch.nn.Module, postprocessor, transform, image: torch.Tensor, *, amp: str = "none",
                  return_attention: bool = False) -> tuple[dict, dict]:
    """Run ``model`` on one image: the single-image inference of ``solq predict`` and of ``solq.viz.Predictor``.

    image: uint8 [3,H,W] (RGB, original size); ``transform``: the evaluation transforms
    (``solq.data.build_transforms(False, cfg.data)``). The image is a batch of one, so the padded frame is
    the image itself. Returns ``(result, outputs)``: the post-processed detections at the original size,
    best first, on the model's device (``scores`` [K], ``labels`` [K], ``boxes`` [K,4] xyxy, ``query_index``
    [K], ``masks`` bool [K,H,W] when ``model.predicts_masks``), and the network outputs (float32; with
    ``return_attention`` the decoder's sampling locations and weights too).
    """
    dev = next(model.parameters()).device
    h, w = image.shape[-2:]
    tensor, target = transform(tv_tensors.Image(image), empty_target(h, w))
    batch = collate([(tensor, target)]).to(dev)
    with autocast(dev, amp):
        outputs = model(batch.images, batch.mask, **({"return_attention": True} if return_attention else {}))
    outputs = to_float32(outputs)
    result = postprocessor(outputs, torch.tensor([[h, w]], device=dev), with_masks=model.predicts_masks,
                           input_sizes=target["size"][None].to(dev))[0]
    return result, outputs


@torch.no_grad()
def predict(checkpoint: str | Path, inputs: Sequence[str], *, output_dir: str | Path = "predictions",
            score_threshold: float = 0.4, device: str = "cpu", config: Optional[str] = None,
            overrides: Sequence[str] = (), draw: Optional[Callable[..., np.ndarray]] = None,
            progress_bar: bool = True) -> dict:
    """Run ``checkpoint`` (solq or release) on ``inputs`` (files, folders, globs).

    Keeps detections with score >= ``score_threshold`` (both in the overlays and in the JSON). ``draw``, when
    given, makes each overlay: ``draw(rgb uint8 [H,W,3], detections {boxes, labels, scores, masks}, names)
    -> uint8 [H,W,3]`` (``solq predict`` passes ``solq.viz.draw.overlay``; the engine draws nothing itself).
    Returns {"images": n, "detections": m, "predictions": path, "images_json": path, "output_dir": path}.
    """
    paths = expand_inputs(inputs)
    dev = resolve_device(device)
    cfg, model, _, postprocessor, names = build_from_checkpoint(checkpoint, config=config, overrides=overrides,
                                                                device=dev)
    configure_runtime(cfg)
    if cfg.eval.inference_opt:
        model = optimize_for_inference(model, inplace=True)  # this model is never trained or saved
    names = names or (COCO_NAMES if cfg.model.num_classes == 91 else {})
    transform = build_transforms(False, cfg.data)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, images = [], []
    stems = [p.stem for p in paths]
    for image_id, path in enumerate(progress(paths, desc="predict", enabled=progress_bar), start=1):
        try:
            pil = Image.open(path).convert("RGB")
        except OSError as e:
            raise OSError(f"{path}: cannot read the image ({e})") from None
        w, h = pil.size
        res, _ = predict_image(model, postprocessor, transform, F.pil_to_tensor(pil), amp=cfg.train.amp)
        keep = res["scores"] >= score_threshold
        scores, labels = res["scores"][keep].cpu().numpy(), res["labels"][keep].cpu().numpy()
        boxes = res["boxes"][keep].cpu().numpy()
        masks = res["masks"][keep].cpu().numpy() if "masks" in res else None
        rles = masks_to_rle(masks) if masks is not None else [None] * len(scores)
        for s, c, b, r in zip(scores.tolist(), labels.tolist(), boxes.tolist(), rles):
            entry = {"image_id": image_id, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                     "score": s}
            if r is not None:
                entry["segmentation"] = r
            results.append(entry)
        overlay = f"{path.stem}.png" if stems.count(path.stem) == 1 else f"{image_id:04d}_{path.stem}.png"
        images.append({"id": image_id, "file_name": str(path), "height": h, "width": w,
                       **({"overlay": overlay} if draw is not None else {})})
        if draw is not None:
            detections = {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}
            Image.fromarray(draw(np.asarray(pil), detections, names)).save(out / overlay)
    pred_path, img_path = out / "predictions.json", out / "images.json"
    pred_path.write_text(json.dumps(results))
    img_path.write_text(json.dumps({"images": images, "categories": [{"id": int(k), "name": v}
                                                                      for k, v in sorted(names.items())]}, indent=1))
    return {"images": len(paths), "detections": len(results), "predictions": str(pred_path),
            "images_json": str(img_path), "output_dir": str(out)}

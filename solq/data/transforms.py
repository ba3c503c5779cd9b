"""Training and evaluation transforms (as in the authors' release) on torchvision.transforms.v2 + tv_tensors.

Image, boxes (tv_tensors.BoundingBoxes) and masks (tv_tensors.Mask, resized with nearest-exact) move together.

train (``build_transforms(True, cfg.data)``):
  1. RandomHorizontalFlip(0.5)                      (when ``cfg.hflip``)
  2. with probability 1 - crop_prob and crop_prob (0.5 each: the reference's RandomSelect):
     a. RandomResize(train_scales, max_size)
     b. RandomResize(crop_resize_scales) -> RandomSizeCrop(crop_min, crop_max)
        -> RandomResize(train_scales, max_size)
  3. float in [0,1], ImageNet normalisation, :class:`FinalizeTarget`.
eval: RandomResize([eval_size], max_size), then step 3.

Deliberate deviation: the release has an extra RandomResize(train_scales, max_size) before the
RandomSelect. Every branch resizes again afterwards, so it changes no size distribution and
only resamples the image and masks twice; it is left out.

Sizes follow the release's rule (``int()`` truncation) except that the shorter side is floored
rather than rounded when ``max_size`` binds, so the longer side never exceeds ``max_size`` (the
reference can overshoot by a pixel). Images are resized bilinearly with antialiasing (like PIL's
resize in the reference). Masks use nearest-exact sampling (pixel centres) rather than the legacy
``nearest`` of the reference, which shifts masks towards the bottom-right by up to one output pixel
per resize, i.e. away from their boxes. Crops clip boxes to the crop without re-fitting them to the
mask (as the reference); instances whose clipped box is empty are dropped by :class:`FinalizeTarget`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..config import ConfigError, DataConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomResize", "RandomSizeCrop", "FinalizeTarget", "build_transforms",
           "resized_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(h: int, w: int, short: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """(h, w) -> (h', w') with the shorter side ``short``, or smaller so the longer side stays <= max_size.
    Integer arithmetic, so the bound holds exactly."""
    lo, hi = min(h, w), max(h, w)
    if max_size is not None and hi * short > max_size * lo:
        short = max(1, max_size * lo // hi)
    long = max(1, short * hi // lo)
    return (short, long) if h <= w else (long, short)


class RandomResize(v2.Transform):
    """Resize so the shorter side is a random choice of ``sizes`` (longer side <= ``max_size``).

    Images: bilinear with antialias; masks: nearest-exact; boxes scaled."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        super().__init__()
        self.sizes, self.max_size = [int(s) for s in sizes], max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return dict(size=list(resized_size(height, width, short, self.max_size)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return self._call_kernel(F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)

    _get_params = make_params  # torchvision < 0.21 names
    _transform = transform


class RandomSizeCrop(v2.Transform):
    """Crop a random region of width ~ U{min_size..min(W, max_size)} and height likewise (reference
    ``RandomSizeCrop``); sides are capped by the image, so images smaller than ``min_size`` are kept whole.
    Boxes are shifted and clamped to the crop, masks sliced."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)

        def side(n: int) -> int:
            lo, hi = min(self.min_size, n), min(n, self.max_size)
            return int(torch.randint(lo, hi + 1, ()))

        h, w = side(height), side(width)
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)

    # torchvision < 0.21 names
    _get_params = make_params
    _transform = transform


class FinalizeTarget:
    """Last step: ``(image, target) -> (image tensor, target)`` in the training format.

    Clamps boxes to the image, drops instances whose box has zero width or height (e.g. cropped away),
    then sets
    ``boxes_xyxy`` float32 [n,4] absolute, ``boxes`` float32 [n,4] normalised (cx,cy,w,h) w.r.t. the
    unpadded image, ``masks`` bool [n,H,W], ``area`` float32 [n] = box area in transformed pixels (as the
    reference after a crop; a mask pixel count would cost more than all the resizing), ``size`` int64 [2].
    ``labels``, ``iscrowd`` and ``area`` are filtered with the boxes; other keys are passed through.
    Image and all values come out as plain tensors (no tv_tensor subclasses).
    """

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        image = image.as_subclass(torch.Tensor)
        h, w = image.shape[-2:]
        xyxy = target["boxes"].as_subclass(torch.Tensor).to(torch.float32)
        # float rounding in resizes can leave x1 = W + 1e-5; clamp so the invariants hold exactly
        xyxy = torch.stack([xyxy[:, 0].clamp(0, w), xyxy[:, 1].clamp(0, h), xyxy[:, 2].clamp(0, w),
                            xyxy[:, 3].clamp(0, h)], dim=1)
        masks = target["masks"].as_subclass(torch.Tensor)
        out = dict(target)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        if not bool(keep.all()):
            xyxy, masks = xyxy[keep], masks[keep]
            for key in ("labels", "iscrowd"):
                if key in out:
                    out[key] = out[key][keep]
        out["masks"] = masks.to(torch.bool)
        out["boxes_xyxy"] = xyxy
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=xyxy.device)
        out["boxes"] = box_convert(xyxy, "xyxy", "cxcywh") / scale
        out["area"] = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        out["size"] = torch.tensor([h, w], dtype=torch.int64)
        return image, out


def _check(cfg: DataConfig) -> None:
    def positive(name: str, values: list[int]) -> None:
        if not values or any(not isinstance(v, int) or v <= 0 for v in values):
            raise ConfigError(f"data.{name} must be positive integers, got {values!r}")

    positive("train_scales", list(cfg.train_scales))
    positive("crop_resize_scales", list(cfg.crop_resize_scales))
    positive("max_size / eval_size / crop_min / crop_max", [cfg.max_size, cfg.eval_size, cfg.crop_min, cfg.crop_max])
    if not 0.0 <= cfg.crop_prob <= 1.0:
        raise ConfigError(f"data.crop_prob must be in [0, 1], got {cfg.crop_prob}")
    if cfg.crop_min > cfg.crop_max:
        raise ConfigError(f"data.crop_min ({cfg.crop_min}) must be <= data.crop_max ({cfg.crop_max})")


def build_transforms(train: bool, cfg_data: DataConfig):
    """-> callable ``(image uint8 tv_tensors.Image [3,H,W], raw target) -> (float image [3,H',W'], target)``
    with the target keys of :class:`FinalizeTarget`. Sizes come from ``cfg_data`` (a DataConfig)."""
    _check(cfg_data)
    steps: list = []
    if train:
        if cfg_data.hflip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        multiscale = RandomResize(cfg_data.train_scales, max_size=cfg_data.max_size)
        crop_branch = v2.Compose([
            RandomResize(cfg_data.crop_resize_scales),
            RandomSizeCrop(cfg_data.crop_min, cfg_data.crop_max),
            RandomResize(cfg_data.train_scales, max_size=cfg_data.max_size),
        ])
        p = cfg_data.crop_prob
        steps.append(v2.RandomChoice([multiscale, crop_branch], p=[1 - p, p]) if p > 0 else multiscale)
    else:
        steps.append(RandomResize([cfg_data.eval_size], max_size=cfg_data.max_size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return _Pipeline(v2.Compose(steps), FinalizeTarget())


class _Pipeline:
    """v2 transforms followed by FinalizeTarget (a plain class so it pickles for DataLoader workers)."""

    def __init__(self, transforms: v2.Compose, finalize: FinalizeTarget):
        self.transforms, self.finalize = transforms, finalize

    def __call__(self, image, target):
        image, target = self.transforms(image, target)
        return self.finalize(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r}, {type(self.finalize).__name__}())"

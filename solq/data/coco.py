"""COCO-format instance segmentation dataset on pycocotools (as in the authors' release), with input validation.

``CocoInstances(image_dir, ann_file)`` reads a COCO "instances" JSON, checks it, and yields
``(image, target)`` pairs: polygons, uncompressed and compressed RLE are decoded with pycocotools,
boxes are clamped to the image, crowd annotations are kept out of the training targets (as the
reference does) but stay in ``ds.coco`` for evaluation.

What is checked, and what happens (``strict=True`` turns every *skip* into an error):

========================================================  =========================================
problem                                                   outcome
========================================================  =========================================
file is not JSON, not a dict, lacks ``images`` or         error (names the file and key)
``categories``, a record lacks ``id``/``file_name``/
``width``/``height``/``image_id``/``category_id``
duplicate image id or category id                         error (annotations cannot be assigned)
duplicate annotation id                                   skip the later ones
polygon coordinates / RLE counts not numbers, RLE size    skip ("malformed polygon", "malformed RLE")
not [h, w], compressed counts that do not decode
``area`` not a number >= 0, ``iscrowd`` not 0/1           skip ("invalid area", "invalid iscrowd")
category id outside 0..100000                             error (num_classes = largest id + 1)
annotation on an unknown image / with unknown category    skip the annotation
bbox missing or not 4 finite numbers                      skip ("invalid bbox")
bbox with w <= 0 or h <= 0                                skip ("degenerate bbox")
bbox with no overlap with the image                       skip ("bbox outside image")
bbox partly outside the image                             clamped, counted (``report.clamped_boxes``)
polygon part with < 3 points / odd coordinate count       part dropped (counted); annotation
                                                          skipped when no part is left
empty or missing segmentation                             skip ("empty segmentation")
RLE whose size differs from the image / malformed         skip
image file missing (checked at construction by stat)      skip the image
unreadable file / size in JSON differs from the file      checked at load time (or at construction
                                                          with ``check_images="header"``): see below
image without (non-crowd) annotations                     kept (a valid negative), counted
========================================================  =========================================

Construction only reads the JSON (plus one ``stat`` per image), so it is fast even on COCO train.
All skips are counted in ``ds.report`` (a :class:`DatasetReport`) and summarised in ONE warning that names
the annotation file, the ids and (for images) the files, e.g. ``skipped 3 annotations: 2 polygon with < 3
points (ann ids 5, 9), 1 empty segmentation (ann id 12) (on image id 4)``; errors name the record's position
and ids (``images[3] has no key 'width' (id 17)``).
``ds.coco`` holds exactly the kept images and the annotations that passed the checks, crowd included,
so evaluating against it matches what is trained on (and ``max_images`` subsets evaluate correctly).

A file that turns out to be unreadable or of the wrong size when ``ds[i]`` loads it raises
:class:`ImageLoadError` with ``strict=True``; otherwise it warns once for that file, records it in
``ds.report.load_failures`` (of the current process; DataLoader workers keep their own copy) and
returns the next loadable image instead, so a long training run does not die on one bad file.
For evaluation prefer ``check_images="header"``, which opens every file header (~0.25 ms/image)
at construction and skips bad images up front, so no substitution happens.

Images are decoded to RGB whatever their mode, with EXIF orientation applied (see :mod:`solq.data.images`).
The annotation checks, :class:`DatasetReport` and the errors live in :mod:`solq.data.validation`.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .images import ImageLoadError, load_rgb
from .validation import (DatasetError, DatasetReport, DataWarning, parse_annotations, parse_categories, parse_images,
                         read_instances_json)

__all__ = ["CocoInstances", "decode_masks"]


def decode_masks(segmentations: list, h: int, w: int) -> torch.Tensor:
    """Validated COCO segmentations (polygon lists / RLE dicts) -> uint8 {0,1} tensor [n,h,w].

    All polygons of the image go through one ``frPyObjects`` call; parts of one object are merged."""
    rles: list[Any] = [None] * len(segmentations)
    polys, owner = [], []
    for k, seg in enumerate(segmentations):
        if isinstance(seg, list):
            polys.extend(seg)
            owner.extend([k] * len(seg))
        elif isinstance(seg["counts"], list):
            rles[k] = mask_utils.frPyObjects(seg, h, w)
        else:
            rles[k] = seg
    if polys:
        parts = defaultdict(list)
        for k, rle in zip(owner, mask_utils.frPyObjects(polys, h, w)):
            parts[k].append(rle)
        for k, p in parts.items():
            rles[k] = p[0] if len(p) == 1 else mask_utils.merge(p)
    if not rles:
        return torch.zeros((0, h, w), dtype=torch.uint8)
    masks = mask_utils.decode(rles)  # [h,w,n], Fortran order, i.e. contiguous as [n,w,h]
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))


class CocoInstances(torch.utils.data.Dataset):
    """COCO-format instance segmentation dataset (see the module docstring for the checks).

    Args:
        image_dir: folder that ``file_name`` in the JSON is relative to.
        ann_file: COCO instances JSON (a file without ``annotations``, like test-dev image info, gives
            images without targets).
        transforms: callable ``(image, target) -> (image, target)``, e.g. :func:`solq.data.build_transforms`.
        strict: raise :class:`DatasetError` instead of skipping bad input.
        keep_crowd: put crowd annotations into the targets too (``iscrowd`` = 1); default False.
        max_images: keep only the first n images in image id order (0 = all).
        check_images: "exists" (stat every file, default), "header" (also open each header: catches
            unreadable files and size mismatches up front) or "none".

    ``ds[i] -> (image, target)``. Without transforms: ``image`` a float tv_tensors.Image [3,H,W] in
    [0,1]; ``target`` = {boxes: BoundingBoxes XYXY absolute float32 [n,4] (clamped), masks: bool [n,H,W],
    labels: int64 [n] category ids, image_id: int64 [], area: float32 [n] (COCO's), iscrowd: int64 [n],
    orig_size / size: int64 [2] (h,w)}. With transforms, they receive the image as uint8
    tv_tensors.Image [3,H,W] and masks as uint8 {0,1} tv_tensors.Mask [n,H,W] (resizing uint8 is ~3x
    faster than bool) and the result is whatever they return.

    Attributes: ``coco`` (pycocotools COCO of the kept images, crowd included), ``ids`` (image ids),
    ``num_classes`` (max category id + 1), ``category_names`` {id: name}, ``report`` (DatasetReport).
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transforms: Optional[Callable] = None, *,
                 strict: bool = False, keep_crowd: bool = False, max_images: int = 0,
                 check_images: str = "exists"):
        if check_images not in ("none", "exists", "header"):
            raise ValueError(f"check_images must be 'none', 'exists' or 'header', got {check_images!r}")
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.transforms, self.strict, self.keep_crowd = transforms, strict, keep_crowd
        data = read_instances_json(self.ann_file)
        src = str(self.ann_file)
        report = self.report = DatasetReport(ann_file=src)
        skip_img, skip_ann = defaultdict(list), defaultdict(list)

        self.category_names = parse_categories(data, src)
        self.num_classes = max(self.category_names) + 1
        images = parse_images(data, src)
        anns = parse_annotations(data, images, self.category_names, src, report, skip_ann)
        self.ids: list[int] = self._select_images(images, max_images, check_images, skip_img)

        self._targets: dict[int, list] = {}  # image id -> [(annotation, clamped xyxy)] used as targets
        kept_anns = []
        for image_id in self.ids:
            entries = anns.get(image_id, [])
            kept_anns += [a for a, _ in entries]
            self._targets[image_id] = [e for e in entries if keep_crowd or not e[0].get("iscrowd", 0)]
            report.num_crowd += sum(1 for a, _ in entries if a.get("iscrowd", 0))
            report.num_annotations += len(self._targets[image_id])
            if not self._targets[image_id]:
                report.images_without_annotations.append(image_id)
        report.num_images = len(self.ids)
        report.skipped_images, report.skipped_annotations = dict(skip_img), dict(skip_ann)

        problems = report.problems()
        if problems and strict:
            raise DatasetError(f"{src} (strict): {problems}")
        if problems:
            warnings.warn(f"{src}: {problems}", DataWarning, stacklevel=2)

        self.coco = COCO()
        self.coco.dataset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        self.coco.dataset.update(images=[images[i] for i in self.ids], annotations=kept_anns)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self._images = images
        self._bad: set[int] = set()

    def _select_images(self, images: dict, max_images: int, check: str, skipped: dict) -> list[int]:
        ids = []
        for image_id in sorted(images):
            if max_images and len(ids) >= max_images:
                break
            info = images[image_id]
            path = self.image_dir / info["file_name"]
            if check == "exists" and not path.is_file():  # also False for names the OS refuses (NUL bytes)
                skipped["image file missing"].append(image_id)
                self.report.skipped_image_files[image_id] = str(path)
                continue
            if check == "header":
                try:
                    load_rgb(path, (info["width"], info["height"]), decode=False)
                except ImageLoadError as exc:
                    skipped[exc.reason].append(image_id)
                    self.report.skipped_image_files[image_id] = str(path)
                    continue
            ids.append(image_id)
        return ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for attempt in range(min(n, 32)):
            j = (index + attempt) % n
            if j in self._bad:
                continue
            try:
                return self._get(j)
            except ImageLoadError as exc:
                if self.strict:
                    raise
                self._bad.add(j)
                self.report.load_failures.setdefault(exc.reason, []).append(self.ids[j])
                warnings.warn(f"{exc}; using another image instead "
                              f"(strict=True makes this an error)", DataWarning, stacklevel=2)
        raise DatasetError(f"{self.ann_file}: no loadable image near index {index}; see ds.report")

    def _get(self, index: int):
        image_id = self.ids[index]
        info = self._images[image_id]
        h, w = info["height"], info["width"]
        try:
            pil, note = load_rgb(self.image_dir / info["file_name"], (w, h))
        except ImageLoadError as exc:
            raise ImageLoadError(f"image id {image_id}: {exc}", exc.reason) from None
        if note:
            warnings.warn(note, DataWarning, stacklevel=3)
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        target = self._target(image_id)
        if self.transforms is not None:
            return self.transforms(image, target)
        target["masks"] = target["masks"].to(torch.bool)
        return F.to_dtype(image, torch.float32, scale=True), target

    def target(self, index: int) -> dict:
        """The target of ``ds[index]`` without reading the image (masks as bool [n,H,W], no transforms).
        Raises DatasetError naming the file and the ids when a segmentation does not decode."""
        target = self._target(self.ids[index])
        target["masks"] = target["masks"].to(torch.bool)
        return target

    def _decode(self, image_id: int, anns: list[dict], h: int, w: int) -> torch.Tensor:
        """decode_masks, with an error naming the annotation and image when pycocotools refuses one."""
        try:
            return decode_masks([a["segmentation"] for a in anns], h, w)
        except Exception as exc:  # pycocotools raises several kinds; the checks should leave none reachable
            for a in anns:
                try:
                    decode_masks([a["segmentation"]], h, w)
                except Exception:
                    raise DatasetError(f"{self.ann_file}: annotation id {a['id']} of image id {image_id} "
                                       f"({self.image_dir / self._images[image_id]['file_name']}): undecodable "
                                       f"segmentation ({type(exc).__name__}: {exc})") from exc
            raise

    def _target(self, image_id: int) -> dict:
        info = self._images[image_id]
        h, w = info["height"], info["width"]
        entries = self._targets[image_id]
        anns = [a for a, _ in entries]
        boxes = torch.tensor([b for _, b in entries], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(self._decode(image_id, anns, h, w)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return (f"CocoInstances({self.ann_file.name}: {len(self)} images, {self.report.num_annotations} "
                f"instances, num_classes={self.num_classes})")

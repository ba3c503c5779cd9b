"""COCO-format instance segmentation dataset on pycocotools (reference §7.1), with input validation.

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
All skips are counted in ``ds.report`` (a :class:`DatasetReport`) and summarised in ONE warning,
e.g. ``skipped 3 annotations: 2 polygon with < 3 points (ann ids 5, 9), 1 empty segmentation (ann id 12)``.
``ds.coco`` holds exactly the kept images and the annotations that passed the checks, crowd included,
so evaluating against it matches what is trained on (and ``max_images`` subsets evaluate correctly).

A file that turns out to be unreadable or of the wrong size when ``ds[i]`` loads it raises
:class:`ImageLoadError` with ``strict=True``; otherwise it warns once for that file, records it in
``ds.report.load_failures`` (of the current process; DataLoader workers keep their own copy) and
returns the next loadable image instead, so a long training run does not die on one bad file.
For evaluation prefer ``check_images="header"``, which opens every file header (~0.25 ms/image)
at construction and skips bad images up front, so no substitution happens.

Images are decoded to RGB whatever their mode: grayscale, 16-bit, CMYK, palette, images with alpha
(composited on black), and EXIF orientation applied with ``PIL.ImageOps.exif_transpose``. COCO's
``width``/``height`` describe the displayed (rotated) image, so sizes are compared after rotation;
when only the stored, unrotated size matches the JSON, the stored pixels are used (with a warning),
since the annotations were then evidently drawn on them.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

__all__ = ["CocoInstances", "DatasetReport", "DatasetError", "ImageLoadError", "DataWarning", "load_rgb",
           "decode_masks"]


class DatasetError(ValueError):
    """The annotation file or an image is unusable; the message names the file/id and the problem."""


class ImageLoadError(DatasetError):
    """An image file is missing or unreadable, or its size differs from the annotation file.

    ``reason`` is the short category used in reports ("image file missing", ...)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class DataWarning(UserWarning):
    """Bad input was skipped (see ``CocoInstances.report``)."""


def _ids(ids: list[int], limit: int = 8) -> str:
    more = f", ... (+{len(ids) - limit})" if len(ids) > limit else ""
    return ", ".join(str(i) for i in ids[:limit]) + more


def _phrase(groups: dict[str, list[int]], what: str) -> str:
    parts = [f"{len(v)} {reason} ({what} id{'s' if len(v) > 1 else ''} {_ids(v)})" for reason, v in groups.items()]
    return ", ".join(parts)


@dataclass
class DatasetReport:
    """Counts of what the dataset kept, skipped and clamped. Reasons map to lists of ids."""

    ann_file: str = ""
    num_images: int = 0
    num_annotations: int = 0  # training instances kept over all kept images
    num_crowd: int = 0  # crowd annotations kept in ``coco`` (and in targets only with keep_crowd)
    skipped_images: dict[str, list[int]] = field(default_factory=dict)
    skipped_annotations: dict[str, list[int]] = field(default_factory=dict)
    dropped_polygon_parts: list[int] = field(default_factory=list)  # ann ids that lost a bad part
    clamped_boxes: list[int] = field(default_factory=list)  # ann ids with a box partly outside
    images_without_annotations: list[int] = field(default_factory=list)
    load_failures: dict[str, list[int]] = field(default_factory=dict)  # filled by ds[i], this process

    @property
    def num_skipped(self) -> int:
        return sum(map(len, self.skipped_images.values())) + sum(map(len, self.skipped_annotations.values()))

    def problems(self) -> str:
        """The one-line summary of what was skipped or dropped ('' when nothing was)."""
        parts = []
        n_img = sum(map(len, self.skipped_images.values()))
        n_ann = sum(map(len, self.skipped_annotations.values()))
        if n_img:
            parts.append(f"skipped {n_img} image{'s' * (n_img > 1)}: {_phrase(self.skipped_images, 'image')}")
        if n_ann:
            parts.append(f"skipped {n_ann} annotation{'s' * (n_ann > 1)}: "
                         f"{_phrase(self.skipped_annotations, 'ann')}")
        if self.dropped_polygon_parts:
            parts.append(f"dropped polygon parts with < 3 points from {len(self.dropped_polygon_parts)} "
                         f"annotations (ann ids {_ids(self.dropped_polygon_parts)})")
        return "; ".join(parts)

    def summary(self) -> str:
        """Multi-line human-readable report."""
        lines = [f"{self.ann_file}: {self.num_images} images, {self.num_annotations} instances, "
                 f"{self.num_crowd} crowd annotations",
                 f"  {len(self.images_without_annotations)} images without annotations (kept as negatives)",
                 f"  {len(self.clamped_boxes)} boxes clamped to the image"]
        if self.problems():
            lines.append("  " + self.problems())
        for reason, ids in self.load_failures.items():
            lines.append(f"  load failures: {len(ids)} {reason} (image ids {_ids(ids)})")
        return "\n".join(lines)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _require(record: Any, keys: dict[str, Callable[[Any], bool]], where: str, source: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{source}: {where} is a {type(record).__name__}, expected an object")
    for key, ok in keys.items():
        if key not in record:
            raise DatasetError(f"{source}: {where} has no key {key!r}")
        if not ok(record[key]):
            raise DatasetError(f"{source}: {where} has an invalid {key!r}: {record[key]!r}")


def _check_bbox(bbox: Any, w: int, h: int) -> tuple[Optional[str], Optional[tuple], bool]:
    """COCO xywh -> (reason to skip or None, clamped xyxy, was clamped)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return "invalid bbox", None, False
    x, y, bw, bh = bbox
    if bw <= 0 or bh <= 0:
        return "degenerate bbox (w or h <= 0)", None, False
    box = (max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h))
    if box[2] <= box[0] or box[3] <= box[1]:
        return "bbox outside image", None, False
    return None, box, box != (x, y, x + bw, y + bh)


def _check_segmentation(seg: Any, w: int, h: int) -> tuple[Optional[str], Any, bool]:
    """-> (reason to skip or None, segmentation to use, whether polygon parts were dropped)."""
    if not seg:
        return "empty segmentation", None, False
    if isinstance(seg, list):
        if not all(isinstance(p, list) for p in seg):
            return "malformed polygon (expected a list of coordinate lists)", None, False
        good = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not good:
            empty = all(len(p) == 0 for p in seg)
            return ("empty segmentation" if empty else "polygon with < 3 points"), None, False
        return None, good, len(good) < len(seg)
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "malformed RLE (needs 'counts' and 'size')", None, False
        if list(seg["size"]) != [h, w]:
            return "RLE size differs from image", None, False
        counts = seg["counts"]
        if isinstance(counts, list):
            if not counts:
                return "empty segmentation", None, False
            if sum(counts) != h * w:
                return "malformed RLE (counts do not sum to h*w)", None, False
        elif not isinstance(counts, (str, bytes)) or not counts:
            return "malformed RLE", None, False
        return None, seg, False
    return "malformed segmentation", None, False


def load_rgb(path: Path | str, expected_wh: Optional[tuple[int, int]] = None, *, decode: bool = True):
    """Open an image as 8-bit RGB with EXIF orientation applied.

    Takes ``expected_wh`` = (width, height) from the JSON. Returns ``(PIL RGB image or None if not decode,
    note)`` where note is '' or says that the stored (unrotated) pixels were used. Raises
    :class:`ImageLoadError` when the file is missing, unreadable or of another size.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            raw = im.size
            shown = raw[::-1] if orientation in (5, 6, 7, 8) else raw
            note = ""
            if expected_wh is not None and shown != tuple(expected_wh):
                if raw != tuple(expected_wh):
                    raise ImageLoadError(f"{path}: image is {shown[0]}x{shown[1]} (w x h, after EXIF orientation) "
                                         f"but the annotation file says {expected_wh[0]}x{expected_wh[1]}",
                                         "image size differs from the JSON")
                note = (f"{path}: EXIF orientation {orientation} would give {shown[0]}x{shown[1]} but the "
                        f"annotation file gives the stored size {raw[0]}x{raw[1]}; using the stored pixels")
            if not decode:
                return None, note
            im.load()  # decode now, inside the try: corrupt data raises here, and the file can close
            return _to_rgb(im if note else ImageOps.exif_transpose(im)), note
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: image file missing", "image file missing") from None
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{path}: unreadable image file ({type(exc).__name__}: {exc})",
                             "unreadable image file") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: rescale instead of clipping
        arr = np.asarray(im)
        if arr.max() > 255:
            arr = arr.astype(np.float32) / 257.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


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


def _read_json(ann_file: Path) -> dict:
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann_file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: not a COCO instances file (top level is a {type(data).__name__}, "
                           "expected an object with 'images', 'annotations', 'categories')")
    for key in ("images", "categories"):
        if key not in data:
            raise DatasetError(f"{ann_file}: not a COCO instances file: missing key {key!r} "
                               f"(found keys: {sorted(data)})")
    for key in ("images", "categories", "annotations"):
        if key in data and not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _parse_categories(data: dict, src: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        _require(cat, {"id": _is_int, "name": lambda v: isinstance(v, str)}, f"categories[{i}]", src)
        if cat["id"] in names:
            raise DatasetError(f"{src}: duplicate category id {cat['id']}")
        names[cat["id"]] = cat["name"]
    if not names:
        raise DatasetError(f"{src}: 'categories' is empty")
    return names


def _parse_images(data: dict, src: str) -> dict[int, dict]:
    images: dict[int, dict] = {}
    pos = lambda v: _is_int(v) and v > 0  # noqa: E731
    for i, img in enumerate(data["images"]):
        _require(img, {"id": _is_int, "file_name": lambda v: isinstance(v, str) and v, "width": pos, "height": pos},
                 f"images[{i}]", src)
        if img["id"] in images:
            raise DatasetError(f"{src}: duplicate image id {img['id']} ({images[img['id']]['file_name']!r} "
                               f"and {img['file_name']!r})")
        images[img["id"]] = img
    return images


def _parse_annotations(data: dict, images: dict, categories: dict, src: str, report: DatasetReport,
                       skipped: dict) -> dict[int, list]:
    """-> {image_id: [(annotation as kept in ``coco``, clamped xyxy box)]}; fills ``skipped`` and report."""
    per_image: dict[int, list] = defaultdict(list)
    seen: set[int] = set()
    for i, ann in enumerate(data.get("annotations", [])):
        _require(ann, {"id": _is_int, "image_id": _is_int, "category_id": _is_int}, f"annotations[{i}]", src)
        aid, img = ann["id"], images.get(ann["image_id"])
        box, clamped, seg, dropped = None, False, None, False
        if aid in seen:
            reason = "duplicate annotation id"
        elif img is None:
            reason = "annotation on unknown image id"
        elif ann["category_id"] not in categories:
            reason = "unknown category id"
        else:
            reason, box, clamped = _check_bbox(ann.get("bbox"), img["width"], img["height"])
            if reason is None:
                reason, seg, dropped = _check_segmentation(ann.get("segmentation"), img["width"], img["height"])
        seen.add(aid)
        if reason is not None:
            skipped[reason].append(aid)
            continue
        if dropped:
            report.dropped_polygon_parts.append(aid)
            ann = dict(ann, segmentation=seg)
        if clamped:
            report.clamped_boxes.append(aid)
        per_image[ann["image_id"]].append((ann, box))
    return per_image


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
        data = _read_json(self.ann_file)
        src = str(self.ann_file)
        report = self.report = DatasetReport(ann_file=src)
        skip_img, skip_ann = defaultdict(list), defaultdict(list)

        self.category_names = _parse_categories(data, src)
        self.num_classes = max(self.category_names) + 1
        images = _parse_images(data, src)
        anns = _parse_annotations(data, images, self.category_names, src, report, skip_ann)
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
            if check == "exists" and not path.is_file():
                skipped["image file missing"].append(image_id)
                continue
            if check == "header":
                try:
                    load_rgb(path, (info["width"], info["height"]), decode=False)
                except ImageLoadError as exc:
                    skipped[exc.reason].append(image_id)
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
        entries = self._targets[image_id]
        anns = [a for a, _ in entries]
        boxes = torch.tensor([b for _, b in entries], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(decode_masks([a["segmentation"] for a in anns], h, w)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.transforms is not None:
            return self.transforms(image, target)
        target["masks"] = target["masks"].to(torch.bool)
        return F.to_dtype(image, torch.float32, scale=True), target

    def __repr__(self) -> str:
        return (f"CocoInstances({self.ann_file.name}: {len(self)} images, {self.report.num_annotations} "
                f"instances, num_classes={self.num_classes})")

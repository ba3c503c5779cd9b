"""Checks of a COCO instances JSON, as tabled in :mod:`solq.data.coco`, and what they report.

- :class:`DatasetError` (unusable input: the message names the file, id and problem) and
  :class:`DataWarning` (bad input was skipped).
- :class:`DatasetReport`: what the dataset kept, skipped and clamped, with the one-line summary.
- :func:`read_instances_json` -> the top-level dict; :func:`parse_categories` / :func:`parse_images` raise on
  malformed or duplicate records; :func:`parse_annotations` skips bad annotations (bbox, segmentation, area
  and iscrowd checks), recording each under a short reason.

Every message names the annotation file and the record: its position (``images[3]``) and id, and for a
skipped annotation its id and its image's id. Whatever a JSON document holds (wrong types, NaN, huge or
negative numbers, wrong nesting), these functions raise :class:`DatasetError` or count a skip, nothing else,
and what passes decodes with pycocotools (tests/test_data_fuzz.py checks this on thousands of documents).

Images themselves are checked in :mod:`solq.data.images`.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["DatasetError", "DataWarning", "DatasetReport", "read_instances_json", "parse_categories",
           "parse_images", "parse_annotations"]


class DatasetError(ValueError):
    """The annotation file or an image is unusable; the message names the file/id and the problem."""


class DataWarning(UserWarning):
    """Bad input was skipped (see ``CocoInstances.report``)."""


INT64_MAX = 2 ** 63 - 1  # ids become int64 tensors
MAX_CATEGORY_ID = 100_000  # num_classes is the largest category id + 1: a larger id is a typo, not a class


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
    skipped_annotation_images: dict[int, Any] = field(default_factory=dict)  # ann id -> its image_id
    skipped_image_files: dict[int, str] = field(default_factory=dict)  # image id -> the file it names
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
            files = list(self.skipped_image_files.values())
            parts.append(f"skipped {n_img} image{'s' * (n_img > 1)}: {_phrase(self.skipped_images, 'image')}"
                         + (f" (file{'s' * (len(files) > 1)} {_ids(files)})" if files else ""))
        if n_ann:
            images = list(dict.fromkeys(self.skipped_annotation_images.values()))
            parts.append(f"skipped {n_ann} annotation{'s' * (n_ann > 1)}: "
                         f"{_phrase(self.skipped_annotations, 'ann')}"
                         + (f" (on image id{'s' * (len(images) > 1)} {_ids(images)})" if images else ""))
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
    """A JSON integer that fits the int64 tensors ids become."""
    return isinstance(x, int) and not isinstance(x, bool) and -INT64_MAX <= x <= INT64_MAX


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _ids_of(record: Any) -> str:
    """" (image id 3)" / " (annotation id 5, image id 3)": the ids a record carries, for messages."""
    if not isinstance(record, dict):
        return ""
    names = {"id": "id", "image_id": "image id", "category_id": "category id"}
    found = [f"{names[k]} {_short(record[k], 24)}" for k in names if k in record]
    return f" ({', '.join(found)})" if found else ""


def _require(record: Any, keys: dict[str, Callable[[Any], bool]], where: str, source: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{source}: {where} is a {type(record).__name__}, expected an object")
    for key, ok in keys.items():
        if key not in record:
            raise DatasetError(f"{source}: {where} has no key {key!r}{_ids_of(record)}")
        if not ok(record[key]):
            raise DatasetError(f"{source}: {where} has an invalid {key!r}: {_short(record[key])}{_ids_of(record)}")


def _check_bbox(bbox: Any, w: int, h: int) -> tuple[Optional[str], Optional[tuple], bool]:
    """COCO xywh -> (reason to skip or None, clamped xyxy, was clamped)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
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
        if not all(_is_number(v) for p in seg for v in p):
            return "malformed polygon (coordinates must be finite numbers)", None, False
        good = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not good:
            empty = all(len(p) == 0 for p in seg)
            return ("empty segmentation" if empty else "polygon with < 3 points"), None, False
        return None, good, len(good) < len(seg)
    if isinstance(seg, dict):
        return _check_rle(seg, w, h)
    return "malformed segmentation", None, False


def _check_rle(seg: dict, w: int, h: int) -> tuple[Optional[str], Any, bool]:
    """An RLE dict -> (reason to skip or None, the RLE, False); its counts must cover exactly h*w pixels."""
    if "counts" not in seg or "size" not in seg:
        return "malformed RLE (needs 'counts' and 'size')", None, False
    size = seg["size"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
        return "malformed RLE (size must be [height, width])", None, False
    if size != [h, w]:
        return "RLE size differs from image", None, False
    counts = seg["counts"]
    if isinstance(counts, list):
        if not counts:
            return "empty segmentation", None, False
        if not all(_is_int(c) and c >= 0 for c in counts):
            return "malformed RLE (counts must be integers >= 0)", None, False
    elif isinstance(counts, str) and counts:
        counts = compressed_rle_counts(counts)
        if counts is None:
            return "malformed RLE (undecodable compressed counts)", None, False
    else:
        return "malformed RLE", None, False
    if sum(counts) != h * w:
        return "malformed RLE (counts do not sum to h*w)", None, False
    return None, seg, False


def compressed_rle_counts(text: str) -> Optional[list[int]]:
    """The run lengths of a COCO compressed RLE string (pycocotools' LEB128-like 6-bit code, runs after the
    second stored as differences), or None when the string is not such a code or gives a negative run."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos == len(text):
                return None  # the string ends inside a number
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def _check_extras(ann: dict) -> Optional[str]:
    """Reason to skip when ``area`` or ``iscrowd`` (both optional) are present but unusable."""
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        return "invalid area"
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        return "invalid iscrowd (must be 0 or 1)"
    return None


def read_instances_json(ann_file: Path) -> dict:
    """Load ``ann_file`` -> its top-level dict, with ``images`` and ``categories`` lists; DatasetError otherwise."""
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann_file}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DatasetError(f"{ann_file}: JSON nested too deeply to be a COCO instances file") from None
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


def parse_categories(data: dict, src: str) -> dict[int, str]:
    """``data["categories"]`` -> {category id: name}; DatasetError on a malformed, duplicate or empty list."""
    names: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        _require(cat, {"id": _is_int, "name": lambda v: isinstance(v, str)}, f"categories[{i}]", src)
        if not 0 <= cat["id"] <= MAX_CATEGORY_ID:
            raise DatasetError(f"{src}: categories[{i}] has id {cat['id']}, outside 0..{MAX_CATEGORY_ID} (the "
                               f"model's num_classes is the largest category id + 1)")
        if cat["id"] in names:
            raise DatasetError(f"{src}: duplicate category id {cat['id']}")
        names[cat["id"]] = cat["name"]
    if not names:
        raise DatasetError(f"{src}: 'categories' is empty")
    return names


def parse_images(data: dict, src: str) -> dict[int, dict]:
    """``data["images"]`` -> {image id: image record}; DatasetError on a malformed record or duplicate id."""
    images: dict[int, dict] = {}
    pos = lambda v: _is_int(v) and v > 0  # noqa: E731
    for i, img in enumerate(data["images"]):
        _require(img, {"id": _is_int, "file_name": lambda v: isinstance(v, str) and v, "width": pos, "height": pos},
                 f"images[{i}]", src)
        if img["id"] in images:
            raise DatasetError(f"{src}: duplicate image id {img['id']} ({images[img['id']]['file_name']!r} "
                               f"and {img['file_name']!r}) at images[{i}]")
        images[img["id"]] = img
    return images


def parse_annotations(data: dict, images: dict, categories: dict, src: str, report: DatasetReport,
                       skipped: dict) -> dict[int, list]:
    """-> {image_id: [(annotation as kept in ``coco``, clamped xyxy box)]}; fills ``skipped`` (reason -> ann
    ids) and the report (``skipped_annotation_images``, dropped polygon parts, clamped boxes)."""
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
            if reason is None:
                reason = _check_extras(ann)
        seen.add(aid)
        if reason is not None:
            skipped[reason].append(aid)
            report.skipped_annotation_images.setdefault(aid, ann["image_id"])
            continue
        if dropped:
            report.dropped_polygon_parts.append(aid)
            ann = dict(ann, segmentation=seg)
        if clamped:
            report.clamped_boxes.append(aid)
        per_image[ann["image_id"]].append((ann, box))
    return per_image

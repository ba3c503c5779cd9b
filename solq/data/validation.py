"""Checks of a COCO instances JSON, as tabled in :mod:`solq.data.coco`, and what they report.

- :class:`DatasetError` (unusable input: the message names the file, id and problem) and
  :class:`DataWarning` (bad input was skipped).
- :class:`DatasetReport`: what the dataset kept, skipped and clamped, with the one-line summary.
- :func:`read_instances_json` -> the top-level dict; :func:`parse_categories` / :func:`parse_images` raise on
  malformed or duplicate records; :func:`parse_annotations` skips bad annotations (bbox and segmentation
  checks), recording each under a short reason.

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


def read_instances_json(ann_file: Path) -> dict:
    """Load ``ann_file`` -> its top-level dict, with ``images`` and ``categories`` lists; DatasetError otherwise."""
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


def parse_categories(data: dict, src: str) -> dict[int, str]:
    """``data["categories"]`` -> {category id: name}; DatasetError on a malformed, duplicate or empty list."""
    names: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        _require(cat, {"id": _is_int, "name": lambda v: isinstance(v, str)}, f"categories[{i}]", src)
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
                               f"and {img['file_name']!r})")
        images[img["id"]] = img
    return images


def parse_annotations(data: dict, images: dict, categories: dict, src: str, report: DatasetReport,
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

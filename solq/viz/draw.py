"""Drawing instances (predictions or ground truth) on images: masks, boxes, class names, scores.

Everything takes an image as uint8 [H,W,3] numpy, float [H,W,3] in [0,1], a tensor [3,H,W] (float in
[0,1] or uint8), a PIL image or a file path, and instances as a dict of arrays or tensors::

    {"boxes": [K,4] xyxy absolute, "labels": [K] category ids, "masks": bool [K,H,W] (optional),
     "scores": [K] (optional; ground truth has none), "query_index": [K] (optional)}

Colours are stable: instance i gets ``PALETTE[key_i % len(PALETTE)]`` where the key is its
``query_index`` when present (the same query keeps its colour across thresholds, layers and figures),
else its position. Pixel work (mask fill, mask outlines) is vectorised over all instances at once.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from solq.data.images import load_rgb

__all__ = ["PALETTE", "Drawn", "to_uint8_image", "denormalize", "as_numpy", "instance_colors", "select",
           "select_or_top", "mask_edges", "blend_masks", "draw_instances", "overlay", "label_text",
           "threshold_summary"]


def _make_palette(n: int = 24) -> np.ndarray:
    """n distinct RGB colours: golden-ratio hues alternating between two saturation/value pairs."""
    rows = []
    for i in range(n):
        s, v = (0.85, 0.95) if i % 2 == 0 else (0.6, 0.8)
        rows.append([round(255 * c) for c in colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0, s, v)])
    return np.array(rows, dtype=np.uint8)


PALETTE = _make_palette()  # uint8 [24,3]


@dataclass
class Drawn:
    """What :func:`draw_instances` drew.

    image: uint8 [H,W,3], the rendered image (with ``ax``: the raster shown in the axes, i.e. masks and
    outlines; boxes and text are matplotlib artists). indices: int64 [n], positions of the drawn
    instances in the input (after the score threshold, in drawing order). colors: uint8 [n,3].
    gt_indices: int64 [g], the ground-truth instances drawn when ``ground_truth`` was given.
    fallback: True when no instance reached the threshold and ``indices`` are the best ones below it
    (``draw_instances(fallback_topk=k)``). best_score: the highest score among all input instances
    (NaN without instances or scores), so a caption can say how far below the threshold they were.
    """

    image: np.ndarray
    indices: np.ndarray
    colors: np.ndarray
    gt_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fallback: bool = False
    best_score: float = float("nan")

    @property
    def count(self) -> int:
        """Instances drawn (including fallback ones)."""
        return int(len(self.indices))

    @property
    def above_threshold(self) -> int:
        """Drawn instances that reach the threshold: ``count``, or 0 when the fallback drew them."""
        return 0 if self.fallback else self.count


# ------------------------------------------------------------------------------------------ inputs
def as_numpy(x: Any) -> np.ndarray:
    """Tensor / array-like (including objects with ``__array__`` such as RLE-backed masks) -> numpy."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def denormalize(image: Any, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """An ImageNet-normalised float image [3,H,W] (the transforms' output) -> uint8 [H,W,3]."""
    x = as_numpy(image).astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"denormalize: expected a normalised image [3,H,W], got shape {x.shape}")
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (x.transpose(1, 2, 0).clip(0, 1) * 255 + 0.5).astype(np.uint8)


def to_uint8_image(image: Any) -> np.ndarray:
    """uint8 [H,W,3] from uint8/float numpy [H,W,3] or [H,W], a tensor [3,H,W] / [H,W,3], a PIL image or
    an image file path (EXIF orientation applied).

    Float images must lie in [0,1] (use :func:`denormalize` for ImageNet-normalised tensors).
    Raises ValueError naming the shape or range that is wrong.
    """
    if isinstance(image, (str, Path)):
        return np.asarray(load_rgb(image)[0])
    if hasattr(image, "convert") and hasattr(image, "size") and not hasattr(image, "shape"):  # PIL
        return np.asarray(image.convert("RGB"))
    is_tensor = hasattr(image, "detach")
    x = as_numpy(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3:
        raise ValueError(f"image: expected [H,W,3] or [3,H,W], got shape {x.shape}")
    if x.shape[0] in (1, 3) and (is_tensor or x.shape[-1] not in (1, 3)):
        x = x.transpose(1, 2, 0)  # tensors are channel-first
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=2)
    if x.shape[-1] != 3:
        raise ValueError(f"image: expected 3 channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype == bool:
        return x.astype(np.uint8) * 255
    x = x.astype(np.float32)
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"image: float values must lie in [0,1], got [{x.min():.3g}, {x.max():.3g}] "
                         f"(ImageNet-normalised? use solq.viz.denormalize)")
    return (x.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def instance_colors(keys: Any) -> np.ndarray:
    """Stable colours: int keys [K] -> uint8 [K,3] = PALETTE[key % len(PALETTE)]."""
    k = as_numpy(keys).astype(np.int64).reshape(-1)
    return PALETTE[np.mod(k, len(PALETTE))]


def select(instances: Mapping[str, Any], score_threshold: float = 0.0, max_instances: Optional[int] = None
           ) -> tuple[dict, np.ndarray]:
    """Instances with score >= ``score_threshold`` (all when there are no scores), best first.

    Returns (dict of numpy arrays restricted to them, int64 indices [n] into the input). Masks given as
    something array-like (e.g. RLE-backed) are decoded here.
    """
    boxes = as_numpy(instances.get("boxes", np.zeros((0, 4)))).reshape(-1, 4).astype(np.float64)
    n = len(boxes)
    scores = instances.get("scores")
    if scores is not None:
        s = as_numpy(scores).astype(np.float64).reshape(-1)
        idx = np.flatnonzero(s >= score_threshold)
        idx = idx[np.argsort(-s[idx], kind="stable")]
    else:
        idx = np.arange(n)
    if max_instances is not None:
        idx = idx[:max_instances]
    out = {"boxes": boxes[idx]}
    for key in ("labels", "scores", "query_index"):
        if instances.get(key) is not None:
            out[key] = as_numpy(instances[key]).reshape(-1)[idx]
    if instances.get("masks") is not None:
        masks = instances["masks"]
        if isinstance(masks, list):  # COCO RLE dicts
            from pycocotools import mask as mask_utils

            masks = (mask_utils.decode([masks[i] for i in idx]).transpose(2, 0, 1) if len(idx)
                     else None)
            out["masks"] = masks.astype(bool) if masks is not None else None
        else:
            out["masks"] = as_numpy(masks)[idx].astype(bool)
    return out, idx.astype(np.int64)


def select_or_top(instances: Mapping[str, Any], score_threshold: float = 0.0,
                  max_instances: Optional[int] = None, *, fallback_topk: int = 0) -> tuple[dict, np.ndarray, bool]:
    """:func:`select`, except that when the instances have scores and none reaches ``score_threshold``,
    the ``fallback_topk`` best ones (at most ``max_instances``) are selected instead, so that a gallery
    panel shows what the model did find; ``fallback_topk=0`` disables this.

    Returns (dict of numpy arrays, int64 indices [n] into the input, best first, fell_back): fell_back is
    True when the selection is the below-threshold top-k.
    """
    sel, idx = select(instances, score_threshold, max_instances)
    if len(idx) or fallback_topk <= 0 or instances.get("scores") is None:
        return sel, idx, False
    k = fallback_topk if max_instances is None else min(fallback_topk, max_instances)
    sel, idx = select(instances, -np.inf, k)
    return sel, idx, bool(len(idx))


def _best_score(instances: Optional[Mapping[str, Any]]) -> float:
    """Highest score of the instances; NaN without instances or scores."""
    if instances is None or instances.get("scores") is None:
        return float("nan")
    s = as_numpy(instances["scores"]).astype(np.float64).reshape(-1)
    return float(np.nanmax(s)) if len(s) and not np.isnan(s).all() else float("nan")


def threshold_summary(drawn: Drawn, score_threshold: float) -> str:
    """A caption for a panel drawn with ``score_threshold``, which never leaves an empty panel unexplained.

    "3 ≥ 0.3" when instances reach the threshold; "none ≥ 0.30 · showing top 3 (best 0.12)" when the
    fallback drew the best ones below it; "none ≥ 0.30 (best 0.12)" when nothing was drawn although there
    were scored instances (fallback disabled); "no detections" when there were none at all.
    """
    best = drawn.best_score
    if drawn.fallback:
        return f"none ≥ {score_threshold:.2f} · showing top {drawn.count} (best {best:.2f})"
    if drawn.count:
        return f"{drawn.count} ≥ {score_threshold:g}"
    if np.isnan(best):  # not even a low-scoring instance to report
        return "no detections"
    return f"none ≥ {score_threshold:.2f} (best {best:.2f})"


def label_text(label: int, score: Optional[float], names: Optional[Mapping[int, str]]) -> str:
    name = (names or {}).get(int(label), f"class {int(label)}")
    return name if score is None else f"{name} {float(score):.2f}"


# --------------------------------------------------------------------------------------- rendering
def mask_edges(masks: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner outline of each mask: bool [K,H,W] -> bool [K,H,W] (mask minus its erosion by ``width``)."""
    from scipy import ndimage

    masks = np.asarray(masks, dtype=bool)
    if masks.size == 0:
        return masks.copy()
    structure = np.zeros((1, 3, 3), bool)
    structure[0, 1, :] = structure[0, :, 1] = True  # erode within each mask's plane only
    eroded = ndimage.binary_erosion(masks, structure=structure, iterations=max(width, 1), border_value=0)
    return masks & ~eroded


def blend_masks(image: np.ndarray, masks: np.ndarray, colors: np.ndarray, *, alpha: float = 0.5,
                fill: bool = True, edges: bool = True, edge_width: int = 1) -> np.ndarray:
    """Paint masks on an image: uint8 [H,W,3], bool [K,H,W], uint8 [K,3] -> uint8 [H,W,3].

    Where masks overlap, the first one (the best, for score-sorted input) is shown. ``fill`` blends
    with ``alpha``; ``edges`` draws each mask's outline opaque.
    """
    out = image.astype(np.float32)
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[0] == 0:
        return image.copy()
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks are {masks.shape[1:]} (H,W) but the image is {image.shape[:2]}")
    colors = np.asarray(colors, np.float32)
    if fill:
        covered = masks.any(0)
        owner = np.argmax(masks, axis=0)  # first True along K: the best mask on top
        out[covered] = (1 - alpha) * out[covered] + alpha * colors[owner[covered]]
    if edges:
        rim = mask_edges(masks, edge_width)
        on_rim = rim.any(0)
        out[on_rim] = colors[np.argmax(rim, axis=0)[on_rim]]
    return out.clip(0, 255).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def _rasterize_boxes(canvas: np.ndarray, boxes: np.ndarray, colors: np.ndarray, texts: list[str], *,
                     dashed: bool, linewidth: int, draw_boxes: bool = True) -> np.ndarray:
    """Boxes and labels with PIL: uint8 [H,W,3] -> uint8 [H,W,3]."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    font = _font(max(10, min(canvas.shape[:2]) // 40))
    for (x0, y0, x1, y1), color, text in zip(boxes.tolist(), colors.tolist(), texts):
        color = tuple(int(c) for c in color)
        if not draw_boxes:
            pass
        elif dashed:  # dashes along the four sides
            for a, b, c, d in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
                length = max(abs(c - a), abs(d - b))
                steps = max(int(length // 6), 1)
                for s in range(0, steps, 2):
                    t0, t1 = s / steps, min((s + 1) / steps, 1.0)
                    draw.line([a + (c - a) * t0, b + (d - b) * t0, a + (c - a) * t1, b + (d - b) * t1],
                              fill=color, width=linewidth)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=color, width=linewidth)
        if text:
            tb = draw.textbbox((x0, y0), text, font=font)
            ty = y0 - (tb[3] - tb[1]) - 2 if y0 - (tb[3] - tb[1]) - 2 >= 0 else y0
            tb = draw.textbbox((x0, ty), text, font=font)
            draw.rectangle(tb, fill=color)
            draw.text((x0, ty), text, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def _artist_boxes(ax, boxes: np.ndarray, colors: np.ndarray, texts: list[str], *, dashed: bool,
                  linewidth: float, fontsize: float, draw_boxes: bool = True) -> None:
    from matplotlib.patches import Rectangle

    for (x0, y0, x1, y1), color, text in zip(boxes.tolist(), colors / 255.0, texts):
        if draw_boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                   linewidth=linewidth, linestyle="--" if dashed else "-"))
        if text:
            ax.text(x0, y0, text, fontsize=fontsize, color="black", va="bottom", ha="left", clip_on=True,
                    bbox=dict(facecolor=color, edgecolor="none", pad=1, alpha=0.85))


def draw_instances(image: Any, instances: Optional[Mapping[str, Any]], *, score_threshold: float = 0.0,
                   category_names: Optional[Mapping[int, str]] = None, ax=None, show_masks: bool = True,
                   show_boxes: bool = True, show_labels: bool = True, style: str = "prediction",
                   ground_truth: Optional[Mapping[str, Any]] = None, alpha: float = 0.5,
                   color_keys: Any = None, max_instances: Optional[int] = None, linewidth: int = 2,
                   fontsize: float = 7, gt_color: Sequence[int] = (255, 255, 255), fallback_topk: int = 0) -> Drawn:
    """Draw ``instances`` on ``image``.

    Args:
        image: see :func:`to_uint8_image` (size H,W must match the masks).
        instances: dict with boxes [K,4] xyxy, labels [K], optional masks bool [K,H,W], scores [K],
            query_index [K] (None draws nothing but the ground truth / image).
        score_threshold: keep scores >= it (ignored without scores).
        category_names: {category id: name} for the labels.
        ax: a matplotlib Axes to draw into (image shown with imshow, boxes/text as artists); None
            rasterises everything into the returned image instead.
        style: "prediction" (filled masks, solid boxes, "name score") or "gt" (filled masks, dashed
            boxes, "name").
        ground_truth: also draw these instances under the others, outlined in ``gt_color`` (mask
            outlines, dashed boxes, names).
        color_keys: int [K] keys for the colours (default: query_index, else the position).
        max_instances: draw at most this many (best first).
        fallback_topk: when no scored instance reaches ``score_threshold``, draw the best this many
            instead and set ``Drawn.fallback`` (see :func:`select_or_top`); 0 (the default here: a
            primitive draws what it is asked) draws nothing then. Galleries default to 3.
    Returns a :class:`Drawn`; :func:`threshold_summary` turns it into a caption.
    """
    if style not in ("prediction", "gt"):
        raise ValueError(f"draw_instances: style must be 'prediction' or 'gt', got {style!r}")
    canvas = to_uint8_image(image)
    layers = []  # (selected dict, indices, colours, style)
    gt_idx = np.zeros(0, dtype=np.int64)
    if ground_truth is not None:  # an overlay: one colour, outlines only, under the predictions
        gt, gt_idx = select(ground_truth, 0.0)
        layers.append((gt, gt_idx, np.tile(np.asarray(gt_color, np.uint8), (len(gt_idx), 1)), "overlay"))
    idx = np.zeros(0, dtype=np.int64)
    colors = np.zeros((0, 3), np.uint8)
    fell_back = False
    if instances is not None:
        sel, idx, fell_back = select_or_top(instances, score_threshold, max_instances, fallback_topk=fallback_topk)
        if color_keys is not None:
            keys = as_numpy(color_keys).reshape(-1)[idx]
        elif "query_index" in sel:
            keys = sel["query_index"]
        else:
            keys = idx
        colors = instance_colors(keys)
        layers.append((sel, idx, colors, style))

    edge = max(1, min(canvas.shape[:2]) // 250)
    for sel, _, cols, st in layers:  # pixels: ground-truth overlay first, then the instances on top
        if show_masks and sel.get("masks") is not None and len(sel["masks"]):
            canvas = blend_masks(canvas, sel["masks"], cols, alpha=alpha, fill=st != "overlay", edges=True,
                                 edge_width=edge)
    if ax is not None:
        ax.imshow(canvas)
        ax.set_axis_off()
    for sel, _, cols, st in layers:
        if not (show_boxes or show_labels) or not len(sel["boxes"]):
            continue
        scores = sel.get("scores") if st == "prediction" else None
        dashed = st != "prediction"
        labels = sel.get("labels", np.full(len(sel["boxes"]), -1))
        texts = ([label_text(l, None if scores is None else s, category_names)
                  for l, s in zip(labels, scores if scores is not None else [None] * len(labels))]
                 if show_labels else [""] * len(labels))
        # labels without boxes stay anchored at the box corners
        if ax is not None:
            _artist_boxes(ax, sel["boxes"], cols, texts, dashed=dashed, linewidth=linewidth * 0.6,
                          fontsize=fontsize, draw_boxes=show_boxes)
        else:
            canvas = _rasterize_boxes(canvas, sel["boxes"], cols, texts, dashed=dashed, linewidth=linewidth,
                                      draw_boxes=show_boxes)
    return Drawn(image=canvas, indices=idx, colors=colors, gt_indices=gt_idx, fallback=fell_back,
                 best_score=_best_score(instances))


def overlay(image: np.ndarray, detections: Mapping[str, Any], names: Optional[Mapping[int, str]] = None) -> np.ndarray:
    """uint8 [H,W,3] ``image`` with ``detections`` (boxes, labels, scores, optional masks) drawn on it: the
    overlay files of ``solq predict`` (``solq.engine.predict.predict(draw=overlay)``)."""
    return draw_instances(image, detections, category_names=names).image

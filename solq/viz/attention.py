"""Decoder attention (paper Fig. 4, Appendix A.3): where each object query samples the image.

Every decoder layer's deformable cross-attention lets query q sample P points per head (M) and feature
level (L_f) around its reference, with softmax weights summing to 1 per head over (L_f, P). We draw,
for chosen queries, all M x L_f x P sampling locations of every decoder layer on the image, sized by
weight and coloured by level (or head), with the reference box the layer attends around, the box the
layer predicts and the query's final mask: one panel per layer. The paper's observation is that
SOLQ's queries attend to the outline of objects (DETR's to their extremities);
:func:`attention_on_outline` measures that as the share of attention weight near the mask boundary,
beside the share of the box area that lies there (chance).

Inputs are the ``attention`` dict of ``Predictor(image, return_attention=True)``: ``locations``
[L,Q,M,L_f,P,2] (x, y in [0,1] of the image), ``weights`` [L,Q,M,L_f,P], ``references`` [L,Q,4]
(cx, cy, w, h; w, h NaN for point references), ``layer_boxes`` [L,Q,4].
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .draw import as_numpy, blend_masks, instance_colors, to_uint8_image
from .overlaps import pairwise_iou

__all__ = ["top_queries", "queries_for_objects", "query_detection", "attention_points", "attention_on_outline",
           "plot_query_attention", "plot_decoder_attention", "LEVEL_COLORS", "SIZE_CLASSES", "size_class",
           "outline_rows", "summarize_outline", "plot_outline_summary"]

LEVEL_COLORS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                         [70, 240, 240]], dtype=np.uint8)  # one per feature level (or head)


def top_queries(result: Mapping[str, Any], k: int) -> np.ndarray:
    """The k best distinct queries of a post-processed result (which may list a query with several
    labels): int64 [<=k] query indices in descending score order."""
    q = as_numpy(result["query_index"]).astype(np.int64)
    s = as_numpy(result["scores"]).astype(np.float64)
    order = q[np.argsort(-s, kind="stable")]
    _, first = np.unique(order, return_index=True)
    return order[np.sort(first)][:k]


def query_detection(result: Mapping[str, Any], query: int) -> Optional[int]:
    """Position in ``result`` of the best-scoring detection of ``query`` (None when it is absent)."""
    hits = np.flatnonzero(as_numpy(result["query_index"]) == query)
    if not len(hits):
        return None
    return int(hits[np.argmax(as_numpy(result["scores"])[hits])])


def queries_for_objects(result: Mapping[str, Any], gt: Mapping[str, Any], k: int) -> list[tuple[int, int]]:
    """Queries for up to k ground-truth objects spread over the range of sizes (paper Fig. 4 shows
    objects of different scales): GT sorted by area, k picked evenly from smallest to largest, each
    paired with the detection of highest mask IoU (box IoU without masks).

    Returns a list of (query index, GT index); empty when there is no GT or no detection.
    """
    n_gt, n_det = len(as_numpy(gt["labels"])), len(as_numpy(result["scores"]))
    if not n_gt or not n_det or k < 1:
        return []
    use_masks = gt.get("masks") is not None and result.get("masks") is not None
    iou = (pairwise_iou(gt["masks"], result["masks"]) if use_masks else pairwise_iou(gt["boxes"], result["boxes"],
                                                                                     boxes=True))
    if use_masks:
        area = as_numpy(gt["masks"]).reshape(n_gt, -1).sum(1)
    else:
        b = as_numpy(gt["boxes"])
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    by_size = np.argsort(area, kind="stable")
    picks = by_size[np.unique(np.linspace(0, n_gt - 1, min(k, n_gt)).round().astype(int))]
    q = as_numpy(result["query_index"])
    return [(int(q[np.argmax(iou[g])]), int(g)) for g in picks]


def attention_points(attention: Mapping[str, Any], layer: int, query: int, image_size: tuple[int, int]) -> dict:
    """The sampling points of one query at one decoder layer, flattened over (head, level, point).

    Returns {x, y: float [N] image pixels (pixel-edge coordinates, x in [0,W]), weight: float [N]
    summing to 1 (the per-head softmax weights divided by M), level, head, point: int [N]}.
    """
    loc = as_numpy(attention["locations"])[layer, query]  # [M,L_f,P,2]
    w = as_numpy(attention["weights"])[layer, query].astype(np.float64)  # [M,L_f,P]
    m, lf, p = w.shape
    head, level, point = np.meshgrid(np.arange(m), np.arange(lf), np.arange(p), indexing="ij")
    h, wd = image_size
    return {"x": loc[..., 0].reshape(-1) * wd, "y": loc[..., 1].reshape(-1) * h,
            "weight": w.reshape(-1) / m, "level": level.reshape(-1), "head": head.reshape(-1),
            "point": point.reshape(-1)}


def attention_on_outline(points: Mapping[str, np.ndarray], mask: np.ndarray, *, band: Optional[float] = None,
                         box: Optional[Sequence[float]] = None) -> dict:
    """Where one query's attention falls relative to an object mask.

    Args:
        points: from :func:`attention_points` (x, y pixels, weight summing to 1).
        mask: bool [H,W], the object (the query's predicted mask or its matched ground truth).
        band: half-width in pixels of the outline band (default: 5% of the mask's box diagonal, >= 1).
        box: xyxy region for the chance level (default: the mask's bounding box).
    Returns {"outline": weight within ``band`` of the mask boundary, "inside": weight deeper inside,
    "outside": the rest (including points off the image), "outline_area": fraction of the box's pixels
    within the band (what uniform attention over the box would give), "band": band}.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    H, W = mask.shape
    if not mask.any():
        raise ValueError("attention_on_outline: the mask is empty")
    ys, xs = np.nonzero(mask)
    if box is None:
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    x0, y0, x1, y1 = (float(v) for v in box)
    if band is None:
        band = max(1.0, 0.05 * float(np.hypot(x1 - x0, y1 - y0)))
    # distance of each pixel to the boundary: inside pixels to the nearest background, and vice versa
    dist = np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    near = dist <= band
    px = np.floor(np.asarray(points["x"])).astype(np.int64)
    py = np.floor(np.asarray(points["y"])).astype(np.int64)
    weight = np.asarray(points["weight"], dtype=np.float64)
    on_image = (px >= 0) & (px < W) & (py >= 0) & (py < H)
    cx, cy = px.clip(0, W - 1), py.clip(0, H - 1)
    is_near = on_image & near[cy, cx]
    is_inside = on_image & ~near[cy, cx] & mask[cy, cx]
    total = weight.sum() or 1.0
    r0, r1 = int(np.clip(np.floor(y0), 0, H)), int(np.clip(np.ceil(y1), 0, H))
    c0, c1 = int(np.clip(np.floor(x0), 0, W)), int(np.clip(np.ceil(x1), 0, W))
    region = near[r0:r1, c0:c1]
    return {"outline": float(weight[is_near].sum() / total), "inside": float(weight[is_inside].sum() / total),
            "outside": float(weight[~is_near & ~is_inside].sum() / total),
            "outline_area": float(region.mean()) if region.size else float("nan"), "band": float(band)}


def _box_xyxy(cxcywh: np.ndarray, image_size: tuple[int, int]) -> Optional[np.ndarray]:
    h, w = image_size
    cx, cy, bw, bh = (float(v) for v in cxcywh[:4]) if len(cxcywh) >= 4 else (*cxcywh[:2], np.nan, np.nan)
    if not np.isfinite(bw):
        return None
    return np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])


def plot_query_attention(image: Any, attention: Mapping[str, Any], query: int, *, result: Optional[Mapping] = None,
                         axes: Optional[Sequence] = None, color_by: str = "level", marker_scale: float = 400.0,
                         category_names: Optional[Mapping[int, str]] = None, dim: float = 0.6,
                         layers: Optional[Sequence[int]] = None, show_mask: bool = True, legend: bool = True):
    """One panel per decoder layer for ``query``: its sampling points (area proportional to weight,
    coloured by ``color_by`` = "level" or "head"), the reference the layer attends around (dashed box,
    or a cross for a point reference), the box the layer predicts (solid) and, from ``result``, the
    query's final mask and label.

    Args:
        image: the original image (any form ``to_uint8_image`` takes).
        attention: the ``attention`` dict of ``Predictor(..., return_attention=True)``.
        axes: one Axes per drawn layer (default: a new figure with one row).
        layers: which decoder layers (default: all).
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if color_by not in ("level", "head"):
        raise ValueError(f"color_by must be 'level' or 'head', got {color_by!r}")
    img = to_uint8_image(image)
    size = img.shape[:2]
    num_layers = as_numpy(attention["weights"]).shape[0]
    layers = list(range(num_layers)) if layers is None else list(layers)
    if axes is None:
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.4), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    color = instance_colors([query])[0]
    base = (img.astype(np.float32) * dim + 255 * (1 - dim) * 0.15).astype(np.uint8)  # dimmed background
    det = query_detection(result, query) if result is not None else None
    if show_mask and det is not None and result.get("masks") is not None:
        base = blend_masks(base, np.asarray(result["masks"][det], bool)[None], color[None], alpha=0.35)
    title_tail = ""
    if det is not None:
        label = int(as_numpy(result["labels"])[det])
        title_tail = f" {(category_names or {}).get(label, label)} {float(as_numpy(result['scores'])[det]):.2f}"
    for ax, layer in zip(axes, layers):
        pts = attention_points(attention, layer, query, size)
        ax.imshow(base)
        order = np.argsort(pts["weight"])  # heaviest on top
        key = pts[color_by][order]
        ax.scatter(pts["x"][order], pts["y"][order], s=pts["weight"][order] * marker_scale + 2,
                   c=LEVEL_COLORS[key % len(LEVEL_COLORS)] / 255.0, edgecolors="white", linewidths=0.4, alpha=0.9)
        ref = as_numpy(attention["references"])[layer, query]
        ref_box = _box_xyxy(ref, size)
        if ref_box is None:
            ax.plot(ref[0] * size[1], ref[1] * size[0], marker="x", color="white", markersize=8, mew=2)
        else:
            x0, y0, x1, y1 = ref_box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linestyle="--",
                                   linewidth=1.2))
        if "layer_boxes" in attention:
            x0, y0, x1, y1 = _box_xyxy(as_numpy(attention["layer_boxes"])[layer, query], size)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color / 255.0, linewidth=1.5))
        ax.set_xlim(-0.5, size[1] - 0.5)
        ax.set_ylim(size[0] - 0.5, -0.5)
        ax.set_axis_off()
        ax.set_title(f"query {query} · layer {layer}" + (title_tail if layer == layers[-1] else ""), fontsize=8)
    n_keys = as_numpy(attention["weights"]).shape[3 if color_by == "level" else 2]
    handles = [Line2D([], [], marker="o", linestyle="", color=LEVEL_COLORS[i % len(LEVEL_COLORS)] / 255.0,
                      label=f"{color_by} {i}") for i in range(n_keys)]
    handles += [Line2D([], [], color="white", linestyle="--", label="reference"),
                Line2D([], [], color=color / 255.0, label="layer box")]
    if legend:
        axes[-1].legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6, facecolor="grey")
    return fig


def plot_decoder_attention(image: Any, result: Mapping[str, Any], queries: Sequence[int], **kwargs):
    """A grid of :func:`plot_query_attention` rows, one per query (columns: decoder layers).

    ``result`` must hold ``attention`` (``Predictor(..., return_attention=True)``). Returns the Figure.
    """
    import matplotlib.pyplot as plt

    attention = result["attention"]
    num_layers = as_numpy(attention["weights"]).shape[0] if kwargs.get("layers") is None else len(kwargs["layers"])
    rows = max(len(queries), 1)
    fig, axes = plt.subplots(rows, num_layers, figsize=(3.2 * num_layers, 3.3 * rows), squeeze=False)
    for i, (row, q) in enumerate(zip(axes, queries)):
        plot_query_attention(image, attention, int(q), result=result, axes=list(row), legend=i == 0, **kwargs)
    for row in axes[len(queries):]:
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    return fig



SIZE_CLASSES = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, float("inf")))


def size_class(area: float) -> str:
    """COCO size class of a mask area in pixels: small (< 32²), medium (< 96²) or large."""
    return next(name for name, lo, hi in SIZE_CLASSES if lo <= area < hi)


def outline_rows(result: Mapping[str, Any], gt: Mapping[str, Any], pairs: Sequence[tuple[int, int]], *,
                 band: Optional[float] = None) -> list[dict]:
    """:func:`attention_on_outline` of each (query, GT index) pair at every decoder layer, measured
    against the ground-truth mask. ``result`` holds ``attention`` and ``image_size``.

    Returns rows {image_id, query, gt_index, category_id, area, size, layer, outline, inside, outside,
    outline_area, band}.
    """
    att = result["attention"]
    num_layers = as_numpy(att["weights"]).shape[0]
    masks = as_numpy(gt["masks"]).astype(bool)
    rows = []
    for q, g in pairs:
        area = float(masks[g].sum())
        if area == 0:
            continue
        for layer in range(num_layers):
            stats = attention_on_outline(attention_points(att, layer, q, masks.shape[1:]), masks[g], band=band)
            rows.append({"image_id": int(gt.get("image_id", -1)), "query": int(q), "gt_index": int(g),
                         "category_id": int(as_numpy(gt["labels"])[g]), "area": area, "size": size_class(area),
                         "layer": layer, **stats})
    return rows


def summarize_outline(rows: Sequence[Mapping]) -> dict:
    """Means of :func:`outline_rows`: {"layer{l}": {outline, inside, outside, chance, n}} for every
    layer, and {"last_layer/{size}": ...} per size class at the last layer (chance = mean outline_area)."""
    def mean(sel):
        if not sel:
            return {"outline": float("nan"), "inside": float("nan"), "outside": float("nan"),
                    "chance": float("nan"), "n": 0}
        return {"outline": float(np.mean([r["outline"] for r in sel])),
                "inside": float(np.mean([r["inside"] for r in sel])),
                "outside": float(np.mean([r["outside"] for r in sel])),
                "chance": float(np.nanmean([r["outline_area"] for r in sel])), "n": len(sel)}

    layers = sorted({r["layer"] for r in rows})
    out = {f"layer{l}": mean([r for r in rows if r["layer"] == l]) for l in layers}
    if layers:
        last = [r for r in rows if r["layer"] == layers[-1]]
        for name, _, _ in SIZE_CLASSES:
            out[f"last_layer/{name}"] = mean([r for r in last if r["size"] == name])
    return out


def plot_outline_summary(summary: Mapping[str, Mapping]):
    """Bars of :func:`summarize_outline`: attention share near the outline per decoder layer and per size
    class (last layer), each beside its chance level. Returns the Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    panels = ((axes[0], [k for k in summary if k.startswith("layer")], "per decoder layer"),
              (axes[1], [k for k in summary if k.startswith("last_layer/")], "per object size (last layer)"))
    for ax, keys, title in panels:
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [summary[k]["outline"] for k in keys], 0.4, label="attention near the outline")
        ax.bar(x + 0.2, [summary[k]["chance"] for k in keys], 0.4, label="outline share of the box (chance)")
        ax.set_xticks(x, [f"{k.split('/')[-1]}\n(n={summary[k]['n']})" for k in keys], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig

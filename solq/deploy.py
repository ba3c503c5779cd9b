"""Running an exported ONNX model without torch: numpy pre- and post-processing (``solq export`` writes the model).

Needs numpy, Pillow and onnxruntime only (this module imports no torch; of solq only the numpy-only
``solq.zigzag``)::

    import numpy as np, onnxruntime as ort
    from PIL import Image
    from solq.deploy import read_metadata, prepare_image, postprocess

    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    meta = read_metadata(session)                      # what solq export stored: codec, topk, eval sizes, ...
    rgb = np.asarray(Image.open("photo.jpg").convert("RGB"))
    images, mask, _ = prepare_image(rgb, meta)         # [1,3,h,w] float32 at the resized size, [1,h,w] bool
    logits, boxes, vectors = session.run(None, {"images": images, "mask": mask})
    [det] = postprocess(logits, boxes, vectors, [rgb.shape[:2]], meta)
    keep = det["scores"] >= 0.5                        # det: scores, labels, boxes (xyxy px), masks bool [K,h,w]

The exported network takes any H x W, so one image goes in at its resized size with no padding (as ``solq
predict`` runs it); several images of different sizes go in together through :func:`stack_images`, which pads
them to the largest and marks the padding in ``mask``.

The steps are those of :class:`solq.models.postprocess.PostProcess` for UQR models with the DCT codec (the test
checks that the masks are equal): sigmoid scores, the top-k of query x class (no threshold, no NMS), boxes from
(cx, cy, w, h) to pixels, the selected vectors DCT-decoded to N x N crops, binarised with the codec's rule and
pasted into their boxes (bilinear at pixel centres, ``>= mask_threshold``). ``prepare_image`` resizes with
Pillow, which is close to, not bit-equal to, the torchvision resize of ``solq predict``.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

import numpy as np

from solq.zigzag import zigzag_order

__all__ = ["METADATA_KEY", "read_metadata", "prepare_image", "stack_images", "postprocess", "dct_decode", "binarize",
           "paste_masks", "zigzag_order", "dct_matrix"]

METADATA_KEY = "solq"  # the ONNX metadata entry (JSON) that solq export writes
_F32 = np.float32


def read_metadata(session_or_path: Any) -> dict:
    """The solq metadata of an exported model, from an ``onnxruntime.InferenceSession`` or a file path (which
    opens one). Returns the dict ``solq export`` stored (mode, trace_size [H, W] (the sample size of the export;
    the file takes any size), eval_size, max_size, mean, std, topk, mask_threshold, codec {name, resolution,
    num_coeffs, threshold}, categories, outputs)."""
    session = session_or_path
    if not hasattr(session, "get_modelmeta"):
        import onnxruntime  # optional dependency, needed only for this convenience

        session = onnxruntime.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ValueError(f"this ONNX model has no {METADATA_KEY!r} metadata: was it written by solq export?")
    return json.loads(meta[METADATA_KEY])


def prepare_image(rgb: np.ndarray, meta: dict, frame: Optional[Sequence[int]] = None
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One image as the network's input: resized as the evaluation transform does (short side ``eval_size``,
    long side at most ``max_size``) and normalised with ``mean``/``std``.

    rgb: uint8 [h,w,3]; frame: None (no padding: the network takes any size) or (H, W) to zero-pad into.
    Returns (images float32 [1,3,H,W], mask bool [1,H,W] True on padding, (h', w') the resized size), with
    H x W = h' x w' without a frame. Raises ValueError when the resized image does not fit the frame."""
    from PIL import Image  # a dependency of solq; imported here so post-processing alone needs only numpy

    h, w = rgb.shape[:2]
    size, max_size = int(meta["eval_size"]), int(meta.get("max_size") or 0)
    short, long = min(h, w), max(h, w)
    if max_size and size * long / short > max_size:
        size = int(round(max_size * short / long))
    nh, nw = (size, int(size * w / h)) if h < w else (int(size * h / w), size)
    if (h, w) == (nh, nw):
        resized = rgb
    else:
        resized = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    frame_h, frame_w = (nh, nw) if frame is None else (int(frame[0]), int(frame[1]))
    if nh > frame_h or nw > frame_w:
        raise ValueError(f"the resized image {nh}x{nw} does not fit the frame {frame_h}x{frame_w}")
    x = (resized.astype(_F32) / _F32(255) - np.asarray(meta["mean"], _F32)) / np.asarray(meta["std"], _F32)
    images = np.zeros((1, 3, frame_h, frame_w), _F32)
    images[0, :, :nh, :nw] = x.transpose(2, 0, 1)
    mask = np.ones((1, frame_h, frame_w), bool)
    mask[0, :nh, :nw] = False
    return images, mask, (nh, nw)


def stack_images(prepared: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several prepared images as one batch, as the training and evaluation batches are padded: each is
    zero-padded at the bottom and right to the largest height and width, its padding True in the mask.

    prepared: (images float32 [1,3,h_i,w_i], mask bool [1,h_i,w_i]) pairs, e.g. :func:`prepare_image`'s first two
    results. Returns (images float32 [B,3,H,W], mask bool [B,H,W]) with H = max h_i, W = max w_i."""
    height = max(x.shape[2] for x, _ in prepared)
    width = max(x.shape[3] for x, _ in prepared)
    images = np.zeros((len(prepared), 3, height, width), _F32)
    mask = np.ones((len(prepared), height, width), bool)
    for i, (x, m) in enumerate(prepared):
        images[i, :, :x.shape[2], :x.shape[3]] = x[0]
        mask[i, :m.shape[1], :m.shape[2]] = m[0]
    return images, mask


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D float64 [n,n]: D[k,j] = sqrt(a_k/n) cos(pi (2j+1) k / (2n)), a_0 = 1, else 2."""
    k, j = np.arange(n, dtype=np.float64)[:, None], np.arange(n, dtype=np.float64)[None, :]
    return np.sqrt(np.where(k == 0, 1.0, 2.0) / n) * np.cos(math.pi * (2 * j + 1) * k / (2 * n))


def dct_decode(vectors: np.ndarray, resolution: int) -> np.ndarray:
    """DCT mask codes [K,n_k] (the first n_k zig-zag coefficients) -> float32 maps [K,N,N], N = resolution:
    D[:U]^T C D[:V] with C the coefficients on the U x V block of low frequencies (zeros elsewhere)."""
    vectors = np.asarray(vectors, _F32)
    k, n_k = vectors.shape
    uv = zigzag_order(resolution)[:n_k]
    rows, cols = int(uv[:, 0].max()) + 1, int(uv[:, 1].max()) + 1
    d = dct_matrix(resolution).astype(_F32)  # built in float64, cast once (as the torch codec)
    block = np.zeros((k, rows * cols), _F32)
    block[:, uv[:, 0] * cols + uv[:, 1]] = vectors
    return np.matmul(d[:rows].T, np.matmul(block.reshape(k, rows, cols), d[:cols]))


def binarize(decoded: np.ndarray, threshold: str = "midrange") -> np.ndarray:
    """Decoded maps [K,N,N] -> bool [K,N,N]: ``"0.5"`` is ``>= 0.5``; ``"midrange"`` is ``> (max+min)/2`` per map,
    and a constant map is all on or all off by the 0.5 rule."""
    if threshold == "0.5":
        return decoded >= 0.5
    flat = decoded.reshape(len(decoded), -1)
    hi, lo = flat.max(1, initial=-np.inf), flat.min(1, initial=np.inf)
    mid = (hi + lo) / _F32(2)
    constant = (hi - lo) <= _F32(1e-6) * np.maximum(np.abs(hi), _F32(1))
    cut = np.where(constant, np.where(mid >= 0.5, lo - 1, hi + 1), mid)
    return (flat > cut[:, None]).reshape(decoded.shape)


def _taps(coords: np.ndarray, lo: np.float32, length: np.float32, n: int) -> tuple[np.ndarray, ...]:
    """Bilinear taps of pixel centres along one box axis (grid_sample, align_corners=False, zeros outside):
    the sample at each coordinate is w0 * map[i0] + w1 * map[i1]. Returns (i0, i1, w0, w1) over ``coords``."""
    t = (coords + _F32(0.5) - lo) / length * _F32(n) - _F32(0.5)
    below = np.floor(t)
    frac = t - below
    i0 = below.astype(np.int64)
    w0 = (_F32(1) - frac) * ((i0 >= 0) & (i0 < n))
    w1 = frac * ((i0 >= -1) & (i0 < n - 1))
    return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), w0, w1


def paste_masks(crops: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """Paste box-space maps into the image (as ``solq.coding.paste_in_image``): each pixel centre is sampled
    bilinearly at its place in the box (zeros outside the map), then ``>= threshold``.

    crops: [K,h,w] bool or float; boxes: [K,4] xyxy pixels; image_hw: (H, W). Returns bool [K,H,W]; boxes with
    non-finite coordinates or no area give empty masks."""
    height, width = int(image_hw[0]), int(image_hw[1])
    out = np.zeros((len(crops), height, width), bool)
    maps = np.asarray(crops, _F32)
    for i, (m, b) in enumerate(zip(maps, np.asarray(boxes, _F32))):
        if not (np.isfinite(b).all() and b[2] > b[0] and b[3] > b[1]):
            continue
        mh, mw = m.shape
        x0, x1, wx0, wx1 = _taps(np.arange(width, dtype=_F32), b[0], b[2] - b[0], mw)
        cols = np.nonzero(wx0 + wx1)[0]  # only where the box reaches
        y0, y1, wy0, wy1 = _taps(np.arange(height, dtype=_F32), b[1], b[3] - b[1], mh)
        rows = np.nonzero(wy0 + wy1)[0]
        if not len(cols) or not len(rows):
            continue
        c, r = slice(cols[0], cols[-1] + 1), slice(rows[0], rows[-1] + 1)
        horiz = m[:, x0[c]] * wx0[c] + m[:, x1[c]] * wx1[c]  # along x first, as the torch paste: [h, cols]
        values = horiz[y0[r]] * wy0[r, None] + horiz[y1[r]] * wy1[r, None]  # [rows, cols]
        out[i, r, c] = values >= _F32(threshold)
    return out


def postprocess(logits: np.ndarray, boxes: np.ndarray, vectors: np.ndarray | None, orig_sizes: Sequence,
                meta: dict) -> list[dict]:
    """The network outputs of a batch -> detections per image, as ``PostProcess`` (UQR, DCT codec).

    logits [B,Q,C], boxes [B,Q,4] (sigmoid cx, cy, w, h of the unpadded image), vectors [B,Q,n_k] or None (no
    masks); orig_sizes: B pairs (h, w) of the original images; meta: :func:`read_metadata`'s dict (topk,
    mask_threshold, codec). Returns B dicts {scores float32 [K], labels int64 [K] (category ids), boxes float32
    [K,4] xyxy pixels, query_index int64 [K], masks bool [K,h,w] (when vectors are given)}, best first,
    K = min(topk, Q*C)."""
    logits = np.asarray(logits, _F32)
    batch, q, c = logits.shape
    codec = meta.get("codec") or {}
    if vectors is not None and meta.get("mode", "uqr") != "uqr":
        raise ValueError(f"solq.deploy decodes UQR mask vectors; a {meta.get('mode')!r} model's masks are not "
                         f"written in numpy (pass vectors=None for boxes and scores)")
    if vectors is not None and codec.get("name") != "dct":
        raise ValueError(f"solq.deploy decodes DCT mask codes only; this model's codec is {codec.get('name')!r}")
    k = min(int(meta.get("topk", 100)), q * c)
    results = []
    for i in range(batch):
        prob = _F32(1) / (_F32(1) + np.exp(-logits[i].reshape(-1)))
        flat = np.argsort(-prob, kind="stable")[:k]
        query, labels = flat // c, flat % c
        cx, cy, w, h = np.asarray(boxes[i], _F32)[query].T
        oh, ow = (_F32(v) for v in orig_sizes[i])
        xyxy = np.stack([(cx - _F32(0.5) * w) * ow, (cy - _F32(0.5) * h) * oh,
                         (cx + _F32(0.5) * w) * ow, (cy + _F32(0.5) * h) * oh], 1)
        det = {"scores": prob[flat], "labels": labels.astype(np.int64), "boxes": xyxy,
               "query_index": query.astype(np.int64)}
        if vectors is not None:
            crops = binarize(dct_decode(np.asarray(vectors[i], _F32)[query], int(codec["resolution"])),
                             codec.get("threshold", "midrange"))
            det["masks"] = paste_masks(crops, xyxy, (int(orig_sizes[i][0]), int(orig_sizes[i][1])),
                                       float(meta.get("mask_threshold", 0.5)))
        results.append(det)
    return results

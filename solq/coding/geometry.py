"""Moving masks between image space and box space (reference §3.1 and §6).

- ``crop_to_box``: image masks [K,H,W] -> box crops [K,S,S] in {0,1}: ROI-align (aligned=True, adaptive
  sampling) then ``>= 0.5``, exactly detectron2's ``BitMasks.crop_and_resize`` used by the reference.
- ``paste_in_image``: box-space maps [K,h,w] -> bool image masks [K,H,W] with detectron2's paste semantics:
  image pixel centre (x+0.5, y+0.5) is sampled bilinearly (``grid_sample``, align_corners=False, zeros
  outside the map) at its position inside the box, then ``>= threshold``.

Bilinear resampling is separable, so a pasted mask is Wy·M·Wxᵀ with per-box "tent" interpolation
matrices Wy [H',h] and Wx [W',w]. Only the rows/columns a box can reach are computed (a window around
the box), and masks are processed in chunks sorted by window size, so memory stays bounded
(``chunk_elements`` floats per chunk) whatever K and the image size are.
"""
from __future__ import annotations


import numpy as np
import torch
from torchvision.ops import roi_align

__all__ = ["crop_to_box", "paste_in_image"]


def _check_boxes(boxes: torch.Tensor, k: int, fn: str) -> torch.Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.dim() != 2 or boxes.shape != (k, 4):
        raise ValueError(f"{fn}: boxes_xyxy must be [K,4] with K={k} (one box per mask), "
                         f"got shape {tuple(boxes.shape)}")
    return boxes


def crop_to_box(masks: torch.Tensor, boxes_xyxy: torch.Tensor, size: int, *,
                chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Crop each mask to its own box and resize to size x size (reference §3.1).

    Args:
        masks: bool or float [K,H,W] image-space masks.
        boxes_xyxy: [K,4] absolute (x0, y0, x1, y1) pixel boxes; pixel i covers [i, i+1).
        size: S, side of the output crops.
        chunk_elements: bound on the number of mask pixels converted to float at once.
    Returns:
        float [K,S,S] with values in {0,1} (the masks' dtype if float32/float64, else float32),
        on the masks' device.
    """
    if masks.dim() != 3:
        raise ValueError(f"crop_to_box: masks must be [K,H,W], got shape {tuple(masks.shape)}")
    k, h, w = masks.shape
    boxes = _check_boxes(boxes_xyxy, k, "crop_to_box")
    dtype = masks.dtype if masks.dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.zeros(k, size, size, dtype=dtype, device=masks.device)
    if k == 0 or h == 0 or w == 0:
        return out
    boxes = boxes.to(device=masks.device, dtype=dtype)
    step = max(1, chunk_elements // (h * w))
    for s in range(0, k, step):
        e = min(k, s + step)
        b = boxes[s:e]
        # Only the union of the chunk's boxes (+1 px for the bilinear neighbours) is converted to float.
        # Clipping at a margin gives the same values as the whole image (every sample and both of its
        # interpolation neighbours stay inside), except at the true image border, where it is the same.
        lo = torch.floor(b[:, :2].amin(0)) - 1
        hi = torch.ceil(b[:, 2:].amax(0)) + 1
        x0, y0 = (int(v) for v in lo.clamp(min=0).tolist())
        x1 = int(min(hi[0].item(), w))
        y1 = int(min(hi[1].item(), h))
        if x1 <= x0 or y1 <= y0:
            continue  # every box lies beyond the image: ROI-align gives zeros
        region = masks[s:e, y0:y1, x0:x1].to(dtype).unsqueeze(1)  # [c,1,h',w'], the single float copy
        offset = torch.tensor([x0, y0, x0, y0], dtype=dtype, device=masks.device)
        idx = torch.arange(e - s, dtype=dtype, device=masks.device)[:, None]
        rois = torch.cat([idx, b - offset], dim=1)  # [c,5] (batch index, x0, y0, x1, y1)
        crops = roi_align(region, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out[s:e] = (crops[:, 0] >= 0.5).to(dtype)
    return out


def _tent_weights(coords: torch.Tensor, lo: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """Bilinear weights of pixel centres in a box: coords [c,P] pixel indices, lo/length [c] box start/size.

    Returns [c,P,n]: weight of map cell j for pixel p, max(0, 1 - |t - j|) with t = (p+0.5-lo)/length·n - 0.5,
    i.e. grid_sample(align_corners=False) with zero padding along one axis. At most two cells are non-zero,
    so the matrix is built by two scatters into [c,P,n+2] (columns 0 and n+1 collect out-of-range cells).
    """
    t = (coords + 0.5 - lo[:, None]) / length[:, None] * n - 0.5
    below = torch.floor(t)
    frac = t - below
    first = (below + 1).clamp_(0, n + 1).long()  # cell index + 1
    second = (below + 2).clamp_(0, n + 1).long()
    w = t.new_zeros(*t.shape, n + 2)
    w.scatter_add_(2, first[..., None], (1 - frac)[..., None])
    w.scatter_add_(2, second[..., None], frac[..., None])
    return w[..., 1:n + 1]


def _reach(lo: torch.Tensor, hi: torch.Tensor, n: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel range [start, end) along one axis that a map of n cells pasted into [lo, hi) can touch."""
    half_cell = 0.5 * (hi - lo) / n
    start = torch.floor(lo - 0.5 - half_cell) - 1  # -1/+1: margin for rounding
    end = torch.ceil(hi - 0.5 + half_cell) + 2
    return start.clamp(0, limit), end.clamp(0, limit)


def paste_in_image(masks: torch.Tensor, boxes_xyxy: torch.Tensor, image_hw: tuple[int, int],
                   threshold: float = 0.5, *, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """Paste box-space maps into the image (reference §6, detectron2 ``paste_masks_in_image``).

    Args:
        masks: float or bool [K,h,w] maps in box space (any h, w; square for the codecs).
        boxes_xyxy: [K,4] absolute (x0, y0, x1, y1) boxes, not necessarily inside the image.
        image_hw: (H, W) of the output.
        threshold: > 0; a pixel is on when its bilinear sample is >= threshold.
        chunk_elements: bound on the float elements handled per chunk (windows, interpolation matrices and
            full-width bool rows counted as a quarter each); peak memory ~ 12 bytes per element.
    Returns:
        bool [K,H,W] on the masks' device. Boxes with non-finite coordinates or no area give empty masks.
    """
    if masks.dim() != 3:
        raise ValueError(f"paste_in_image: masks must be [K,h,w], got shape {tuple(masks.shape)}")
    if not threshold > 0:
        raise ValueError(f"paste_in_image: threshold must be > 0 (pixels outside the box sample 0), got {threshold}")
    k, mh, mw = masks.shape
    boxes = _check_boxes(boxes_xyxy, k, "paste_in_image")
    height, width = int(image_hw[0]), int(image_hw[1])
    device = masks.device
    out = torch.zeros(k, height, width, dtype=torch.bool, device=device)
    if k == 0 or height == 0 or width == 0 or mh == 0 or mw == 0:
        return out
    dtype = masks.dtype if masks.dtype in (torch.float32, torch.float64) else torch.float32
    m = masks.to(dtype)
    boxes = boxes.to(device=device, dtype=dtype)
    valid = torch.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes = torch.where(valid[:, None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=dtype, device=device))
    ys, ye = _reach(boxes[:, 1], boxes[:, 3], mh, height)
    xs, xe = _reach(boxes[:, 0], boxes[:, 2], mw, width)
    ext_h, ext_w = (ye - ys).clamp(min=1), (xe - xs).clamp(min=1)

    # Sort by window area so each chunk's common window (max height x max width) stays tight.
    order = torch.argsort(ext_h * ext_w)
    ext_np = torch.stack([ext_h, ext_w], 1)[order].cpu().numpy().astype(np.int64)
    cum = np.maximum.accumulate(ext_np, axis=0)  # upper bound of a chunk's window ending at i
    # per mask: float window + tent matrices, and the bool full-width rows (1 byte: a quarter of a float)
    per_mask = cum[:, 0] * (cum[:, 1] + width // 4) + (cum[:, 0] + cum[:, 1]) * max(mh, mw)
    s = 0
    while s < k:
        # chunk [s, e): the largest e whose bound (e-s) * per_mask[e-1] fits (monotone in e)
        e = s + max(1, int(((np.arange(1, k - s + 1) * per_mask[s:]) <= chunk_elements).sum()))
        idx = order[s:e]
        win_h, win_w = int(ext_h[idx].max()), int(ext_w[idx].max())
        # windows of a common size, shifted inside the image; they still cover each box's reach
        r0 = torch.minimum(ys[idx], torch.full_like(ys[idx], height - win_h))
        c0 = torch.minimum(xs[idx], torch.full_like(xs[idx], width - win_w))
        rows = r0[:, None] + torch.arange(win_h, dtype=dtype, device=device)  # [c,win_h]
        cols = c0[:, None] + torch.arange(win_w, dtype=dtype, device=device)  # [c,win_w]
        b = boxes[idx]
        wy = _tent_weights(rows, b[:, 1], b[:, 3] - b[:, 1], mh)  # [c,win_h,mh]
        wx = _tent_weights(cols, b[:, 0], b[:, 2] - b[:, 0], mw)  # [c,win_w,mw]
        wy = wy * valid[idx, None, None].to(dtype)
        if win_h <= win_w:  # cheaper association order
            values = torch.matmul(torch.matmul(wy, m[idx]), wx.transpose(1, 2))
        else:
            values = torch.matmul(wy, torch.matmul(m[idx], wx.transpose(1, 2)))
        win = values >= threshold  # [c,win_h,win_w]
        # place window columns into full-width rows (expanded index: no [c,win_h,win_w] index tensor), then
        # copy whole rows into the output
        full_rows = win.new_zeros(len(idx), win_h, width)
        full_rows.scatter_(2, cols.long()[:, None, :].expand(-1, win_h, -1), win)
        out.view(-1, width)[(idx[:, None] * height + rows.long()).view(-1)] = full_rows.view(-1, width)
        s = e
    return out

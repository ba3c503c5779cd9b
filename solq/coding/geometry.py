"""Moving masks between image space and box space (as in the authors' release).

- ``crop_to_box``: image masks [K,H,W] -> box crops [K,S,S] in {0,1}: ROI-align (aligned=True, adaptive
  sampling) then ``>= 0.5``, exactly detectron2's ``BitMasks.crop_and_resize`` used by the reference.
- ``paste_in_image``: box-space maps [K,h,w] -> bool image masks [K,H,W] with detectron2's paste semantics:
  image pixel centre (x+0.5, y+0.5) is sampled bilinearly (``grid_sample``, align_corners=False, zeros
  outside the map) at its position inside the box, then ``>= threshold``.

Bilinear resampling is separable and has two non-zero taps per axis, so a paste is two gathers: along x,
every map row is interpolated at the window's columns ([h,w] -> [h,W']), then along y each window row is
interpolated from its two neighbouring rows ([h,W'] -> [H',W']). Only the rows/columns a box can reach are
computed (a window around the box; ragged in height, one width per chunk), and masks are processed in
chunks sorted by window width, so memory stays bounded (``chunk_elements`` floats per chunk) whatever K and
the image size are.
"""
from __future__ import annotations


import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
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
    """Crop each mask to its own box and resize to size x size (as in the authors' release).

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


def _taps(coords: torch.Tensor, lo: torch.Tensor, length: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Bilinear taps of pixel centres along one axis of a box: grid_sample (align_corners=False, zero padding).

    Args:
        coords: pixel indices (float), any shape; lo, length: box start and size, broadcastable to coords.
        n: number of map cells along the axis.
    Returns:
        (i0, i1, w0, w1), each of the broadcast shape: the sample is w0·map[i0] + w1·map[i1], with
        t = (p+0.5-lo)/length·n - 0.5, i0 = floor(t), i1 = i0+1, w0 = 1-(t-i0), w1 = t-i0. A tap outside the
        map gets weight 0 (zero padding) and its index is clamped into [0, n) so it can still be gathered.
    """
    t = (coords + 0.5 - lo) / length * n - 0.5
    below = torch.floor(t)
    frac = t - below
    i0 = below.long()
    w0 = (1 - frac) * ((i0 >= 0) & (i0 < n))
    w1 = frac * ((i0 >= -1) & (i0 < n - 1))
    return i0.clamp(0, n - 1), (i0 + 1).clamp(0, n - 1), w0, w1


def _reach(lo: torch.Tensor, hi: torch.Tensor, n: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel range [start, end) along one axis that a map of n cells pasted into [lo, hi) can touch."""
    half_cell = 0.5 * (hi - lo) / n
    start = torch.floor(lo - 0.5 - half_cell) - 1  # -1/+1: margin for rounding
    end = torch.ceil(hi - 0.5 + half_cell) + 2
    return start.clamp(0, limit), end.clamp(0, limit)


def _bool_zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """torch.zeros(shape, dtype=bool) on device.

    On the CPU the memory comes from numpy's calloc: a large block is mapped fresh from the OS, already zero,
    and materialised on first touch (in huge pages where numpy and the OS allow) instead of being faulted
    in 4 KiB page by page and then cleared again; for 100 masks at 800x1333 (107 MB) that roughly halves
    the paste on this project's CPU machine.
    """
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.bool_))
    return torch.zeros(shape, dtype=torch.bool, device=device)


def paste_in_image(masks: torch.Tensor, boxes_xyxy: torch.Tensor, image_hw: tuple[int, int],
                   threshold: float = 0.5, *, chunk_elements: int = 1 << 21) -> torch.Tensor:
    """Paste box-space maps into the image (the authors' release, detectron2 ``paste_masks_in_image``).

    Args:
        masks: float or bool [K,h,w] maps in box space (any h, w; square for the codecs).
        boxes_xyxy: [K,4] absolute (x0, y0, x1, y1) boxes, not necessarily inside the image.
        image_hw: (H, W) of the output.
        threshold: > 0; a pixel is on when its bilinear sample is >= threshold.
        chunk_elements: bound on the float elements alive per chunk of masks (their maps, the maps
            interpolated at the window columns and the interpolated window rows, the last two counted
            twice for the second tap); a chunk holds at least one mask. Peak temporary memory is about
            chunk_elements floats on top of the bool output.
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
    out = _bool_zeros((k, height, width), device)
    if k == 0 or height == 0 or width == 0 or mh == 0 or mw == 0:
        return out
    dtype = masks.dtype if masks.dtype in (torch.float32, torch.float64) else torch.float32
    boxes = boxes.to(device=device, dtype=dtype)
    valid = torch.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes = torch.where(valid[:, None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=dtype, device=device))
    ys, ye = _reach(boxes[:, 1], boxes[:, 3], mh, height)
    xs, xe = _reach(boxes[:, 0], boxes[:, 2], mw, width)
    n_rows = torch.where(valid, ye - ys, 0).long()  # image rows a mask writes; 0 for an invalid box
    n_cols = (xe - xs).long().clamp(min=1)

    # Windows are ragged in height (each mask computes only its own rows) and share one width per chunk;
    # sorting by width keeps that common width tight.
    order = torch.argsort(n_cols)
    rows_np = n_rows[order].cpu().numpy()
    cols_np = n_cols[order].cpu().numpy()
    flat_out = out.view(-1)
    flat_np = flat_out.numpy() if device.type == "cpu" else None
    s = 0
    while s < k:
        # chunk [s, e): the largest e whose cost (maps + 2 x (map rows + window rows) x width) fits; monotone in e
        cost = np.arange(1, k - s + 1) * (mh * mw) + 2 * np.cumsum(mh + rows_np[s:]) * cols_np[s:]
        e = s + max(1, int((cost <= chunk_elements).sum()))
        idx, c, win_w, n_win_rows = order[s:e], e - s, int(cols_np[e - 1]), int(rows_np[s:e].sum())
        s = e
        if n_win_rows == 0:
            continue  # boxes beyond the image or invalid
        b = boxes[idx]
        # window columns [c0, c0 + win_w): shifted inside the image, still covering the box's reach
        c0 = xs[idx].clamp(max=width - win_w)
        cols = c0[:, None] + torch.arange(win_w, dtype=dtype, device=device)  # [c,win_w]
        x0, x1, wx0, wx1 = _taps(cols, b[:, :1], b[:, 2:3] - b[:, :1], mw)
        # along x: every map row at the window's columns; the column index is shared by a mask's rows,
        # so it is an expanded view, not a copy
        src = masks[idx].to(dtype)
        horiz = src.gather(2, x0[:, None, :].expand(c, mh, win_w)).mul_(wx0[:, None, :])
        horiz.addcmul_(src.gather(2, x1[:, None, :].expand(c, mh, win_w)), wx1[:, None, :])
        horiz = horiz.view(c * mh, win_w)
        # along y: the two neighbouring rows of each window row (R rows in all, mask-major)
        owner = torch.repeat_interleave(torch.arange(c, device=device), n_rows[idx], output_size=n_win_rows)
        first = torch.cumsum(n_rows[idx], 0) - n_rows[idx]  # [c] first window row of each mask
        rows = torch.arange(n_win_rows, device=device) - first[owner] + ys[idx].long()[owner]  # [R] image row
        rb = b[owner]
        y0, y1, wy0, wy1 = _taps(rows.to(dtype), rb[:, 1], rb[:, 3] - rb[:, 1], mh)
        values = horiz.index_select(0, owner * mh + y0).mul_(wy0[:, None])
        values.addcmul_(horiz.index_select(0, owner * mh + y1), wy1[:, None])  # [R,win_w]
        # Write each window row to the output through a view whose row i is the win_w elements from flat
        # offset i: the views overlap, but the rows written never do (distinct image rows, or distinct masks).
        start = (idx[owner] * height + rows) * width + c0.long()[owner]
        shape = (flat_out.numel() - win_w + 1, win_w)
        if flat_np is not None:
            # numpy writes the rows on one thread; torch's index_put_ splits short rows between OpenMP threads
            # that then write the same cache lines (on 2 threads the 100-mask 800x1333 paste sometimes took 4-5x
            # its usual 30 ms; README, "Mask coding")
            as_strided(flat_np, shape, (1, 1), writeable=True)[start.numpy()] = (values >= threshold).numpy()
        else:
            flat_out.as_strided(shape, (1, 1)).index_put_((start,), values >= threshold)
    return out

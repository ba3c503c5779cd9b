"""crop_to_box / paste_in_image against naive per-pixel implementations (reference §3.1, §6)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from solq.coding import crop_to_box, paste_in_image


def _bilinear_roi(v, y, x):
    """One ROI-align sample with torchvision's border rules (0 beyond one pixel outside, clamp at the edge)."""
    h, w = v.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yh = yl = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xh = xl = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    return ((1 - ly) * (1 - lx) * v[yl, xl] + (1 - ly) * lx * v[yl, xh] + ly * (1 - lx) * v[yh, xl]
            + ly * lx * v[yh, xh])


def naive_crop(masks, boxes, size):
    """Per-bin loop: aligned ROI-align with ceil(box/size) samples per bin side, averaged, then >= 0.5."""
    out = torch.zeros(len(masks), size, size, dtype=torch.bool)
    for k, (m, box) in enumerate(zip(masks.double(), boxes.tolist())):
        x0, y0, x1, y1 = box
        bw, bh = (x1 - x0) / size, (y1 - y0) / size
        gw, gh = math.ceil((x1 - x0) / size), math.ceil((y1 - y0) / size)
        for i in range(size):
            for j in range(size):
                acc = 0.0
                for a in range(gh):
                    y = y0 - 0.5 + i * bh + (a + 0.5) * bh / gh
                    for b in range(gw):
                        x = x0 - 0.5 + j * bw + (b + 0.5) * bw / gw
                        acc += float(_bilinear_roi(m, y, x))
                out[k, i, j] = acc / max(gh * gw, 1) >= 0.5
    return out


def naive_paste(maps, boxes, hw, threshold=0.5):
    """Reference §6 per mask: grid_sample at every image pixel centre, normalised in the box, then >= t."""
    h, w = hw
    out = torch.zeros(len(maps), h, w, dtype=torch.bool)
    for k, (m, box) in enumerate(zip(maps.double(), boxes.tolist())):
        x0, y0, x1, y1 = box
        gx = ((torch.arange(w, dtype=torch.float64) + 0.5) - x0) / (x1 - x0) * 2 - 1
        gy = ((torch.arange(h, dtype=torch.float64) + 0.5) - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        val = F.grid_sample(m[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[k] = val[0, 0] >= threshold
    return out


def _random_boxes(k, h, w, gen, margin=3.0):
    r = torch.rand(k, 4, dtype=torch.float64, generator=gen)
    x0 = r[:, 0] * (w + 2 * margin) - 2 * margin
    y0 = r[:, 1] * (h + 2 * margin) - 2 * margin
    return torch.stack([x0, y0, x0 + 0.4 + r[:, 2] * w, y0 + 0.4 + r[:, 3] * h], dim=1)


@pytest.mark.parametrize("size", [3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_crop_matches_naive_roi_align(size, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = 17, 23
    masks = torch.rand(5, h, w, generator=gen) > 0.5
    boxes = _random_boxes(5, h, w, gen)
    expected = naive_crop(masks, boxes, size)
    for m, chunk in ((masks, 1 << 24), (masks.double(), 1 << 24), (masks, h * w)):  # bool, float64, chunked
        got = crop_to_box(m, boxes, size, chunk_elements=chunk)
        assert got.shape == (5, size, size)
        assert got.dtype == (torch.float64 if m.dtype == torch.float64 else torch.float32)
        assert set(got.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(got.bool(), expected)


def test_crop_region_trick_equals_roi_align_on_whole_image():
    gen = torch.Generator().manual_seed(5)
    masks = torch.rand(12, 60, 90, generator=gen) > 0.4
    boxes = _random_boxes(12, 60, 90, gen, margin=5.0)
    rois = torch.cat([torch.arange(12, dtype=torch.float64)[:, None], boxes], 1)
    direct = roi_align(masks.double()[:, None], rois, (16, 16), 1.0, 0, True)[:, 0] >= 0.5
    assert torch.equal(crop_to_box(masks, boxes, 16, chunk_elements=2 * 60 * 90).bool(), direct)


def test_crop_empty_and_bad_shapes():
    assert crop_to_box(torch.zeros(0, 10, 10, dtype=torch.bool), torch.zeros(0, 4), 8).shape == (0, 8, 8)
    with pytest.raises(ValueError, match="one box per mask"):
        crop_to_box(torch.zeros(2, 10, 10, dtype=torch.bool), torch.zeros(3, 4), 8)
    far = crop_to_box(torch.ones(1, 10, 10, dtype=torch.bool), torch.tensor([[50.0, 50.0, 60.0, 60.0]]), 4)
    assert not far.any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_matches_naive_grid_sample(seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = 19, 27
    n = 7
    maps = torch.rand(6, n, n, dtype=torch.float64, generator=gen)
    boxes = _random_boxes(6, h, w, gen, margin=6.0)
    expected = naive_paste(maps, boxes, (h, w))
    for chunk in (1, 200, 1 << 22):
        got = paste_in_image(maps, boxes, (h, w), chunk_elements=chunk)
        assert got.dtype == torch.bool and got.shape == (6, h, w)
        assert torch.equal(got, expected)
    assert torch.equal(paste_in_image(maps.float(), boxes.float(), (h, w)), expected)
    assert torch.equal(paste_in_image(maps, boxes, (h, w), threshold=0.3), naive_paste(maps, boxes, (h, w), 0.3))


def test_paste_binary_maps_and_boxes_beyond_the_image():
    gen = torch.Generator().manual_seed(7)
    maps = (torch.rand(5, 12, 12, generator=gen) > 0.5).float()
    boxes = torch.tensor([[-10.3, -4.2, 30.7, 25.1],  # larger than the image
                          [2.2, 3.7, 9.9, 8.4], [14.1, 9.3, 40.0, 33.3],  # small; past the bottom-right
                          [-5.0, -5.0, -1.2, -0.9], [0.25, 0.75, 21.5, 15.25]], dtype=torch.float64)
    got = paste_in_image(maps, boxes, (16, 22))
    assert torch.equal(got, naive_paste(maps, boxes, (16, 22)))
    assert not got[3].any()  # box entirely outside


def test_paste_degenerate_boxes_empty_batch_and_errors():
    maps = torch.ones(3, 4, 4)
    boxes = torch.tensor([[2.0, 2.0, 2.0, 6.0], [1.0, float("nan"), 3.0, 4.0], [1.0, 1.0, 5.0, 5.0]])
    got = paste_in_image(maps, boxes, (8, 8))
    assert not got[0].any() and not got[1].any()
    assert got[2, 1:5, 1:5].all() and got[2].sum() == 16
    assert paste_in_image(torch.zeros(0, 4, 4), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)
    assert torch.equal(paste_in_image(maps.bool(), boxes, (8, 8)), got)
    with pytest.raises(ValueError, match="threshold"):
        paste_in_image(maps, boxes, (8, 8), threshold=0.0)
    with pytest.raises(ValueError, match="boxes_xyxy"):
        paste_in_image(maps, boxes[:2], (8, 8))


def test_crop_then_paste_recovers_a_box_aligned_rectangle():
    masks = torch.zeros(2, 50, 70, dtype=torch.bool)
    masks[0, 10:30, 5:45] = True
    masks[1, 20:49, 40:69] = True
    boxes = torch.tensor([[5.0, 10.0, 45.0, 30.0], [40.0, 20.0, 69.0, 49.0]])
    back = paste_in_image(crop_to_box(masks, boxes, 32), boxes, (50, 70))
    assert torch.equal(back, masks)


def _grid_sample_paste(maps, boxes, hw, threshold=0.5):
    """All masks in one grid_sample call, in the maps' dtype (the separable gathers must agree with it)."""
    h, w = hw
    x0, y0, x1, y1 = boxes.to(maps.dtype).unbind(1)
    gx = ((torch.arange(w, dtype=maps.dtype) + 0.5)[None] - x0[:, None]) / (x1 - x0)[:, None] * 2 - 1  # [K,W]
    gy = ((torch.arange(h, dtype=maps.dtype) + 0.5)[None] - y0[:, None]) / (y1 - y0)[:, None] * 2 - 1  # [K,H]
    grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=-1)
    val = F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return val[:, 0] >= threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paste_ragged_windows_match_grid_sample_on_mixed_boxes(dtype):
    # sub-pixel, thin, large, partly and wholly outside boxes mixed, so that chunks hold windows of very
    # different heights and widths (some shifted left to fit the image), on non-square maps
    gen = torch.Generator().manual_seed(11)
    h, w = 37, 53
    maps = torch.rand(30, 9, 12, dtype=dtype, generator=gen)
    r = torch.rand(30, 4, dtype=torch.float64, generator=gen)
    bw = torch.cat([0.2 + r[:6, 2], 0.5 + 2 * r[6:12, 2], 1 + r[12:, 2] * 1.5 * w])  # 6 sub-pixel, 6 thin
    bh = torch.cat([0.2 + r[:6, 3], 1 + r[6:12, 3] * h, 0.5 + r[12:, 3] * 1.5 * h])
    # centres on pixel centres for the small boxes (else they sample nothing), anywhere around the image else
    cx = torch.cat([torch.floor(r[:12, 0] * w) + 0.5, r[12:, 0] * (w + 30) - 15])
    cy = torch.cat([torch.floor(r[:12, 1] * h) + 0.5, r[12:, 1] * (h + 30) - 15])
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    boxes[12] = torch.tensor([-40.0, -30.0, 90.0, 70.0])  # covers the whole image
    boxes[13] = torch.tensor([w - 2.6, h - 1.3, w + 20.0, h + 9.0])  # past the bottom-right corner
    boxes[14] = torch.tensor([w + 1.0, 3.0, w + 9.0, 9.0])  # beyond the right edge: empty
    expected = _grid_sample_paste(maps, boxes, (h, w))
    nonempty = expected.any(dim=(1, 2))
    assert nonempty[:12].sum() >= 4 and nonempty.sum() >= 15 and not nonempty[14]
    for chunk in (1, 3000, 20000, 1 << 21):  # one mask per chunk ... everything in one chunk
        got = paste_in_image(maps, boxes.to(dtype), (h, w), chunk_elements=chunk)
        assert got.dtype == torch.bool and got.shape == (30, h, w) and got.is_contiguous()
        assert torch.equal(got, expected)
    binary = maps > 0.5
    assert torch.equal(paste_in_image(binary, boxes.to(dtype), (h, w)),
                       _grid_sample_paste(binary.to(dtype), boxes, (h, w)))

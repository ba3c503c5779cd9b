"""Boundary IoU / Boundary AP: hand-computed bands, naive and scipy references, AP sanity on COCO."""
import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from solq.evaluation import (boundary_band, boundary_dilation, boundary_iou, evaluate_boundary_ap, evaluate_coco)

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_tiny"
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.usefixtures("one_thread")]
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _square(size, top, left, side):
    m = np.zeros(size, bool)
    m[top:top + side, left:left + side] = True
    return m


def _naive_band(mask, d):
    """Per-pixel loop: a mask pixel is on the band iff some pixel within Chebyshev distance d is background
    (pixels outside the image count as background)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            y0, y1, x0, x1 = y - d, y + d + 1, x - d, x + d + 1
            inside = y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w
            out[y, x] = not inside or not mask[y0:y1, x0:x1].all()
    return out


def _scipy_band(mask, d):
    """Official recipe: 1-px zero pad, d iterations of 3x3 erosion (the pad erodes inward), mask - eroded."""
    eroded = ndimage.binary_erosion(np.pad(mask, 1), np.ones((3, 3), bool), iterations=d, border_value=1)
    return mask & ~eroded[1:-1, 1:-1]


def _iou64(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    union = a.sum() + b.sum() - (a * b).sum()
    return (a * b).sum() / union if union else 0.0


def _random_blobs(rng, k, h, w):
    """k random unions of discs and rectangles (some touching the border), bool [k,h,w]."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((k, h, w), bool)
    for i in range(k):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(h, w) / 3)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        y, x = rng.integers(0, h), rng.integers(0, w)
        masks[i, y:y + rng.integers(1, h), x:x + rng.integers(1, w)] = True
    return masks


def test_dilation_follows_the_official_rounding():
    assert boundary_dilation(100, 100) == round(0.02 * np.hypot(100, 100)) == 3
    assert boundary_dilation(480, 640) == round(0.02 * 800) == 16
    assert boundary_dilation(10, 10) == 1  # round(0.28) = 0, clamped to one pixel
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_dilation(10, 10, 0.0)


def test_concentric_squares_by_hand():
    # 100x100 image: d = round(0.02 * 141.4) = 3. GT 40x40 at rows/cols 30..69, prediction 36x36 at 32..67.
    gt, dt = _square((100, 100), 30, 30, 40), _square((100, 100), 32, 32, 36)
    gt_band, dt_band = boundary_band(gt), boundary_band(dt)
    assert gt_band.sum() == 40 ** 2 - 34 ** 2  # outer 3-px ring
    assert dt_band.sum() == 36 ** 2 - 30 ** 2
    # the GT band meets the prediction only on its outermost 1-px ring (36^2 - 34^2 pixels), all on dt's band
    inter = 36 ** 2 - 34 ** 2
    union = (40 ** 2 - 34 ** 2) + (36 ** 2 - 30 ** 2) - inter
    assert (gt_band & dt_band).sum() == inter
    assert boundary_iou(gt, dt) == pytest.approx(inter / union, abs=1e-7)  # 140 / 700 = 0.2
    assert inter / union < _iou64(gt, dt)  # mask IoU 0.81: the band metric is far stricter


def test_mask_on_the_image_border_has_a_band_there():
    full = np.ones((100, 100), bool)
    assert boundary_band(full).sum() == 100 ** 2 - 94 ** 2
    corner = _square((100, 100), 0, 0, 10)
    # 10x10 in the corner, d=3: the image edges erode like background, leaving the 4x4 core (rows 3..6)
    assert boundary_band(corner).sum() == 10 ** 2 - 4 ** 2


@pytest.mark.parametrize("d", [1, 2, 4, 12])
def test_band_matches_naive_pixel_loop(d):
    masks = _random_blobs(np.random.default_rng(d), 4, 23, 31)
    got = boundary_band(torch.from_numpy(masks), dilation=d)
    want = np.stack([_naive_band(m, d) for m in masks])
    assert got.dtype == torch.bool and got.shape == masks.shape
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("ratio", [0.005, 0.02, 0.07])
def test_band_matches_repeated_erosion(ratio):
    masks = _random_blobs(np.random.default_rng(7), 6, 57, 83)
    d = boundary_dilation(57, 83, ratio)
    got = boundary_band(masks, ratio)  # numpy in -> numpy out
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, np.stack([_scipy_band(m, d) for m in masks]))
    np.testing.assert_array_equal(boundary_band(masks[2], ratio), got[2])  # a 2-D mask gives a 2-D band
    np.testing.assert_array_equal(boundary_band(masks.astype(np.float32), ratio), got)  # thresholded at 0.5
    column_major = masks.transpose(0, 2, 1).copy().transpose(0, 2, 1)  # as pycocotools decodes them
    np.testing.assert_array_equal(boundary_band(column_major, ratio), got)


def test_boundary_iou_self_disjoint_and_pairwise():
    rng = np.random.default_rng(3)
    gts, dts = _random_blobs(rng, 3, 60, 70), _random_blobs(rng, 5, 60, 70)
    dts[4] = False  # empty prediction: IoU 0 (no 0/0)
    a, b = _square((60, 70), 5, 5, 20), _square((60, 70), 30, 40, 20)
    assert boundary_iou(a, a) == 1.0
    assert boundary_iou(a, b) == 0.0
    got = boundary_iou(torch.from_numpy(gts), torch.from_numpy(dts))
    d = boundary_dilation(60, 70)
    want = np.array([[_iou64(_scipy_band(p, d), _scipy_band(g, d)) for g in gts] for p in dts])
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="gt masks are"):
        boundary_iou(gts, dts[:, :50])


# ----------------------------------------------------------------------------------- Boundary AP

def _coco(images):
    """images: list of (image_id, (h, w), [(mask bool [h,w], category_id, iscrowd), ...]) -> COCO."""
    imgs, anns = [], []
    for image_id, (h, w), objects in images:
        imgs.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        for mask, cat, crowd in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                         "segmentation": rle, "area": float(mask.sum()),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    coco = COCO()
    coco.dataset = {"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _pred(image_id, masks, scores=None):
    masks = torch.from_numpy(np.stack(masks)) if len(masks) else torch.zeros(0, 200, 200, dtype=torch.bool)
    k = len(masks)
    return {"image_id": image_id, "masks": masks, "boxes": torch.zeros(k, 4),
            "scores": torch.tensor(scores or [0.9] * k), "labels": torch.ones(k, dtype=torch.int64)}


def _ap_from_iou(iou):
    """One GT and one matching detection per image (all with the same IoU): AP = share of thresholds <= IoU."""
    return float(np.mean(IOU_THRESHOLDS <= iou))


def test_boundary_ap_is_stricter_than_mask_ap_for_a_dilated_prediction():
    # 200x200 images: d = round(0.02 * 282.8) = 6. Large 110x110 square predicted 1 px too big (112x112);
    # small 8x8 square predicted as 10x10: its band is the whole mask, so boundary IoU = mask IoU there.
    size, images, preds, large, small = (200, 200), [], [], [], []
    for i in range(2):
        gl, gs = _square(size, 20, 20, 110), _square(size, 160, 160 + 10 * i, 8)
        pl, ps = _square(size, 19, 19, 112), _square(size, 159, 159 + 10 * i, 10)
        images.append((i + 1, size, [(gl, 1, 0), (gs, 1, 0)]))
        preds.append(_pred(i + 1, [pl, ps]))
        large, small = (gl, pl), (gs, ps)
    coco = _coco(images)
    boundary = evaluate_boundary_ap(coco, preds)
    mask = evaluate_coco(coco, preds, iou_types=("segm",))["segm"]

    d = boundary_dilation(*size)
    mask_iou_l, mask_iou_s = _iou64(*large), _iou64(*small)
    b_iou_l = _iou64(_scipy_band(large[0], d), _scipy_band(large[1], d))
    # by hand: bands 110^2-98^2 and 112^2-100^2 share the GT's outer 5 px (110^2-100^2): 2100 / 2940
    assert b_iou_l == pytest.approx((110 ** 2 - 100 ** 2) / ((110 ** 2 - 98 ** 2) + (112 ** 2 - 100 ** 2)
                                                            - (110 ** 2 - 100 ** 2)))
    assert mask["APl"] == pytest.approx(_ap_from_iou(mask_iou_l)) == 1.0
    assert boundary["APl"] == pytest.approx(_ap_from_iou(min(mask_iou_l, b_iou_l))) == pytest.approx(0.5)
    assert boundary["APs"] == pytest.approx(mask["APs"]) == pytest.approx(_ap_from_iou(mask_iou_s))
    assert boundary["AP"] < mask["AP"]
    assert set(boundary) == set(mask)


def test_min_rule_and_crowd_regions():
    # a thin ring exactly on the GT's band: boundary IoU 1 but mask IoU 0.21 -> Boundary AP (min) is 0.
    size = (200, 200)
    gt = _square(size, 20, 20, 110)
    ring = boundary_band(gt)
    crowd = _square(size, 150, 150, 40)
    coco = _coco([(1, size, [(gt, 1, 0), (crowd, 1, 1)])])
    # a confident detection of the crowd region is ignored (matched to the crowd), not a false positive
    preds = [_pred(1, [crowd, ring], scores=[0.99, 0.5])]
    assert evaluate_boundary_ap(coco, preds)["AP"] == 0.0
    assert evaluate_boundary_ap(coco, preds, combine="boundary")["AP"] == pytest.approx(1.0)
    assert evaluate_boundary_ap(coco, [_pred(1, [crowd, gt], scores=[0.99, 0.5])])["AP"] == pytest.approx(1.0)
    # no detection at all: AP 0, no error
    assert evaluate_boundary_ap(coco, [_pred(1, [])])["AP"] == 0.0
    with pytest.raises(ValueError, match="combine"):
        evaluate_boundary_ap(coco, preds, combine="max")
    with pytest.raises(KeyError, match="image_id=5"):
        evaluate_boundary_ap(coco, [_pred(5, [gt])])


def test_boundary_ap_of_ground_truth_is_one_on_coco2017_tiny():
    ann_file = TINY / "annotations" / "instances_val.json"
    if not ann_file.exists():
        pytest.skip(f"{ann_file} not found")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    preds, rng = [], np.random.default_rng(0)
    for image_id in coco.getImgIds():
        img = coco.imgs[image_id]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        masks = (np.stack([coco.annToMask(a) for a in anns]).astype(bool) if anns
                 else np.zeros((0, img["height"], img["width"]), bool))
        preds.append({"image_id": image_id, "masks": masks, "scores": rng.uniform(0.1, 1.0, len(anns)),
                      "labels": np.array([a["category_id"] for a in anns], dtype=np.int64)})
    stats = evaluate_boundary_ap(coco, preds)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert stats[key] == pytest.approx(1.0), key
    # a copy of every object shrunk by 2 px loses much more Boundary AP than mask AP on large objects
    for p in preds:
        if len(p["masks"]):
            p["masks"] = ndimage.binary_erosion(p["masks"], np.ones((1, 5, 5), bool))
    boundary = evaluate_boundary_ap(coco, preds)
    mask = evaluate_coco(coco, preds, iou_types=("segm",))["segm"]
    assert boundary["APl"] < mask["APl"] - 0.2
    # a band as wide as the image is the whole mask: Boundary AP must then reproduce mask AP exactly (this
    # also checks that each detection gets its own band, with several detections per image)
    whole = evaluate_boundary_ap(coco, preds, dilation_ratio=1.0)
    for key in mask:
        assert whole[key] == pytest.approx(mask[key], abs=1e-12), key

"""COCO evaluation: GT-as-prediction gives AP 1, hand-computed APs, empty predictions, results JSON."""
import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from solq.evaluation import (COCO_STAT_NAMES, evaluate_coco, format_table, masks_to_rle,
                             predictions_to_coco_results, write_results_json)

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_tiny"
# pycocotools' single-mask decode (annToMask) trips a numpy 2 deprecation inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's 0.5:0.05:0.95


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _make_gt(boxes_xywh, labels, size=(300, 400), iscrowd=None):
    """A one-image COCO object with the given boxes; segmentations are the filled boxes (as RLE)."""
    h, w = size
    anns = []
    for i, (b, c) in enumerate(zip(boxes_xywh, labels)):
        m = np.zeros((h, w), np.uint8, order="F")
        x, y, bw, bh = b
        m[y:y + bh, x:x + bw] = 1
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i + 1, "image_id": 7, "category_id": int(c), "bbox": [float(v) for v in b],
                     "area": float(bw * bh), "segmentation": rle,
                     "iscrowd": 0 if iscrowd is None else iscrowd[i]})
    coco = COCO()
    coco.dataset = {"images": [{"id": 7, "width": w, "height": h, "file_name": "x.png"}],
                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}
    _quiet(coco.createIndex)
    return coco


def _box_pred(boxes_xywh, scores, labels, size=(300, 400)):
    """Prediction dict (torch) with xyxy boxes and the filled-box masks."""
    h, w = size
    b = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(b), h, w, dtype=torch.bool)
    for i, (x, y, bw, bh) in enumerate(boxes_xywh):
        masks[i, y:y + bh, x:x + bw] = True
    return {"image_id": torch.tensor(7), "boxes": torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels), "masks": masks}


def _box_iou_xywh(a, b):
    """Naive IoU of two xywh boxes (float64)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize("shift", [(5, 0), (20, 0), (12, 9), (40, 0)])
def test_shifted_box_scores_hand_computed_ap(shift):
    gt_box = (50, 60, 100, 100)
    pred_box = (50 + shift[0], 60 + shift[1], 100, 100)
    iou = _box_iou_xywh(gt_box, pred_box)
    # one GT, one detection: precision is 1 at every recall point where it matches, so AP at a threshold is 1
    # if IoU >= threshold else 0, and AP@[.5:.95] is the fraction of thresholds met.
    expected = float(np.mean(iou >= IOU_THRESHOLDS))
    gt = _make_gt([gt_box], [1])
    res = evaluate_coco(gt, [_box_pred([pred_box], [0.9], [1])])
    for t in ("bbox", "segm"):
        assert res[t]["AP"] == pytest.approx(expected, abs=1e-9)
        assert res[t]["AP50"] == pytest.approx(float(iou >= 0.5), abs=1e-9)
        assert res[t]["AP75"] == pytest.approx(float(iou >= 0.75), abs=1e-9)
        assert res[t]["AR100"] == pytest.approx(expected, abs=1e-9)
        # area 10000 > 96^2: large only; no small/medium GT -> pycocotools' -1
        assert res[t]["APl"] == pytest.approx(expected, abs=1e-9)
        assert res[t]["APs"] == -1.0 and res[t]["APm"] == -1.0


def test_false_positive_ranked_first_gives_two_thirds():
    # detections by score: FP, TP, TP -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1; interpolated (max to the
    # right) precision is 2/3 at all 101 recall points -> AP = 2/3 at every IoU threshold.
    # (one category: COCO averages AP over categories)
    gt = _make_gt([(10, 10, 50, 50), (200, 100, 60, 80)], [1, 1])
    pred = _box_pred([(300, 200, 40, 40), (10, 10, 50, 50), (200, 100, 60, 80)], [0.9, 0.8, 0.7], [1, 1, 1])
    res = evaluate_coco(gt, [pred])
    for t in ("bbox", "segm"):
        assert res[t]["AP"] == pytest.approx(2 / 3, abs=1e-9)
        assert res[t]["AR1"] == pytest.approx(0.0)  # the one detection allowed per image is the FP
        assert res[t]["AR100"] == pytest.approx(1.0)


def test_empty_predictions_score_zero():
    gt = _make_gt([(10, 10, 50, 50)], [1])
    none = evaluate_coco(gt, [])
    zero_dets = evaluate_coco(gt, [{"image_id": 7, "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                                    "labels": np.zeros(0, np.int64), "masks": np.zeros((0, 300, 400), bool)}])
    for res in (none, zero_dets):
        assert set(res) == {"bbox", "segm"}
        assert list(res["bbox"]) == list(COCO_STAT_NAMES)
        for t in ("bbox", "segm"):
            assert res[t]["AP"] == 0.0 and res[t]["AP50"] == 0.0 and res[t]["AR100"] == 0.0


def test_masks_to_rle_matches_per_mask_encode():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 23, 31)) > 0.6
    masks[2] = False
    ours = masks_to_rle(torch.from_numpy(masks))
    for m, r in zip(masks, ours):
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert r["size"] == [23, 31] and r["counts"] == ref["counts"].decode()
        assert np.array_equal(mask_utils.decode(r).astype(bool), m)
    assert masks_to_rle(np.zeros((0, 4, 4), bool)) == []


def test_gt_not_mutated_and_bad_input_errors():
    gt = _make_gt([(10, 10, 50, 50)], [1])
    before = copy.deepcopy(gt.dataset)
    evaluate_coco(gt, [_box_pred([(10, 10, 50, 50)], [1.0], [1])])
    assert gt.dataset == before
    with pytest.raises(KeyError, match="image_id=99"):
        evaluate_coco(gt, [{**_box_pred([(1, 1, 5, 5)], [1.0], [1]), "image_id": 99}])
    bad = _box_pred([(1, 1, 5, 5)], [1.0], [1])
    bad["masks"] = bad["masks"][:, :100]
    with pytest.raises(ValueError, match="image_id=7.*original size"):
        evaluate_coco(gt, [bad])
    with pytest.raises(KeyError, match="masks"):
        evaluate_coco(gt, [{k: v for k, v in bad.items() if k != "masks"}])


def test_format_table():
    res = evaluate_coco(_make_gt([(50, 60, 100, 100)], [1]), [_box_pred([(50, 60, 100, 100)], [1.0], [1])])
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["type", *COCO_STAT_NAMES]
    assert lines[1].split()[:2] == ["bbox", "100.0"] and lines[2].split()[0] == "segm"
    assert lines[1].split()[4] == "-"  # APs undefined


# ---------------------------------------------------------------- coco2017_tiny
@pytest.fixture(scope="module")
def tiny_val():
    ann = TINY / "annotations" / "instances_val.json"
    if not ann.exists():
        pytest.skip(f"{ann} not found")
    gt = _quiet(COCO, str(ann))
    preds = []
    for image_id in gt.getImgIds():
        img = gt.imgs[image_id]
        anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = (np.stack([gt.annToMask(a) for a in anns]).astype(bool) if anns
                 else np.zeros((0, img["height"], img["width"]), bool))
        preds.append({"image_id": image_id, "boxes": torch.from_numpy(boxes), "scores": torch.ones(len(anns)),
                      "labels": torch.tensor([a["category_id"] for a in anns]), "masks": torch.from_numpy(masks)})
    return gt, preds


def test_tiny_val_ground_truth_scores_ap_one(tiny_val, tmp_path):
    gt, preds = tiny_val
    res, evaluators = evaluate_coco(gt, preds, results_dir=tmp_path, return_evaluators=True)
    for t in ("bbox", "segm"):
        assert res[t]["AP"] == pytest.approx(1.0) and res[t]["AP75"] == pytest.approx(1.0)
        assert evaluators[t].eval["precision"].shape[:2] == (10, 101)
    # the written results files reload with pycocotools and reproduce the same numbers
    for t in ("bbox", "segm"):
        path = tmp_path / f"{t}_results.json"
        entries = json.loads(path.read_text())
        assert len(entries) == sum(len(p["scores"]) for p in preds)
        dt = _quiet(gt.loadRes, str(path))
        assert len(dt.getAnnIds()) == len(entries)
    # segm through the file (RLE strings round trip) and plain pycocotools
    e = COCOeval(gt, dt, "segm")
    _quiet(lambda: (e.evaluate(), e.accumulate(), e.summarize()))
    assert e.stats[0] == pytest.approx(1.0)


def test_tiny_val_matches_pycocotools_loadres_on_perturbed(tiny_val):
    """Our batched result loading must give exactly what COCO.loadRes + COCOeval give."""
    gt, preds = tiny_val
    rng = np.random.default_rng(0)
    noisy = []
    for p in preds[:25]:  # a subset: also checks that only predicted images are evaluated by default
        k = len(p["scores"])
        noisy.append({**p, "boxes": p["boxes"] + torch.from_numpy(rng.normal(0, 8, (k, 4))),
                      "scores": torch.from_numpy(rng.random(k)),
                      "masks": torch.roll(p["masks"], int(rng.integers(-6, 7)), dims=2)})
    ours = evaluate_coco(gt, noisy)
    for t in ("bbox", "segm"):
        dt = _quiet(gt.loadRes, predictions_to_coco_results(noisy, t))
        e = COCOeval(gt, dt, t)
        e.params.imgIds = sorted(p["image_id"] for p in noisy)
        _quiet(lambda: (e.evaluate(), e.accumulate(), e.summarize()))
        np.testing.assert_allclose([ours[t][n] for n in COCO_STAT_NAMES], e.stats, rtol=0, atol=1e-12)
        assert 0.05 < ours[t]["AP"] < 0.95


def test_write_results_json_empty(tmp_path):
    paths = write_results_json([], tmp_path)
    assert json.loads(paths["bbox"].read_text()) == [] and json.loads(paths["segm"].read_text()) == []


def test_verbose_prints_the_standard_table_and_quiet_prints_nothing(capsys):
    gt = _make_gt([(10, 10, 50, 50)], [1])
    pred = _box_pred([(10, 10, 50, 50)], [1.0], [1])
    evaluate_coco(gt, [pred])
    assert capsys.readouterr().out == ""
    evaluate_coco(gt, [pred], iou_types=("segm",), verbose=True)
    out = capsys.readouterr().out
    assert "IoU metric: segm" in out and out.count("Average Precision") == 6

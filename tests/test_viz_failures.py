"""Failure mining on hand-made predictions and ground truth: a missed object, a merged mask, duplicates,
siamese masks, a wrong class, a poor boundary; occlusion, statistics, ranking and the gallery."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from solq.viz.failures import (KINDS, failure_gallery, failure_statistics, format_statistics,  # noqa: E402
                               mine_failures, mine_image, occlusion, occlusion_bin, pairwise_iou, plot_statistics)

H = W = 100
NAMES = {1: "circle", 2: "square", 3: "star", 4: "ring"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def box_of(m):
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def instances(masks, labels, scores=None, queries=None, image_id=1):
    masks = np.stack(masks)
    d = {"image_id": image_id, "masks": masks, "boxes": np.array([box_of(m) for m in masks], float),
         "labels": np.array(labels)}
    if scores is not None:
        d["scores"] = np.array(scores, float)
        d["query_index"] = np.array(queries if queries is not None else range(len(scores)))
    return d


def kinds_of(cases):
    return sorted(c.kind for c in cases)


# ------------------------------------------------------------------------------------------- overlaps
def test_pairwise_iou_matches_a_float64_matmul_and_boxes_a_loop():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 20, 30)) < 0.4, rng.random((3, 20, 30)) < 0.5
    fa, fb = torch.from_numpy(a).flatten(1).double(), torch.from_numpy(b).flatten(1).double()
    inter = fa @ fb.T
    ref = inter / (fa.sum(1)[:, None] + fb.sum(1)[None] - inter)
    assert np.allclose(pairwise_iou(a, b), ref.numpy(), atol=1e-12)
    assert np.allclose(pairwise_iou(torch.from_numpy(a), b), ref.numpy(), atol=1e-12)
    assert pairwise_iou(a[:0], b).shape == (0, 3)
    ba = np.array([[0, 0, 10, 10], [5, 5, 15, 25.0]])
    bb = np.array([[5, 0, 10, 20.0]])
    for i, p in enumerate(ba):
        q = bb[0]
        iw = max(0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        assert pairwise_iou(ba, bb, boxes=True)[i, 0] == pytest.approx(inter / union)


def test_occlusion_is_the_box_share_covered_by_other_masks():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 30, 40)) < 0.3
    masks[0] = False
    masks[0, 5:20, 5:25] = True
    boxes = np.array([[5, 5, 25, 20], [0, 0, 40, 30], [10.2, 3.7, 30.5, 28.1], [0, 0, 0, 0]])
    got = occlusion(masks, boxes)
    for j in range(4):  # naive: loop over the pixel centres of the box
        others = np.delete(masks, j, 0).any(0)
        covered = total = 0
        for y in range(30):
            for x in range(40):
                if boxes[j, 0] <= x + 0.5 < boxes[j, 2] and boxes[j, 1] <= y + 0.5 < boxes[j, 3]:
                    total += 1
                    covered += others[y, x]
        assert got[j] == pytest.approx(covered / total if total else 0.0)
    assert occlusion_bin([0.0, 0.05, 0.1, 0.45, 0.5, 1.0]).tolist() == [0, 0, 1, 2, 3, 3]


# ------------------------------------------------------------------------------------------- the kinds
def test_a_missed_object_and_a_low_score_prediction_that_does_not_count():
    gt = instances([rect(10, 10, 30, 30), rect(60, 60, 90, 90)], [1, 2])
    pred = instances([rect(10, 10, 30, 30), rect(60, 60, 90, 90)], [1, 2], scores=[0.9, 0.1])
    cases, table = mine_image(pred, gt, score_threshold=0.3)
    assert kinds_of(cases) == ["missed"]
    (c,) = cases
    assert c.gt == (1,) and c.image_id == 1 and c.severity == pytest.approx(1.0)
    assert table["matched"].tolist() == [True, False] and table["missed"].tolist() == [False, True]
    cases, _ = mine_image(pred, gt, score_threshold=0.05)
    assert cases == []  # both found now


def test_one_mask_over_two_objects_is_merged():
    a, b = rect(10, 10, 40, 40), rect(40, 10, 70, 40)
    gt = instances([a, b], [1, 1])
    pred = instances([rect(10, 10, 70, 41)], [1], scores=[0.8])
    cases, table = mine_image(pred, gt, category_names=NAMES)
    merged = [c for c in cases if c.kind == "merged"]
    assert len(merged) == 1 and merged[0].gt == (0, 1) and merged[0].pred == (0,)
    assert "circle (100%) + circle (100%)" in merged[0].reason
    assert merged[0].severity == pytest.approx(0.8)
    assert table["merged"].all()
    assert [c.kind for c in cases if c.kind != "merged"] == ["missed", "missed"]  # IoU ~0.49 with each


def test_two_queries_on_one_object_are_duplicates_and_on_two_objects_siamese():
    obj = rect(20, 20, 60, 60)
    gt = instances([obj], [2])
    pred = instances([obj, rect(20, 20, 60, 58)], [2, 2], scores=[0.9, 0.7], queries=[4, 11])
    (dup,) = [c for c in mine_image(pred, gt)[0] if c.kind == "duplicate"]
    assert dup.pred == (0, 1) and dup.details["siamese"] is False
    assert dup.severity == pytest.approx(0.7 * (40 * 38) / (40 * 40))
    # the same query listed with two labels (top-k over query x class) is not a duplicate
    same_query = instances([obj, obj], [2, 3], scores=[0.9, 0.7], queries=[4, 4])
    assert not [c for c in mine_image(same_query, gt)[0] if c.kind == "duplicate"]
    # two overlapping objects each covered by a near-identical mask: the paper's siamese masks
    a, b = rect(20, 20, 60, 60), rect(30, 30, 70, 70)
    gt2 = instances([a, b & ~a], [1, 1])
    union = a | b
    pred2 = instances([union, union & ~rect(20, 20, 22, 22)], [1, 1], scores=[0.8, 0.6], queries=[1, 2])
    cases, _ = mine_image(pred2, gt2)
    (sia,) = [c for c in cases if c.kind == "duplicate"]
    assert sia.details["siamese"] is True and set(sia.gt) == {0, 1} and "siamese" in sia.reason


def test_the_top_prediction_with_another_class_on_a_good_mask_is_a_wrong_class():
    obj = rect(10, 10, 50, 50)
    gt = instances([obj], [1])
    pred = instances([obj, obj], [3, 1], scores=[0.9, 0.4], queries=[0, 1])
    (c,) = [c for c in mine_image(pred, gt, category_names=NAMES)[0] if c.kind == "wrong_class"]
    assert c.pred == (0,) and c.details["predicted"] == 3 and c.details["correct_also"] is True
    assert "star 0.90 on a circle" in c.reason
    right_first = instances([obj, obj], [3, 1], scores=[0.4, 0.9], queries=[0, 1])
    assert not [c for c in mine_image(right_first, gt)[0] if c.kind == "wrong_class"]


def test_a_shifted_mask_has_a_poor_boundary():
    from solq.evaluation.boundary import boundary_iou

    obj = rect(20, 20, 80, 80)
    shifted = rect(25, 25, 85, 85)  # mask IoU 0.72, bands of d = 3 px mostly apart
    gt = instances([obj], [1])
    pred = instances([shifted], [1], scores=[0.9])
    cases, table = mine_image(pred, gt)
    expected = boundary_iou(obj, shifted)
    assert expected < 0.5
    assert kinds_of(cases) == ["poor_boundary"]
    assert cases[0].details["boundary_iou"] == pytest.approx(expected)
    assert table["boundary_iou"][0] == pytest.approx(expected)
    good = instances([rect(20, 20, 80, 81)], [1], scores=[0.9])
    assert mine_image(good, gt)[0] == []


def test_crowd_objects_are_ignored_and_inputs_may_be_rles_or_tensors():
    from solq.engine.evaluate import RLEMasks
    from solq.evaluation import masks_to_rle

    gt = instances([rect(10, 10, 30, 30), rect(50, 50, 90, 90)], [1, 2])
    gt["iscrowd"] = np.array([0, 1])
    pred = instances([rect(60, 10, 90, 40)], [1], scores=[0.9])
    cases, table = mine_image(pred, gt)
    assert kinds_of(cases) == ["missed"] and cases[0].gt == (0,) and table["gt_index"].tolist() == [0]
    as_rle = {**pred, "masks": masks_to_rle(pred["masks"])}
    as_array = {**pred, "masks": RLEMasks(masks_to_rle(pred["masks"]), H, W)}
    as_torch = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in pred.items()}
    for variant in (as_rle, as_array, as_torch):
        assert [(c.kind, c.gt, c.pred) for c in mine_image(variant, gt)[0]] == [(c.kind, c.gt, c.pred) for c in cases]
    with pytest.raises(ValueError, match="image_id=1"):
        mine_image({**pred, "scores": np.array([0.9, 0.8])}, gt)


# ------------------------------------------------------------------------------------- report, stats
def _dataset():
    """Image 1: a missed ring behind a square (occluded) and a correct square; image 2: a merged pair of
    circles and a wrong class; image 3: no prediction at all."""
    sq, ring = rect(10, 10, 60, 60), rect(40, 40, 80, 80)
    gt1 = instances([sq, ring & ~sq], [2, 4], image_id=1)
    p1 = instances([sq], [2], scores=[0.95], image_id=1)
    a, b, s = rect(5, 5, 35, 35), rect(35, 5, 65, 35), rect(10, 60, 40, 90)
    gt2 = instances([a, b, s], [1, 1, 3], image_id=2)
    p2 = instances([rect(5, 5, 65, 36), s], [1, 2], scores=[0.7, 0.8], image_id=2)
    gt3 = instances([rect(0, 0, 10, 10)], [3], image_id=3)
    return [p1, p2], [gt1, gt2, gt3]


def test_report_counts_statistics_and_ranking():
    preds, gts = _dataset()
    report = mine_failures(preds, gts, category_names=NAMES)
    counts = report.counts()
    assert counts == {"missed": 4, "merged": 1, "duplicate": 0, "wrong_class": 1, "poor_boundary": 0}
    stats = failure_statistics(report.gt, report.cases, category_names=NAMES)
    assert stats == report.statistics()
    assert stats["overall"]["objects"] == 6
    assert stats["overall"]["recall"] == pytest.approx(1 / 6)  # only the square of image 1
    assert stats["per_category"]["circle"] == pytest.approx(
        {"objects": 2, "recall": 0.0, "missed": 1.0, "merged": 1.0, "duplicate": 0.0, "wrong_class": 0.0,
         "poor_boundary": 0.0, "mean_best_iou": float(report.gt["best_iou"][report.gt["category_id"] == 1].mean())})
    assert stats["per_category"]["star"]["wrong_class"] == pytest.approx(0.5)
    occ = report.gt["occlusion"][(report.gt["image_id"] == 1) & (report.gt["category_id"] == 4)][0]
    assert occ == pytest.approx(400 / 1600)  # the ring's box is a quarter covered by the square
    assert stats["by_occlusion"]["10-30%"]["objects"] >= 1 and stats["by_occlusion"]["10-30%"]["missed"] == 1.0
    assert sum(r["objects"] for r in stats["by_occlusion"].values()) == 6
    text = format_statistics(stats)
    assert "| circle | 2 |" in text and "| 10-30% |" in text
    ranked = report.ranked()
    assert [c.kind for c in ranked[:3]] == ["missed", "merged", "wrong_class"]  # kinds take turns
    sev = [c.severity for c in ranked if c.kind == "missed"]
    assert sev == sorted(sev, reverse=True)
    flat = report.ranked(interleave=False)
    assert [c.severity for c in flat] == sorted((c.severity for c in flat), reverse=True)
    assert [c.kind for c in report.ranked(kinds=["merged"])] == ["merged"]
    with pytest.raises(ValueError, match="unknown failure kind"):
        report.ranked(kinds=["exploded"])
    with pytest.raises(KeyError, match="image_id=9"):
        mine_failures([instances([rect(0, 0, 5, 5)], [1], scores=[1.0], image_id=9)], gts)
    assert set(KINDS) == set(counts)
    fig = plot_statistics(stats)
    assert len(fig.axes) == 2


def test_gallery_writes_the_reason_on_each_panel():
    preds, gts = _dataset()
    report = mine_failures(preds, gts, category_names=NAMES)
    rng = np.random.default_rng(2)
    images = {i: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for i in (1, 2, 3)}
    cases = report.ranked(4)
    fig = failure_gallery(cases, images, preds, {g["image_id"]: g for g in gts}, category_names=NAMES, ncols=2)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 4
    for ax, c in zip(titled, cases):
        assert c.kind in ax.get_title() and c.reason.split(":")[0] in ax.get_title()
    # zoomed on the objects involved: the merged panel shows the two circles' region, not the whole image
    merged_ax = titled[[c.kind for c in cases].index("merged")]
    x0, x1 = merged_ax.get_xlim()
    assert x0 > -0.5 or x1 < W - 0.5

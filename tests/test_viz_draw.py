"""solq.viz rendering pieces: image conversion, stable colours, threshold, mask blending and outlines,
boxes on an Axes, attention points and the outline measure, DCT code maps, training and PR curves."""
import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from solq.viz import draw  # noqa: E402
from solq.viz.draw import PALETTE, blend_masks, draw_instances, mask_edges, to_uint8_image  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scene(rng, h=24, w=32):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks = np.zeros((3, h, w), bool)
    masks[0, 2:10, 3:12] = True
    masks[1, 6:18, 8:20] = True  # overlaps mask 0
    masks[2, 15:22, 22:30] = True
    boxes = np.array([[3, 2, 12, 10], [8, 6, 20, 18], [22, 15, 30, 22]], float)
    return image, {"boxes": boxes, "masks": masks, "labels": np.array([1, 2, 3]),
                   "scores": np.array([0.3, 0.9, 0.6]), "query_index": np.array([7, 2, 30])}


# ------------------------------------------------------------------------------------------- images
def test_image_conversions():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert to_uint8_image(img) is not None and np.array_equal(to_uint8_image(img), img)
    chw = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    assert np.array_equal(to_uint8_image(chw), img)
    assert np.array_equal(to_uint8_image(torch.from_numpy(img).permute(2, 0, 1)), img)  # uint8 tensor
    from PIL import Image

    assert np.array_equal(to_uint8_image(Image.fromarray(img)), img)
    assert to_uint8_image(img[..., 0]).shape == (5, 7, 3)
    with pytest.raises(ValueError, match="denormalize"):
        to_uint8_image(chw * 3 - 1)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(np.zeros((2, 3, 4, 5)))


def test_denormalize_inverts_the_transforms_normalisation():
    from torchvision.transforms import v2

    from solq.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    x = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    assert np.abs(draw.denormalize(x).astype(int) - img.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------ selection
def test_threshold_keeps_scores_at_or_above_best_first_and_colours_follow_the_query():
    rng = np.random.default_rng(2)
    image, inst = _scene(rng)
    for t, expected in ((0.0, [1, 2, 0]), (0.6, [1, 2]), (0.95, [])):
        d = draw_instances(image, inst, score_threshold=t)
        assert d.indices.tolist() == expected
        assert d.count == int((inst["scores"] >= t).sum())
        # stable colour: palette entry of the query index, whatever else is drawn
        assert np.array_equal(d.colors, PALETTE[inst["query_index"][expected] % len(PALETTE)])
    gt = {k: inst[k] for k in ("boxes", "masks", "labels")}  # no scores: everything is drawn
    assert draw_instances(image, gt, score_threshold=0.99, style="gt").count == 3


def test_accepts_tensors_and_rle_masks():
    from solq.evaluation import masks_to_rle

    rng = np.random.default_rng(3)
    image, inst = _scene(rng)
    ref = draw_instances(image, inst, show_boxes=False, show_labels=False).image
    as_torch = {k: torch.as_tensor(v) for k, v in inst.items()}
    chw = torch.from_numpy(image).permute(2, 0, 1)
    assert np.array_equal(draw_instances(chw, as_torch, show_boxes=False, show_labels=False).image, ref)
    as_rle = {**inst, "masks": masks_to_rle(inst["masks"])}
    assert np.array_equal(draw_instances(image, as_rle, show_boxes=False, show_labels=False).image, ref)


def test_fallback_draws_the_top_k_below_the_threshold_and_says_so():
    rng = np.random.default_rng(11)
    image, inst = _scene(rng)  # scores 0.3, 0.9, 0.6
    low = {**inst, "scores": np.array([0.05, 0.12, 0.08])}  # none reaches 0.3
    d = draw_instances(image, low, score_threshold=0.3, fallback_topk=2)
    assert d.fallback and d.indices.tolist() == [1, 2] and d.count == 2 and d.above_threshold == 0
    assert d.best_score == pytest.approx(0.12)
    assert np.array_equal(d.colors, PALETTE[low["query_index"][[1, 2]] % len(PALETTE)])  # colours still follow queries
    assert not np.array_equal(d.image, image)  # the fallback masks are painted
    assert draw.threshold_summary(d, 0.3) == "none ≥ 0.30 · showing top 2 (best 0.12)"
    assert draw_instances(image, low, score_threshold=0.3, fallback_topk=5).count == 3  # at most what there is
    assert draw_instances(image, low, score_threshold=0.3, fallback_topk=3, max_instances=1).count == 1
    # fallback 0 (the primitive's default): nothing drawn, the caption still says why
    for off in (draw_instances(image, low, score_threshold=0.3),
                draw_instances(image, low, score_threshold=0.3, fallback_topk=0)):
        assert off.count == 0 and not off.fallback and np.array_equal(off.image, image)
        assert draw.threshold_summary(off, 0.3) == "none ≥ 0.30 (best 0.12)"
    # some above the threshold: exactly the plain selection, no fallback
    some = draw_instances(image, inst, score_threshold=0.5, fallback_topk=3)
    assert some.indices.tolist() == [1, 2] and not some.fallback and some.above_threshold == 2
    assert np.array_equal(some.image, draw_instances(image, inst, score_threshold=0.5).image)
    assert draw.threshold_summary(some, 0.5) == "2 ≥ 0.5"
    # nothing to fall back on: no instances, or ground truth (no scores) which is always drawn whole
    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "scores": np.zeros(0)}
    none = draw_instances(image, empty, score_threshold=0.3, fallback_topk=3)
    assert none.count == 0 and not none.fallback and draw.threshold_summary(none, 0.3) == "no detections"
    gt = {k: inst[k] for k in ("boxes", "masks", "labels")}
    assert draw_instances(image, gt, score_threshold=0.99, fallback_topk=1, style="gt").count == 3


# ---------------------------------------------------------------------------------------------- pixels
def _naive_edges(mask):
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx]:
                    out[y, x] = True
    return out


def test_mask_edges_match_a_naive_neighbour_test():
    rng = np.random.default_rng(4)
    masks = rng.random((3, 12, 15)) < 0.6
    masks[2] = True  # the image border counts as background
    got = mask_edges(masks)
    for m, g in zip(masks, got):
        assert np.array_equal(g, _naive_edges(m))


def test_blend_masks_against_the_formula_best_mask_on_top():
    rng = np.random.default_rng(5)
    image, inst = _scene(rng)
    order = np.argsort(-inst["scores"])
    masks, colors = inst["masks"][order], PALETTE[[0, 1, 2]]
    out = blend_masks(image, masks, colors, alpha=0.4, edges=False)
    expected = image.astype(np.float64)
    for m, c in zip(masks[::-1], colors[::-1].astype(np.float64)):  # paint worst first: best ends on top
        expected[m] = 0.6 * image.astype(np.float64)[m] + 0.4 * c
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0  # uint8 truncation
    untouched = ~masks.any(0)
    assert np.array_equal(out[untouched], image[untouched])
    rim = blend_masks(image, masks, colors, alpha=0.4, edges=True)
    edge0 = mask_edges(masks)[0]
    assert np.array_equal(rim[edge0], np.broadcast_to(colors[0], rim[edge0].shape))


def test_ground_truth_overlay_and_axes_artists():
    from matplotlib.patches import Rectangle

    rng = np.random.default_rng(6)
    image, inst = _scene(rng)
    gt = {k: inst[k] for k in ("boxes", "masks", "labels")}
    fig, ax = plt.subplots()
    d = draw_instances(image, inst, ax=ax, score_threshold=0.5, ground_truth=gt, category_names={2: "two"})
    assert d.count == 2 and d.gt_indices.tolist() == [0, 1, 2]
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 2 + 3
    assert sum(r.get_linestyle() == "--" for r in rects) == 3  # ground truth dashed
    texts = [t.get_text() for t in ax.texts]
    assert "two 0.90" in texts and "two" in texts  # predictions with scores, ground truth without
    # ground truth is outlined only: pixels strictly inside a GT mask but outside predictions are unchanged
    interior = inst["masks"][0] & ~mask_edges(inst["masks"][:1], 1)[0] & ~inst["masks"][1:].any(0)
    assert np.array_equal(d.image[interior], image[interior])
    fig2, ax2 = plt.subplots()
    draw_instances(image, inst, ax=ax2, show_boxes=False)
    assert not [p for p in ax2.patches if isinstance(p, Rectangle)] and len(ax2.texts) == 3
    with pytest.raises(ValueError, match="style"):
        draw_instances(image, inst, style="fancy")


def test_rasterised_boxes_draw_on_the_box_border_only():
    rng = np.random.default_rng(7)
    image, inst = _scene(rng)
    one = {k: v[1:2] for k, v in inst.items() if k != "masks"}
    out = draw_instances(image, one, show_labels=False, linewidth=1).image
    x0, y0, x1, y1 = one["boxes"][0].astype(int)
    changed = np.any(out != image, axis=-1)
    border = np.zeros_like(changed)
    border[y0:y1 + 1, [x0, x1]] = True
    border[[y0, y1], x0:x1 + 1] = True
    assert changed[border].all() and not changed[~border].any()


# ------------------------------------------------------------------------------------------ attention
def _attention(rng, L=2, Q=4, M=2, Lf=3, P=2):
    w = rng.random((L, Q, M, Lf, P))
    w /= w.sum((3, 4), keepdims=True)  # softmax over levels x points per head
    refs = np.concatenate([rng.random((L, Q, 2)) * 0.5 + 0.25, np.full((L, Q, 2), 0.2)], -1)
    refs[0, :, 2:] = np.nan  # a point reference for the first layer
    return {"locations": rng.random((L, Q, M, Lf, P, 2)), "weights": w, "references": refs,
            "layer_boxes": np.concatenate([rng.random((L, Q, 2)) * 0.5 + 0.25, np.full((L, Q, 2), 0.3)], -1),
            "layer_scores": rng.random((L, Q))}


def test_attention_points_and_outline_share_against_brute_force():
    from solq.viz.attention import attention_on_outline, attention_points

    rng = np.random.default_rng(8)
    att = _attention(rng)
    pts = attention_points(att, 1, 3, (20, 30))
    assert pts["x"].shape == (2 * 3 * 2,) and np.isclose(pts["weight"].sum(), 1.0)
    assert np.allclose(pts["x"], att["locations"][1, 3, ..., 0].ravel() * 30)
    assert set(pts["level"].tolist()) == {0, 1, 2} and set(pts["head"].tolist()) == {0, 1}
    mask = np.zeros((20, 30), bool)
    mask[4:15, 6:22] = True
    pts = {"x": rng.random(40) * 34 - 2, "y": rng.random(40) * 24 - 2, "weight": rng.random(40)}
    got = attention_on_outline(pts, mask, band=2.0)
    # brute force: distance from each pixel centre to the nearest pixel centre of the other class
    yy, xx = np.mgrid[0:20, 0:30]
    expected = {"outline": 0.0, "inside": 0.0, "outside": 0.0}
    for x, y, w in zip(pts["x"], pts["y"], pts["weight"]):
        px, py = int(np.floor(x)), int(np.floor(y))
        if not (0 <= px < 30 and 0 <= py < 20):
            expected["outside"] += w
            continue
        other = mask != mask[py, px]
        d = np.sqrt((yy[other] - py) ** 2 + (xx[other] - px) ** 2).min()
        key = "outline" if d <= 2.0 else ("inside" if mask[py, px] else "outside")
        expected[key] += w
    total = pts["weight"].sum()
    for k in expected:
        assert got[k] == pytest.approx(expected[k] / total, abs=1e-12)
    assert 0 < got["outline_area"] < 1


def test_query_helpers_and_attention_figure():
    from solq.viz.attention import plot_decoder_attention, queries_for_objects, top_queries

    rng = np.random.default_rng(9)
    image, inst = _scene(rng)
    result = {"scores": np.array([0.9, 0.8, 0.7, 0.6]), "query_index": np.array([3, 3, 1, 0]),
              "labels": np.array([1, 2, 3, 1]), "boxes": inst["boxes"][[1, 1, 0, 2]],
              "masks": inst["masks"][[1, 1, 0, 2]], "attention": _attention(rng)}
    assert top_queries(result, 5).tolist() == [3, 1, 0]
    gt = {k: inst[k] for k in ("boxes", "masks", "labels")}
    pairs = queries_for_objects(result, gt, 2)
    area = inst["masks"].reshape(3, -1).sum(1)
    assert [g for _, g in pairs] == [int(np.argmin(area)), int(np.argmax(area))]
    assert dict((g, q) for q, g in pairs)[1] == 3  # the object of mask 1 is best matched by query 3
    fig = plot_decoder_attention(image, result, [3, 0])
    assert len(fig.axes) == 4
    assert [len(ax.collections[0].get_offsets()) for ax in fig.axes] == [12] * 4  # M*Lf*P points per panel


# --------------------------------------------------------------------------------------------- codes
def test_coefficient_grid_follows_the_zigzag_and_reconstructions_converge():
    from solq.coding import DCTCodec
    from solq.viz.codes import coefficient_grid, plot_mask_code, progressive_reconstructions, reconstruction_iou

    codec = DCTCodec(resolution=16, num_coeffs=20)
    v = np.arange(1, 21, dtype=np.float64)
    grid = coefficient_grid(v, codec)
    # JPEG zig-zag written out: (0,0) (0,1) (1,0) (2,0) (1,1) (0,2) (0,3) (1,2) (2,1) (3,0)
    for k, (u, w) in enumerate([(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]):
        assert grid[u, w] == k + 1
    assert np.isnan(grid).sum() == grid.size - 20
    masks = torch.zeros(2, 16, 16)
    masks[0, 3:12, 4:10] = 1
    masks[1, 5:9, 2:14] = 1
    full = DCTCodec(resolution=16, num_coeffs=256)
    code = full.encode(masks)[0]
    maps, binary = progressive_reconstructions(code, full, (1, 10, 256))
    assert np.allclose(maps[-1], full.decode(code[None])[0].numpy(), atol=1e-5)
    assert np.allclose(maps[-1], masks[0].numpy(), atol=1e-4)  # all 256 coefficients: exact
    ious = reconstruction_iou(masks, full, (3, 10, 40, 256))
    assert ious[-1] == pytest.approx(1.0) and ious[0] < ious[-1]
    fig = plot_mask_code(code, full, steps=(1, 10, 256), target=masks[0])
    assert len([ax for ax in fig.axes if ax.images]) == 5


# -------------------------------------------------------------------------------------------- curves
def test_training_curves_from_a_log(tmp_path):
    from solq.viz.curves import loss_terms, plot_training_curves, read_log

    lines = []
    for step in range(1, 6):
        lines.append({"type": "train", "epoch": 0, "step": step, "loss": 10.0 / step, "loss_ce": 1.0 / step,
                      "loss_ce_0": 1.2 / step, "loss_bbox": 2.0 / step, "lr": {"default": 2e-4, "backbone": 2e-5}})
    lines.append({"type": "eval", "epoch": 1, "step": 5, "bbox": {"AP": 0.1, "AP50": 0.3}, "segm": {"AP": 0.05},
                  "loss": {"loss": 3.0, "loss_ce": 0.5}})
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    recs = read_log(tmp_path)
    assert len(recs["train"]) == 5 and len(recs["eval"]) == 1
    assert loss_terms(recs["train"]) == (["loss_bbox", "loss_ce"], ["loss_ce_0"])
    fig = plot_training_curves(tmp_path)
    loss_ax, lr_ax, ap_ax, val_ax = fig.axes[:4]
    assert len(loss_ax.lines) == 1 + 2 + 1  # total, two terms, one aux layer
    assert len(lr_ax.lines) == 2 and len(ap_ax.lines) == 3 and len(val_ax.lines) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"type": "train"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(tmp_path / "bad")


def test_ap_curves_against_steps_and_wall_time(tmp_path):
    from solq.viz.curves import plot_ap_curves

    for name, elapsed in (("a", True), ("b", False)):
        (tmp_path / name).mkdir()
        evals = [{"type": "eval", "step": s, "bbox": {"AP": s / 1000}, "segm": {"AP": s / 2000},
                  **({"elapsed_s": 60.0 * s / 500} if elapsed else {})} for s in (500, 1000)]
        (tmp_path / name / "log.jsonl").write_text("\n".join(json.dumps(r) for r in evals) + "\n")
    fig = plot_ap_curves({"a": tmp_path / "a", "b": tmp_path / "b"})
    steps_ax, time_ax = fig.axes[:2]
    assert len(steps_ax.lines) == 4 and len(time_ax.lines) == 2  # run b has no wall time
    x, y = steps_ax.lines[0].get_data()
    assert list(x) == [500, 1000] and list(y) == pytest.approx([50.0, 100.0])  # AP in percent
    assert list(time_ax.lines[0].get_data()[0]) == pytest.approx([1.0, 2.0])  # minutes


def test_precision_recall_averages_to_the_coco_ap(tmp_path):
    from pycocotools.coco import COCO

    from solq.data.synthetic import generate
    from solq.evaluation import evaluate_coco
    from solq.viz.curves import plot_precision_recall, precision_recall
    from solq.workbench.demo import ground_truth_as_predictions

    paths = generate(tmp_path, num_train=0, num_val=4, image_size=64, seed=3)
    coco = COCO(str(paths["val_annotations"]))
    preds = ground_truth_as_predictions(coco)
    rng = np.random.default_rng(0)
    for p in preds:  # degrade: shifted boxes, random scores
        p["boxes"] = p["boxes"] + rng.normal(0, 3, p["boxes"].shape)
        p["scores"] = rng.random(len(p["scores"]))
    stats, evs = evaluate_coco(coco, preds, ("bbox",), return_evaluators=True)
    _, curve = precision_recall(evs["bbox"], iou=None)
    assert np.nanmean(curve) == pytest.approx(stats["bbox"]["AP"], abs=1e-9)
    r, p50 = precision_recall(evs["bbox"].eval["precision"], iou=0.5)  # the bare [T,R,K,A,M] array
    assert r.shape == (101,) and np.nanmean(p50) == pytest.approx(stats["bbox"]["AP50"], abs=1e-9)
    cat = evs["bbox"].params.catIds[0]
    assert precision_recall(evs["bbox"], category=cat)[1].shape == (101,)
    with pytest.raises(ValueError, match="iou"):
        precision_recall(evs["bbox"], iou=0.42)
    fig = plot_precision_recall(evs, ious=(0.5, None))
    assert len(fig.axes[0].lines) == 2


# ------------------------------------------------------------------------------------------- compare
def test_compare_gallery_side_by_side_with_matched_iou():
    from solq.viz.compare import compare_gallery, compare_predictors, matched_iou

    rng = np.random.default_rng(10)
    image, inst = _scene(rng)
    gt = {k: inst[k] for k in ("boxes", "masks", "labels")}
    perfect = {**gt, "scores": np.ones(3)}
    half = {k: v[[0]] for k, v in perfect.items()}  # only the first object, exactly
    assert matched_iou(perfect, gt) == pytest.approx(1.0)
    assert matched_iou(half, gt) == pytest.approx(1 / 3)
    wrong = {**perfect, "labels": np.array([9, 9, 9])}
    assert matched_iou(wrong, gt) == 0.0
    assert matched_iou(perfect, gt, score_threshold=2.0) == 0.0
    fig, rows = compare_gallery([image, image], [half, perfect], [perfect, half], ground_truths=[gt, gt],
                                score_threshold=0.5)
    assert len(fig.axes) == 6
    assert rows[0] == {"SQR": {"detections": 1, "fallback": 0, "mean_iou": pytest.approx(1 / 3)},
                       "UQR": {"detections": 3, "fallback": 0, "mean_iou": pytest.approx(1.0)}}
    assert fig.axes[2].get_title().startswith("UQR: 3 ≥ 0.5")  # above the threshold: unchanged

    class Fixed:
        def __init__(self, result, name):
            self.result, self.name, self.category_names = result, name, {}

        def __call__(self, image):
            return self.result

    fig, rows = compare_predictors(Fixed(half, "M"), Fixed(perfect, "M"), [image])
    assert len(fig.axes) == 2 and list(rows[0]) == ["M (A)", "M (B)"]
    with pytest.raises(ValueError, match="2 images"):
        compare_gallery([image, image], [half], [half])


def test_compare_gallery_falls_back_to_the_top_k_when_a_model_has_nothing_above_the_threshold():
    from matplotlib.patches import Rectangle

    from solq.viz.compare import compare_gallery, compare_predictors

    rng = np.random.default_rng(12)
    image, inst = _scene(rng)
    gt = {k: inst[k] for k in ("boxes", "masks", "labels")}
    weak = {**gt, "scores": np.array([0.05, 0.12, 0.08])}
    strong = {**gt, "scores": np.array([0.9, 0.2, 0.6])}

    def boxes(ax):
        return len([p for p in ax.patches if isinstance(p, Rectangle)])

    fig, rows = compare_gallery([image], [strong], [weak], ground_truths=[gt], score_threshold=0.3)
    sqr, uqr = fig.axes[1], fig.axes[2]
    assert uqr.get_title() == "UQR: none ≥ 0.30 · showing top 3 (best 0.12) · mean IoU 0.00"
    assert boxes(uqr) == 3 and sorted(t.get_text() for t in uqr.texts) == ["class 1 0.05", "class 2 0.12",
                                                                           "class 3 0.08"]
    assert sqr.get_title().startswith("SQR: 2 ≥ 0.3") and boxes(sqr) == 2  # the other model: as before
    # the row counts detections >= the threshold; the mean IoU ignores the fallback instances
    assert rows[0]["UQR"] == {"detections": 0, "fallback": 3, "mean_iou": 0.0}
    assert rows[0]["SQR"]["detections"] == 2 and rows[0]["SQR"]["fallback"] == 0

    class Fixed:
        def __init__(self, result, name):
            self.result, self.name, self.category_names = result, name, {}

        def __call__(self, image):
            return self.result

    fig, rows = compare_predictors(Fixed(strong, "SQR"), Fixed(weak, "UQR"), [image], score_threshold=0.3,
                                   fallback_topk=1)
    assert boxes(fig.axes[1]) == 1 and "showing top 1 (best 0.12)" in fig.axes[1].get_title()
    fig, rows = compare_predictors(Fixed(strong, "SQR"), Fixed(weak, "UQR"), [image], score_threshold=0.3,
                                   fallback_topk=0)
    assert boxes(fig.axes[1]) == 0 and not fig.axes[1].texts
    assert fig.axes[1].get_title() == "UQR: none ≥ 0.30 (best 0.12)" and rows[0]["UQR"]["fallback"] == 0

"""The predictions gallery (the notebooks' predictions.png): panels follow the threshold, and an image with
no detection above it shows its top k instead, saying so in the title; also from a (untrained) tiny checkpoint."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from solq.viz.gallery import draw_gallery, prediction_gallery  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scene(h=24, w=32):
    image = np.full((h, w, 3), 90, np.uint8)
    masks = np.zeros((4, h, w), bool)
    for i, (x0, y0) in enumerate(((2, 2), (12, 4), (20, 12), (4, 14))):
        masks[i, y0:y0 + 8, x0:x0 + 8] = True
    boxes = np.array([[x0, y0, x0 + 8, y0 + 8] for x0, y0 in ((2, 2), (12, 4), (20, 12), (4, 14))], float)
    gt = {"boxes": boxes, "masks": masks, "labels": np.array([1, 2, 1, 2])}
    return image, gt


def _solid_boxes(ax):
    """Prediction boxes (solid); the ground truth's are dashed."""
    return len([p for p in ax.patches if isinstance(p, Rectangle) and p.get_linestyle() == "-"])


def test_an_image_with_nothing_above_the_threshold_shows_its_top_k():
    image, gt = _scene()
    low = {**gt, "scores": np.array([0.05, 0.21, 0.12, 0.02])}  # none reaches 0.3
    high = {**gt, "scores": np.array([0.9, 0.2, 0.6, 0.1])}  # two reach it
    fig, rows = draw_gallery([image, image], [low, high], ground_truths=[gt, gt], labels=["image 7", "image 8"],
                             score_threshold=0.3)
    weak, strong = fig.axes[:2]
    assert weak.get_title() == "image 7: none ≥ 0.30 · showing top 3 (best 0.21) (4 objects)"
    assert _solid_boxes(weak) == 3
    scored = sorted(t.get_text() for t in weak.texts if "." in t.get_text())  # ground truth has no score
    assert scored == ["class 1 0.05", "class 1 0.12", "class 2 0.21"]  # the three best, with their scores
    assert strong.get_title() == "image 8: 2 ≥ 0.3 (4 objects)" and _solid_boxes(strong) == 2  # unchanged
    # rows count what reached the threshold; the fallback is reported apart
    assert rows == [{"detections": 0, "fallback": 3, "objects": 4}, {"detections": 2, "fallback": 0, "objects": 4}]


def test_fallback_k_and_zero_and_no_ground_truth():
    image, gt = _scene()
    low = {**gt, "scores": np.array([0.05, 0.21, 0.12, 0.02])}
    fig, rows = draw_gallery([image], [low], score_threshold=0.3, fallback_topk=1)
    assert _solid_boxes(fig.axes[0]) == 1 and rows == [{"detections": 0, "fallback": 1}]
    assert fig.axes[0].get_title() == "image 0: none ≥ 0.30 · showing top 1 (best 0.21)"
    fig, rows = draw_gallery([image], [low], score_threshold=0.3, fallback_topk=0)
    ax = fig.axes[0]
    assert _solid_boxes(ax) == 0 and not ax.texts and rows == [{"detections": 0, "fallback": 0}]
    assert np.array_equal(ax.images[0].get_array(), image)  # nothing painted
    assert ax.get_title() == "image 0: none ≥ 0.30 (best 0.21)"  # empty, but it says why
    fig, rows = draw_gallery([image], [None], score_threshold=0.3)
    assert fig.axes[0].get_title() == "image 0: no detections" and rows == [{"detections": 0, "fallback": 0}]
    with pytest.raises(ValueError, match="1 images but 2 prediction sets"):
        draw_gallery([image], [low, low])
    with pytest.raises(ValueError, match="1 images but 2 ground truths"):
        draw_gallery([image], [low], ground_truths=[gt, gt])


def test_prediction_gallery_from_a_checkpoint(tmp_path):
    import torch

    from solq.config import load_config
    from solq.data.synthetic import generate
    from solq.engine.checkpoint import save_checkpoint
    from solq.models import build_model

    root = tmp_path / "synth"
    generate(root, num_train=0, num_val=2, image_size=64, seed=3, progress=False)
    data = ["data.dataset=synthetic", f"data.root={root}"]
    cfg = load_config("smoke", ["model.num_classes=9", "model.hidden_dim=32", "model.dim_feedforward=64",
                                "model.nheads=2", "model.num_queries=6", "model.vector_hidden_dim=32",
                                "codec.resolution=16", "codec.num_coeffs=16", "data.eval_size=64",
                                "data.max_size=64", *data])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "run" / "checkpoint.pth")
    # an untrained model scores far below 1: every image falls back to its top 3
    fig, rows = prediction_gallery(tmp_path / "run", overrides=data, num_images=2, score_threshold=1.0)
    assert [r["detections"] for r in rows] == [0, 0] and [r["fallback"] for r in rows] == [3, 3]
    assert all(r["objects"] > 0 and set(r) == {"image_id", "detections", "objects", "fallback"} for r in rows)
    for ax, r in zip(fig.axes, rows):
        assert ax.get_title().startswith(f"image {r['image_id']}: none ≥ 1.00 · showing top 3 (best 0.")
    fig, rows = prediction_gallery(tmp_path / "run", overrides=data, num_images=2, score_threshold=0.0)
    assert all(r["detections"] > 3 and r["fallback"] == 0 for r in rows)  # everything reaches 0: no fallback
    assert fig.axes[0].get_title().startswith(f"image {rows[0]['image_id']}: {rows[0]['detections']} ≥ 0 (")

"""The Explorer, headless: every control changed programmatically redraws the figure, and what is drawn
follows the controls (threshold -> detections, query -> one detection and its sampling points, layer ->
that layer's points, toggles -> masks/boxes/ground truth). Also with a real (untrained) tiny model."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("ipywidgets")

from solq.viz.attention import attention_points  # noqa: E402
from solq.viz.explorer import ALL, Explorer  # noqa: E402

M, LF, P = 2, 3, 2  # heads, levels, points


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    from solq.data import CocoInstances
    from solq.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    paths = generate(root, num_train=0, num_val=3, image_size=64, seed=1)
    return CocoInstances(str(paths["val_images"]), str(paths["val_annotations"]))


class StubPredictor:
    """Fixed detections per image (scores 0.9, 0.7, 0.5, 0.3, 0.1; query 3 listed twice) and random
    attention with a different layout per layer; counts its calls."""

    def __init__(self, layers=3, name="stub", seed=0):
        self.num_decoder_layers, self.name, self.seed = layers, name, seed
        self.category_names = {1: "circle", 2: "ellipse"}
        self.calls = 0

    def __call__(self, image, *, return_attention=False):
        self.calls += 1
        from solq.viz.predictor import image_of

        h, w = image_of(image).shape[:2]  # a dataset tensor or a file path, as the real Predictor takes
        rng = np.random.default_rng(self.seed + self.calls)
        k, q = 5, 8
        x0 = rng.integers(0, w // 2, k)
        y0 = rng.integers(0, h // 2, k)
        boxes = np.stack([x0, y0, x0 + 10, y0 + 10], 1).astype(float)
        masks = np.zeros((k, h, w), bool)
        for i, (a, b) in enumerate(zip(x0, y0)):
            masks[i, b:b + 10, a:a + 10] = True
        att = {"locations": rng.random((self.num_decoder_layers, q, M, LF, P, 2)),
               "weights": rng.dirichlet(np.ones(LF * P), (self.num_decoder_layers, q, M)).reshape(
                   self.num_decoder_layers, q, M, LF, P),
               "references": rng.random((self.num_decoder_layers, q, 4)) * 0.3 + 0.2,
               "layer_boxes": rng.random((self.num_decoder_layers, q, 4)) * 0.3 + 0.2,
               "layer_scores": rng.random((self.num_decoder_layers, q))}
        return {"scores": np.array([0.9, 0.7, 0.5, 0.3, 0.1]), "labels": np.array([1, 2, 1, 2, 1]),
                "query_index": np.array([3, 5, 3, 0, 7]), "boxes": boxes, "masks": masks,
                "image_size": (h, w), "attention": att}


def _points(explorer):
    """Offsets of the scatter collections (the attention points) of the last figure: [N,2]."""
    cols = [c for c in explorer.figure.axes[0].collections if len(c.get_offsets())]
    return np.concatenate([c.get_offsets() for c in cols]) if cols else np.zeros((0, 2))


def test_threshold_query_layer_and_toggles_drive_the_figure(val_set):
    stub = StubPredictor()
    ex = Explorer(stub, dataset=val_set, score_threshold=0.5)
    assert ex.redraws == 1 and ex.figure is not None
    scores = np.array([0.9, 0.7, 0.5, 0.3, 0.1])
    for t in (0.0, 0.3, 0.5, 0.95, 0.2):
        ex.threshold.value = t
        above = int((scores >= t).sum())
        assert ex.last_drawn["above_threshold"] == above and ex.last_drawn["fallback"] == (above == 0)
        assert ex.last_drawn["predictions"] == (above or 3)  # none at 0.95: the top 3 instead
        assert ex.last_drawn["threshold"] == t
    assert ex.layer.max == 2
    assert [v for _, v in ex.query.options] == [ALL, 3, 5, 0, 7]  # distinct queries, best first

    ex.show_attention.value = True  # all shown detections (threshold 0.2: queries 3, 5, 3, 0) -> 3 queries
    assert ex.last_drawn["attention_points"] == 3 * M * LF * P
    ex.query.value = 5
    assert ex.last_drawn["predictions"] == 1 and ex.last_drawn["query"] == 5
    res = ex.current_result()
    for layer in (0, 2, 1):
        ex.layer.value = layer
        pts = attention_points(res["attention"], layer, 5, res["image_size"])
        assert np.allclose(np.sort(_points(ex), 0), np.sort(np.stack([pts["x"], pts["y"]], 1), 0))
        assert ex.last_drawn["layer"] == layer
    ex.query.value = 7  # below the threshold, but explicitly chosen: drawn
    assert ex.last_drawn["predictions"] == 1

    from matplotlib.patches import Rectangle

    def n_rects():
        return len([p for p in ex.figure.axes[0].patches if isinstance(p, Rectangle)])

    assert n_rects() == 1
    ex.show_boxes.value = False
    assert n_rects() == 0
    ex.show_gt.value = True
    n_gt = len(val_set[ex.image.value][1]["labels"])
    assert ex.last_drawn["gt"] == n_gt > 0
    ex.show_attention.value = False
    assert ex.last_drawn["attention_points"] == 0 and len(_points(ex)) == 0
    before = ex.redraws
    ex.show_masks.value = False
    assert ex.redraws == before + 1
    assert stub.calls == 1  # one image so far: results are cached across redraws


def test_nothing_above_the_threshold_shows_the_top_k_and_says_so(val_set):
    from matplotlib.patches import Rectangle

    def n_rects(ex):
        return len([p for p in ex.figure.axes[0].patches if isinstance(p, Rectangle)])

    ex = Explorer(StubPredictor(), dataset=val_set, score_threshold=0.95)  # stub scores 0.9 ... 0.1
    assert ex.last_drawn["predictions"] == 3 and ex.last_drawn["fallback"] and n_rects(ex) == 3
    title = ex.figure.axes[0].get_title()
    assert title.endswith("all queries · none ≥ 0.95 · showing top 3 (best 0.90)"), title
    assert "none ≥ 0.95: the best 3 by score" in ex.status.value
    drawn_scores = sorted(t.get_text().split()[-1] for t in ex.figure.axes[0].texts)
    assert drawn_scores == ["0.50", "0.70", "0.90"]  # the best three, with their (low) scores
    ex.threshold.value = 0.6  # two above: exactly those, no fallback
    assert ex.last_drawn["predictions"] == ex.last_drawn["above_threshold"] == 2 and not ex.last_drawn["fallback"]
    assert ex.figure.axes[0].get_title().endswith("all queries · 2 ≥ 0.6") and "the best" not in ex.status.value

    off = Explorer(StubPredictor(), dataset=val_set, score_threshold=0.95, fallback_topk=0)
    assert off.last_drawn["predictions"] == 0 and not off.last_drawn["fallback"] and n_rects(off) == 0
    assert off.figure.axes[0].get_title().endswith("none ≥ 0.95 (best 0.90)")
    one = Explorer(StubPredictor(), dataset=val_set, score_threshold=0.95, fallback_topk=1)
    assert one.last_drawn["predictions"] == 1 and n_rects(one) == 1


def test_image_and_checkpoint_switches(val_set, tmp_path):
    from PIL import Image

    first, second = StubPredictor(layers=3, name="A"), StubPredictor(layers=1, name="B", seed=10)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(folder / "extra.png")
    ex = Explorer(first, dataset=val_set, folder=folder, checkpoints={"B": second}, score_threshold=0.0)
    assert len(ex.image.options) == len(val_set) + 1
    ex.image.value = 2
    assert ex.last_drawn["image"] == 2 and first.calls == 2
    ex.layer.value = 2
    ex.checkpoint.value = "B"
    assert ex.layer.max == 0 and ex.layer.value == 0  # B has one decoder layer
    assert ex.last_drawn["checkpoint"] == "B" and second.calls == 1
    ex.show_gt.value = True
    ex.image.value = len(val_set)  # the folder image: no ground truth
    assert ex.last_drawn["gt"] == 0 and ex.figure.axes[0].images[0].get_array().shape[:2] == (40, 50)
    with pytest.raises(ValueError, match="predictor or at least one checkpoint"):
        Explorer(None, dataset=val_set)
    with pytest.raises(ValueError, match="dataset or a folder"):
        Explorer(first)


def test_with_a_real_tiny_model(val_set):
    from solq.config import load_config
    from solq.models import build_model
    from solq.viz.predictor import Predictor

    cfg = load_config("smoke", ["model.num_classes=9", "model.hidden_dim=32", "model.dim_feedforward=64",
                                "model.nheads=2", "model.num_queries=6", "model.vector_hidden_dim=32",
                                "codec.resolution=16", "codec.num_coeffs=16", "data.eval_size=64", "data.max_size=64"])
    model, _, post = build_model(cfg)
    predictor = Predictor(model, post, cfg, category_names=val_set.category_names)
    ex = Explorer(predictor, dataset=val_set, score_threshold=0.0)
    res = ex.current_result()
    m = cfg.model
    assert res["attention"]["locations"].shape == (m.dec_layers, m.num_queries, m.nheads, m.num_feature_levels,
                                                   m.dec_n_points, 2)
    assert res["masks"].shape[1:] == tuple(int(s) for s in val_set[0][1]["orig_size"])
    assert ex.last_drawn["predictions"] == len(res["scores"])
    ex.query.value = ex.query.options[1][1]
    ex.show_attention.value = True
    ex.layer.value = ex.layer.max
    assert ex.last_drawn["attention_points"] == m.nheads * m.num_feature_levels * m.dec_n_points
    ex.threshold.value = 1.0
    ex.query.value = ALL
    assert ex.last_drawn["above_threshold"] == 0 and ex.last_drawn["fallback"]
    assert ex.last_drawn["predictions"] == min(3, len(res["scores"]))


def test_predictor_matches_the_evaluation_pipeline_and_finds_checkpoints(val_set, tmp_path):
    import torch

    from solq.config import load_config
    from solq.data import CocoInstances, build_transforms
    from solq.engine.checkpoint import save_checkpoint
    from solq.models import build_model
    from solq.viz.predictor import Predictor, resolve_checkpoint

    cfg = load_config("smoke", ["model.num_classes=9", "model.hidden_dim=32", "model.dim_feedforward=64",
                                "model.nheads=2", "model.num_queries=6", "model.vector_hidden_dim=32",
                                "codec.resolution=16", "codec.num_coeffs=16", "data.eval_size=48", "data.max_size=64"])
    torch.manual_seed(0)
    model, _, post = build_model(cfg)
    predictor = Predictor(model, post, cfg)
    image, target = val_set[1]
    got = predictor(image, return_attention=True)
    # the engine's way: the dataset with the evaluation transforms, a batch of one, the post-processor
    ds = CocoInstances(str(val_set.image_dir), str(val_set.ann_file), build_transforms(False, cfg.data))
    x, t = ds[1]
    with torch.no_grad():
        out = model(x[None], torch.zeros(1, *x.shape[-2:], dtype=torch.bool), return_attention=True)
        ref = post(out, t["orig_size"][None], input_sizes=t["size"][None])[0]
    for key in ("scores", "labels", "boxes", "query_index", "masks"):
        assert np.array_equal(got[key], ref[key].numpy()), key
    att = got["attention"]
    assert np.allclose(att["locations"][1], out["dec_attention"][1]["locations"][0].numpy())
    assert np.allclose(att["references"][1], out["dec_references"][0, 0].numpy())  # layer 1 attends around layer 0's
    assert np.allclose(att["references"][0, :, :2], out["init_reference"][0, :, :2].numpy())
    assert np.allclose(att["layer_boxes"][-1], out["pred_boxes"][0].numpy())
    # checkpoints: a file, a run folder, a folder holding the run one level down
    run = tmp_path / "point" / "run"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "categories": {1: "circle"}},
                    run / "checkpoint.pth")
    assert resolve_checkpoint(run / "checkpoint.pth") == resolve_checkpoint(run) == resolve_checkpoint(run.parent)
    loaded = Predictor.from_checkpoint(run.parent, name="tiny")
    assert loaded.category_names == {1: "circle"} and loaded.name == "tiny"
    assert np.array_equal(loaded(image)["scores"], got["scores"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_checkpoint(tmp_path / "missing.pth")

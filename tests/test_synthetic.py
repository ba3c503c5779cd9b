"""Synthetic COCO-format scenes: determinism, COCO validity, occlusion, GT scores AP 1 through evaluate_coco."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from solq.data import synthetic
from solq.evaluation import evaluate_coco

SIZE, MAX_OBJECTS = 128, 10
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = synthetic.generate(root, 24, 6, SIZE, seed=3, max_objects=MAX_OBJECTS, progress=False)
    return root, paths


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    root, _ = dataset
    again = synthetic.generate(tmp_path / "a", 24, 6, SIZE, seed=3, progress=False)["root"]
    ref = _files(root)
    assert ref == _files(again)
    assert len(ref) == 24 + 6 + 2
    other = _files(synthetic.generate(tmp_path / "b", 24, 6, SIZE, seed=4, progress=False)["root"])
    assert other.keys() == ref.keys()
    assert all(other[k] != ref[k] for k in ref)


def test_val_split_independent_of_num_train(tmp_path, dataset):
    root, _ = dataset
    small = synthetic.generate(tmp_path, 2, 6, SIZE, seed=3, progress=False)
    assert (root / "val" / "000004.png").read_bytes() == (small["val_images"] / "000004.png").read_bytes()


def test_val_seed_changes_only_the_val_split(tmp_path, dataset):
    root, _ = dataset
    other = synthetic.generate(tmp_path, 24, 6, SIZE, seed=3, max_objects=MAX_OBJECTS, progress=False, val_seed=9)
    assert (root / "train" / "000002.png").read_bytes() == (other["train_images"] / "000002.png").read_bytes()
    assert (root / "val" / "000002.png").read_bytes() != (other["val_images"] / "000002.png").read_bytes()
    assert synthetic.is_up_to_date(tmp_path, 24, 6, SIZE, 3, val_seed=9)
    assert not synthetic.is_up_to_date(tmp_path, 24, 6, SIZE, 3)  # the val split is not seed 3's


def test_coco_validity(dataset):
    root, paths = dataset
    assert paths["train_annotations"] == root / "annotations" / "instances_train.json"
    for split, n in (("train", 24), ("val", 6)):
        coco = _load(paths[f"{split}_annotations"])
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, len(synthetic.CATEGORIES) + 1))
        assert len(coco.getImgIds()) == n
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            with Image.open(paths[f"{split}_images"] / info["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (info["width"], info["height"]) == (SIZE, SIZE)
            anns = coco.imgToAnns[image_id]
            assert 1 <= len(anns) <= MAX_OBJECTS
            union = np.zeros((SIZE, SIZE), np.int64)
            for a in anns:
                m = coco.annToMask(a).astype(bool)
                assert m.any(), f"annotation {a['id']} has an empty mask"
                rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
                bbox = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
                assert a["bbox"] == [float(v) for v in bbox]
                assert a["area"] == float(m.sum()) and a["iscrowd"] == 0
                union += m
            assert union.max() <= 1  # visible masks never overlap


def test_categories_sizes_and_overlaps_over_a_small_set(dataset):
    _, paths = dataset
    coco = _load(paths["train_annotations"])
    anns = coco.dataset["annotations"]
    assert len({a["category_id"] for a in anns}) >= 6
    # overlapping objects: boxes of two annotations of one image intersect
    overlaps = 0
    for image_id in coco.getImgIds():
        b = np.array([a["bbox"] for a in coco.imgToAnns[image_id]], float)
        x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
        iw = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
        ih = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        inter = (iw > 0) & (ih > 0)
        overlaps += int(inter.sum() - len(b)) // 2
    assert overlaps > 0


def test_render_scene_occlusion_and_holes():
    occluded = holes = 0
    areas = []
    for i in range(30):
        scene = synthetic.render_scene(np.random.default_rng([7, i]), 256, max_objects=MAX_OBJECTS)
        k = len(scene.labels)
        assert scene.image.shape == (256, 256, 3) and scene.image.dtype == np.uint8
        assert scene.masks.shape == scene.full_masks.shape == (k, 256, 256) and 1 <= k <= MAX_OBJECTS
        assert not (scene.masks & ~scene.full_masks).any()  # visible part lies inside the shape
        assert scene.masks.sum(0).max() <= 1
        vis, full = scene.masks.sum((1, 2)), scene.full_masks.sum((1, 2))
        assert (vis >= synthetic.MIN_VISIBLE_FRACTION * full).all() and (vis >= synthetic.MIN_VISIBLE_PIXELS).all()
        occluded += int((vis < full).sum())
        areas.extend(vis.tolist())
        for m, lab in zip(scene.masks, scene.labels):
            if synthetic.CATEGORIES[lab - 1] == "ring":
                holes += int(ndimage.binary_fill_holes(m).sum() > m.sum())
    assert occluded > 0 and holes > 0
    areas = np.array(areas)
    # all three COCO area ranges occur at 256 px
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()


def test_ground_truth_scores_ap_one(dataset):
    _, paths = dataset
    coco = _load(paths["val_annotations"])
    preds = []
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = np.array([a["bbox"] for a in anns], float)
        boxes[:, 2:] += boxes[:, :2]
        preds.append({"image_id": image_id, "boxes": boxes, "scores": np.ones(len(anns)),
                      "labels": np.array([a["category_id"] for a in anns]),
                      "masks": np.stack([coco.annToMask(a) for a in anns]).astype(bool)})
    res = evaluate_coco(coco, preds)
    assert res["bbox"]["AP"] == pytest.approx(1.0) and res["segm"]["AP"] == pytest.approx(1.0)


def test_is_up_to_date_and_cli(tmp_path, dataset):
    root, _ = dataset
    assert synthetic.is_up_to_date(root, 24, 6, SIZE, 3, max_objects=MAX_OBJECTS)
    assert not synthetic.is_up_to_date(root, 24, 6, SIZE, 4)
    assert not synthetic.is_up_to_date(root, 25, 6, SIZE, 3)
    assert not synthetic.is_up_to_date(tmp_path / "missing", 24, 6, SIZE, 3)
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--num-train", "3", "--num-val", "1", "--image-size", "64",
                           "--seed", "1", "--no-progress"]) == 0
    assert synthetic.is_up_to_date(out, 3, 1, 64, 1)
    # a smaller re-generation into the same folder removes the images it no longer lists
    synthetic.generate(out, 2, 1, 64, 1, progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.png", "000002.png"]
    assert json.loads((out / "annotations" / "instances_train.json").read_text())["info"]["num_images"] == 2
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate(out, 1, 1, 8, 0, progress=False)

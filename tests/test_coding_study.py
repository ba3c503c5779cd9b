"""Reconstruction study on tiny COCO sets, and the mask_coding notebook end to end (papermill)."""
import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from solq.coding import DCTCodec, FlattenCodec
from solq.coding import study

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_tiny"


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture()
def toy_coco():
    """Two images with axis-aligned rectangles on integer pixels, a triangle, and a crowd region."""
    crowd = {"size": [40, 60], "counts": [40 * 50, 40 * 10]}  # uncompressed RLE: the last 10 columns
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 6, 20, 10], "segmentation": _rect(5, 6, 20, 10)},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 3, 12, 30], "segmentation": _rect(30, 3, 12, 30)},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [50, 0, 10, 40], "segmentation": crowd, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [2, 2, 30, 25],
         "segmentation": [[2, 2, 32, 2, 2, 27]]},
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [36, 10, 16, 16], "segmentation": _rect(36, 10, 16, 16)},
    ]
    for a in anns:
        a.setdefault("iscrowd", 0)
        a["area"] = a["bbox"][2] * a["bbox"][3]
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 60, "height": 40, "file_name": "a.jpg"},
                               {"id": 2, "width": 60, "height": 40, "file_name": "b.jpg"}],
                    "annotations": anns, "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "tri"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_ground_truth_skips_crowd(toy_coco):
    gt = study.image_ground_truth(toy_coco, 1)
    assert gt["masks"].shape == (2, 40, 60) and gt["ann_ids"].tolist() == [1, 2]
    assert gt["boxes"][0].tolist() == [5.0, 6.0, 25.0, 16.0]
    assert gt["masks"][0].sum() == 200


def test_lossless_coding_equals_crop_and_paste(toy_coco):
    """A DCT keeping all N² coefficients changes nothing: same metrics as crop + paste alone at that N."""
    settings = {"plain": None, "dct_all": DCTCodec(32, 32 * 32, threshold="0.5"), "dct_one": DCTCodec(32, 1),
                "flatten": FlattenCodec()}
    res = study.run_study(settings, toy_coco, resolution=32, num_examples=2, progress=False)
    m = res.metrics
    assert m["num_images"] == 2 and m["num_instances"] == 4  # the crowd region is not an instance
    for key in ("mask_iou", "mask_AP", "mask_APs", "mask_APm"):
        assert m[f"dct_all/{key}"] == pytest.approx(m[f"plain/{key}"])
    # integer-pixel rectangles come back exactly, the triangle nearly
    assert m["plain/mask_iou"] > 0.97 and m["plain/mask_AP"] == pytest.approx(1.0)
    assert m["plain/mask_APl"] == -1.0  # no large object: pycocotools' -1
    # one coefficient (the DC term) keeps only box-filling shapes: the triangle is lost
    assert m["dct_one/mask_iou"] < m["plain/mask_iou"] - 0.05
    assert m["dct_one/mask_AP"] < m["plain/mask_AP"]
    assert len(res.examples) == 2
    ex = res.examples[0]
    assert set(ex["recon"]) == set(settings) and ex["recon"]["plain"].shape == ex["gt"].shape


def test_mean_iou_matches_direct_computation(toy_coco):
    codec = DCTCodec(16, 10)
    m = study.run_study({"c": codec}, toy_coco, progress=False).metrics
    ious = []
    for image_id in (1, 2):
        gt = study.image_ground_truth(toy_coco, image_id)
        rec = study.reconstruct(codec, gt["masks"], gt["boxes"], (40, 60))
        inter = (rec & gt["masks"]).sum((1, 2)).double()
        ious += (inter / (rec | gt["masks"]).sum((1, 2)).double()).tolist()
    assert m["c/mask_iou"] == pytest.approx(sum(ious) / len(ious))


def test_reconstruction_study_with_specs_on_coco_tiny():
    if not TINY.is_dir():
        pytest.skip("coco2017_tiny not available")
    coco = study.load_coco(study.resolve_coco(TINY, "val")[0])
    fit = study.load_coco(study.resolve_coco(TINY, "train")[0])
    spec = {"name": "pca", "resolution": 32, "num_coeffs": 16}
    pca = study.reconstruction_study(spec, coco, fit_coco=fit, fit_max_images=10, max_images=2, progress=False)
    dct = study.reconstruction_study({"name": "dct", "resolution": 64, "num_coeffs": 128}, coco, max_images=2,
                                     progress=False)
    for m in (pca, dct):
        assert m["num_images"] == 2 and m["num_instances"] > 0
        assert 0 < m["mask_iou"] <= 1 and 0 <= m["mask_AP"] <= 1
    assert dct["mask_iou"] > 0.9
    with pytest.raises(ValueError, match="needs fitting"):
        study.reconstruction_study("sparse", coco, max_images=1)


def test_resolve_coco_and_format_table(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    assert study.resolve_coco(tmp_path, "val") == (tmp_path / "annotations" / "instances_val2017.json",
                                                   tmp_path / "val2017")
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        study.resolve_coco(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no such"):
        study.resolve_coco(tmp_path / "nope", "val")
    ann, images = study.resolve_coco("samples")
    assert ann.name == "instances.json" and images.name == "images"
    text = study.format_table({"a/mask_AP": 0.5, "a/mask_iou": 0.25, "b/mask_AP": -1.0}, ["a", "b"],
                              columns=("mask_iou", "mask_AP"), extra={"a": {"paper": 32.6}})
    lines = text.splitlines()
    assert lines[0].split() == ["setting", "mask_iou", "mask_AP", "paper"]
    assert lines[1].split() == ["a", "25.0", "50.0", "32.6"] and lines[2].split() == ["b", "-", "-", "-"]


def test_settings_helpers():
    s3d = study.resolution_sweep_settings([8, 64])
    assert s3d["N8"].dim == 64 and s3d["N64"].dim == 256
    s3e = study.dimension_sweep_settings([128, 300])
    assert [c.dim for c in s3e.values()] == [128, 300] and s3e["nk300"].resolution == 128
    s3a = study.comparison_settings(["dct", "flatten"])
    assert list(s3a) == ["crop_paste", "dct", "flatten"] and s3a["crop_paste"] is None
    with pytest.raises(ValueError, match="unknown codec"):
        study.comparison_settings(["jpeg"])


def test_notebook_runs_with_papermill(tmp_path):
    import papermill

    dataset = str(TINY) if TINY.is_dir() else "samples"
    out = tmp_path / "run"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "mask_coding.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters={"dataset": dataset, "max_images": 2, "codecs": ["dct", "pca", "flatten"], "resolutions": [64],
                    "dims": [128], "output_dir": str(out)},
        kernel_name="python3", progress_bar=False, cwd=str(REPO))
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("crop_paste", "dct", "pca", "flatten"):  # sparse: same code path, slower fit (unit-tested)
        for key in ("mask_AP", "mask_iou", "mask_APs"):
            assert f"table3a/{name}/{key}" in metrics
    assert 0 < metrics["table3a/dct/mask_iou"] <= 1
    assert "table3d/N64/mask_AP" in metrics and "table3e/nk128/mask_iou" in metrics
    assert metrics["coding/dct/N64/k256/segm/AP"] == metrics["table3d/N64/mask_AP"]
    assert metrics["coding/flatten/N28/k784/miou"] == metrics["table3a/flatten/mask_iou"]
    assert metrics["params/max_images"] == 2 and metrics["params/dataset"] == dataset
    assert "code_version" in metrics and "fit_note" in metrics
    assert (out / "reconstructions.png").is_file() and (out / "sweeps.png").is_file()


def _cells():
    """The notebook's cells as dicts with the source joined (plain json: nbformat is slow to import)."""
    nb = json.loads((REPO / "notebooks" / "mask_coding.ipynb").read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    return [dict(c, source="".join(c["source"])) for c in nb["cells"]]


def test_notebook_is_clean_and_validates_parameters():
    """Committed without outputs; one `parameters` cell of literals; the next cell rejects bad values by name."""
    import ast

    cells = _cells()
    assert cells[0]["cell_type"] == "markdown"
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is cells[1]
    for node in ast.parse(tagged[0]["source"]).body:
        assert isinstance(node, ast.Assign)
        ast.literal_eval(node.value)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    for bad, name in (({"codecs": ["jpeg"]}, "codecs"), ({"resolutions": [64, 1]}, "resolutions"),
                      ({"max_images": -1}, "max_images"), ({"dataset": "/nonexistent/coco"}, "dataset"),
                      ({"device": "tpu"}, "device")):
        namespace: dict = {}
        exec(tagged[0]["source"], namespace)
        namespace.update(bad)
        with pytest.raises(ValueError, match=name):
            exec(cells[2]["source"], namespace)

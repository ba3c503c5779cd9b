"""CocoInstances: decoding, crowd handling, every validation case, image modes, real data."""
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from solq.data import CocoInstances, DatasetError, DataWarning, ImageLoadError, samples_dir

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_tiny"
CATS = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]


def rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(aid, image_id, box, cat=1, seg="poly", crowd=0):
    """Annotation whose segmentation is the rectangle ``box`` (x0,y0,x1,y1) unless seg is given."""
    x0, y0, x1, y1 = box
    if seg == "poly":
        seg = rect_poly(x0, y0, x1, y1)
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": float((x1 - x0) * (y1 - y0)), "iscrowd": crowd, "segmentation": seg}


def write_set(root, images, anns, categories=CATS, extra=None, write_files=True):
    """images: list of (id, (w, h)); writes RGB PNGs named <id>.png and instances.json; -> (dir, json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for image_id, (w, h) in images:
        recs.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
        if write_files:
            Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / f"{image_id}.png")
    data = {"images": recs, "annotations": anns, "categories": categories, **(extra or {})}
    (root / "instances.json").write_text(json.dumps(data))
    return root, root / "instances.json"


def load(root, ann_file, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoInstances(root, ann_file, **kw)
    return ds, [w for w in caught if issubclass(w.category, DataWarning)]


def rect_mask(h, w, box):
    """Independent rasterisation of an integer rectangle polygon (pixel centres inside)."""
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_valid_set_decodes_polygons_and_both_rles(tmp_path):
    h, w = 30, 40
    ref = rect_mask(h, w, (20, 5, 35, 25))
    ref[10:12, 22:24] = False  # a hole, only expressible in RLE
    runs, cur, n = [], False, 0
    for v in ref.flatten(order="F"):  # column-major run lengths, starting with zeros
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    uncompressed = {"counts": runs, "size": [h, w]}
    compressed = mask_utils.encode(np.asfortranarray(ref.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    anns = [ann(1, 1, (2, 3, 12, 20), cat=7), ann(2, 1, (20, 5, 35, 25), seg=uncompressed),
            ann(3, 1, (20, 5, 35, 25), seg=compressed),
            ann(4, 1, (0, 0, 10, 10), seg=rect_poly(0, 0, 4, 4) + rect_poly(6, 6, 10, 10))]
    ds, warned = load(*write_set(tmp_path, [(1, (w, h))], anns))
    assert not warned and len(ds) == 1 and ds.num_classes == 8 and ds.category_names == {1: "a", 7: "b"}
    image, t = ds[0]
    assert image.shape == (3, h, w) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert t["masks"].dtype == torch.bool and t["masks"].shape == (4, h, w)
    assert t["labels"].tolist() == [7, 1, 1, 1] and t["labels"].dtype == torch.int64
    assert t["boxes"].dtype == torch.float32 and t["boxes"][0].tolist() == [2, 3, 12, 20]
    assert int(t["image_id"]) == 1 and t["orig_size"].tolist() == [h, w] == t["size"].tolist()
    # pycocotools rasterises a polygon with integer corners x0..x1 to columns x0..x1-1 inclusive
    assert torch.equal(t["masks"][0], torch.from_numpy(rect_mask(h, w, (2, 3, 12, 20))))
    assert torch.equal(t["masks"][1], torch.from_numpy(ref))
    assert torch.equal(t["masks"][2], torch.from_numpy(ref))
    two = rect_mask(h, w, (0, 0, 4, 4)) | rect_mask(h, w, (6, 6, 10, 10))
    assert torch.equal(t["masks"][3], torch.from_numpy(two))


def test_crowd_excluded_from_targets_but_kept_for_evaluation(tmp_path):
    anns = [ann(1, 1, (0, 0, 10, 10)), ann(2, 1, (5, 5, 20, 20), crowd=1)]
    root, f = write_set(tmp_path, [(1, (32, 24))], anns)
    ds, _ = load(root, f)
    _, t = ds[0]
    assert t["labels"].numel() == 1 and t["iscrowd"].tolist() == [0]
    assert sorted(ds.coco.getAnnIds(imgIds=[1])) == [1, 2] and ds.report.num_crowd == 1
    ds, _ = load(root, f, keep_crowd=True)
    assert ds[0][1]["iscrowd"].tolist() == [0, 1]


def test_bbox_partly_outside_is_clamped(tmp_path):
    anns = [{**ann(1, 1, (0, 0, 10, 10)), "bbox": [-5, 2, 50, 8]}]
    ds, warned = load(*write_set(tmp_path, [(1, (30, 20))], anns))
    assert not warned and ds.report.clamped_boxes == [1]
    assert ds[0][1]["boxes"].tolist() == [[0, 2, 30, 10]]


@pytest.mark.parametrize("bad, reason", [
    ({"image_id": 99}, "annotation on unknown image id"),
    ({"category_id": 3}, "unknown category id"),
    ({"bbox": [1, 2, 0, 5]}, "degenerate bbox (w or h <= 0)"),
    ({"bbox": [1, 2, 5, -1]}, "degenerate bbox (w or h <= 0)"),
    ({"bbox": [40, 2, 5, 5]}, "bbox outside image"),
    ({"bbox": [1, 2, 5]}, "invalid bbox"),
    ({"bbox": [1, 2, float("nan"), 5]}, "invalid bbox"),
    ({"segmentation": [[1, 1, 5, 5]]}, "polygon with < 3 points"),
    ({"segmentation": []}, "empty segmentation"),
    ({"segmentation": [[]]}, "empty segmentation"),
    ({"segmentation": None}, "empty segmentation"),
    ({"segmentation": {"counts": [5, 3], "size": [7, 9]}}, "RLE size differs from image"),
    ({"segmentation": {"counts": [5, 3], "size": [20, 30]}}, "malformed RLE (counts do not sum to h*w)"),
])
def test_bad_annotation_is_skipped_counted_and_reported_once(tmp_path, bad, reason):
    anns = [ann(1, 1, (0, 0, 10, 10)), {**ann(2, 1, (2, 2, 8, 8)), **bad}, {**ann(3, 1, (2, 2, 8, 8)), **bad}]
    root, f = write_set(tmp_path, [(1, (30, 20))], anns)
    ds, warned = load(root, f)
    assert len(warned) == 1
    msg = str(warned[0].message)
    assert f"skipped 2 annotations: 2 {reason} (ann ids 2, 3)" in msg and "instances.json" in msg
    assert ds.report.skipped_annotations == {reason: [2, 3]}
    assert ds[0][1]["labels"].numel() == 1 and ds.coco.getAnnIds() == [1]
    with pytest.raises(DatasetError, match=rf"strict.*{reason[:12]}.*ann ids 2, 3"):
        CocoInstances(root, f, strict=True)


def test_summary_groups_several_reasons(tmp_path):
    anns = [ann(5, 1, (0, 0, 10, 10), seg=[[1, 1, 2, 2]]), ann(9, 1, (0, 0, 10, 10), seg=[[1, 1, 2, 2]]),
            ann(12, 1, (0, 0, 10, 10), seg=[]), ann(13, 1, (0, 0, 10, 10))]
    ds, warned = load(*write_set(tmp_path, [(1, (30, 20))], anns))
    assert len(warned) == 1 and ("skipped 3 annotations: 2 polygon with < 3 points (ann ids 5, 9), "
                                 "1 empty segmentation (ann id 12)") in str(warned[0].message)


def test_short_polygon_part_is_dropped_but_annotation_kept(tmp_path):
    anns = [ann(1, 1, (0, 0, 10, 10), seg=rect_poly(0, 0, 10, 10) + [[3, 3, 4, 4]])]
    root, f = write_set(tmp_path, [(1, (30, 20))], anns)
    ds, warned = load(root, f)
    assert ds.report.dropped_polygon_parts == [1] and len(warned) == 1 and "dropped polygon parts" in str(
        warned[0].message)
    assert ds[0][1]["masks"][0].sum() == 100 and len(ds.coco.anns[1]["segmentation"]) == 1
    with pytest.raises(DatasetError, match="dropped polygon parts"):
        CocoInstances(root, f, strict=True)


def test_duplicate_annotation_ids_keep_the_first(tmp_path):
    anns = [ann(1, 1, (0, 0, 10, 10)), ann(1, 1, (5, 5, 9, 9), cat=7)]
    ds, warned = load(*write_set(tmp_path, [(1, (30, 20))], anns))
    assert ds.report.skipped_annotations == {"duplicate annotation id": [1]} and len(warned) == 1
    assert ds[0][1]["labels"].tolist() == [1]


def test_duplicate_image_ids_are_an_error(tmp_path):
    root, f = write_set(tmp_path, [(1, (30, 20))], [])
    data = json.loads(f.read_text())
    data["images"].append({**data["images"][0], "file_name": "other.png"})
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"duplicate image id 1 \('1.png' and 'other.png'\)"):
        CocoInstances(root, f)


def test_images_without_annotations_are_kept_and_counted(tmp_path):
    ds, warned = load(*write_set(tmp_path, [(1, (30, 20)), (2, (30, 20))], [ann(1, 1, (0, 0, 5, 5))]))
    assert not warned and len(ds) == 2 and ds.report.images_without_annotations == [2]
    _, t = ds[1]
    assert t["masks"].shape == (0, 20, 30) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert "1 images without annotations" in ds.report.summary()


@pytest.mark.parametrize("data, match", [
    ([1, 2], "top level is a list"),
    ({"annotations": [], "categories": CATS}, "missing key 'images'"),
    ({"images": [], "annotations": []}, "missing key 'categories'"),
    ({"images": [{"id": 1, "width": 3, "height": 3}], "categories": CATS}, r"images\[0\] has no key 'file_name'"),
    ({"images": [], "categories": CATS, "annotations": [{"id": 1, "image_id": 1}]},
     r"annotations\[0\] has no key 'category_id'"),
    ({"images": [], "categories": [{"id": "x", "name": "a"}]}, r"categories\[0\] has an invalid 'id'"),
    ({"images": [], "categories": CATS * 2}, "duplicate category id 1"),
    ({"images": {}, "categories": CATS}, "'images' must be a list"),
])
def test_not_coco_json_is_a_clear_error(tmp_path, data, match):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=match) as info:
        CocoInstances(tmp_path, f)
    assert "bad.json" in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{\"images\": [")
    with pytest.raises(DatasetError, match="broken.json: not valid JSON"):
        CocoInstances(tmp_path, f)
    with pytest.raises(DatasetError, match="not found"):
        CocoInstances(tmp_path, tmp_path / "nope.json")


def test_missing_image_file_is_skipped(tmp_path):
    root, f = write_set(tmp_path, [(1, (30, 20)), (2, (30, 20))], [ann(1, 1, (0, 0, 5, 5)), ann(2, 2, (0, 0, 5, 5))])
    (root / "2.png").unlink()
    ds, warned = load(root, f)
    assert ds.ids == [1] and ds.report.skipped_images == {"image file missing": [2]}
    assert "skipped 1 image: 1 image file missing (image id 2)" in str(warned[0].message)
    assert ds.coco.getImgIds() == [1] and ds.coco.getAnnIds() == [1]
    with pytest.raises(DatasetError, match="image file missing"):
        CocoInstances(root, f, strict=True)


@pytest.mark.parametrize("problem", ["unreadable", "size"])
def test_bad_image_file_at_load_time_and_with_header_check(tmp_path, problem):
    root, f = write_set(tmp_path, [(1, (30, 20)), (2, (30, 20))], [ann(1, 1, (0, 0, 5, 5)), ann(2, 2, (0, 0, 5, 5))])
    if problem == "unreadable":
        (root / "1.png").write_bytes(b"not an image at all")
        match = r"image id 1: .*1.png: unreadable image file"
    else:
        Image.new("RGB", (31, 20)).save(root / "1.png")
        match = r"image id 1: .*1.png: image is 31x20 .* annotation file says 30x20"
    strict, _ = load(root, f, strict=True)  # only a header scan finds these: construction succeeds
    with pytest.raises(ImageLoadError, match=match):
        strict[0]
    lenient, _ = load(root, f)
    with pytest.warns(DataWarning, match=match):
        _, t = lenient[0]
    assert int(t["image_id"]) == 2 and list(lenient.report.load_failures.values()) == [[1]]
    checked, warned = load(root, f, check_images="header")
    assert checked.ids == [2] and len(warned) == 1 and "(image id 1)" in str(warned[0].message)
    with pytest.raises(DatasetError, match="unreadable" if problem == "unreadable" else "size differs"):
        CocoInstances(root, f, strict=True, check_images="header")


def _save(root, name, im, **kw):
    im.save(root / name, **kw)
    return {"id": len(list(root.glob("*"))), "file_name": name, "width": im.width, "height": im.height}


def test_image_modes_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    cases = {
        "L.png": (Image.fromarray(grey, "L"), np.repeat(grey[..., None], 3, 2), {}),
        "P.png": (Image.fromarray(rgb).quantize(16), None, {}),
        "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), None, {"quality": 95}),
        "RGBA.png": (Image.fromarray(np.dstack([rgb, np.where(np.arange(16) < 8, 255, 0)[None].repeat(12, 0)])
                                     .astype(np.uint8), "RGBA"), None, {}),
        "I16.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.repeat(grey[..., None], 3, 2), {}),
    }
    recs = [_save(tmp_path, name, im, **kw) for name, (im, _, kw) in cases.items()]
    (tmp_path / "i.json").write_text(json.dumps({"images": recs, "annotations": [], "categories": CATS}))
    ds = CocoInstances(tmp_path, tmp_path / "i.json")
    for (name, (im, expected, _)), rec in zip(cases.items(), recs):
        image = ds[ds.ids.index(rec["id"])][0]
        assert image.shape == (3, 12, 16), name
        got = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        if expected is None:
            expected = np.asarray(im.convert("RGB"))
        if name == "RGBA.png":  # transparent half composited on black
            expected = rgb.copy()
            expected[:, 8:] = 0
        tol = 12 if name.endswith("jpg") else 1
        assert np.abs(got.astype(int) - expected).max() <= tol, name


def _exif_image(tmp_path, orientation):
    """A 16x10 stored image with a bright block at stored rows 0..2, cols 0..3, EXIF orientation 6."""
    raw = np.zeros((10, 16, 3), np.uint8)
    raw[0:3, 0:4] = 255
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    return raw


@pytest.mark.parametrize("json_size", ["displayed", "stored"])
def test_exif_orientation(tmp_path, json_size):
    raw = _exif_image(tmp_path, 6)  # 6 = displayed after rotating 90 degrees clockwise
    shown = np.rot90(raw, k=-1)
    wh = (shown.shape[1], shown.shape[0]) if json_size == "displayed" else (raw.shape[1], raw.shape[0])
    rec = {"id": 1, "file_name": "rot.jpg", "width": wh[0], "height": wh[1]}
    (tmp_path / "i.json").write_text(json.dumps({"images": [rec], "annotations": [], "categories": CATS}))
    ds = CocoInstances(tmp_path, tmp_path / "i.json")
    if json_size == "displayed":
        image = ds[0][0]
        expected = shown
    else:
        with pytest.warns(DataWarning, match="EXIF orientation 6 .* using the stored pixels"):
            image = ds[0][0]
        expected = raw
    got = (image[0] > 0.5).numpy()
    assert got.shape == expected.shape[:2] and (got == (expected[..., 0] > 127)).mean() > 0.97


def test_max_images_and_coco_subset(tmp_path):
    anns = [ann(i, i, (0, 0, 5, 5)) for i in range(1, 6)]
    ds, _ = load(*write_set(tmp_path, [(i, (20, 20)) for i in (5, 3, 1, 4, 2)], anns), max_images=2)
    assert ds.ids == [1, 2] and ds.coco.getImgIds() == [1, 2] and sorted(ds.coco.getAnnIds()) == [1, 2]


def test_image_info_file_without_annotations(tmp_path):
    root, f = write_set(tmp_path, [(1, (20, 20))], [])
    data = json.loads(f.read_text())
    del data["annotations"]
    f.write_text(json.dumps(data))
    ds, warned = load(root, f)
    assert len(ds) == 1 and not warned and ds[0][1]["labels"].numel() == 0


def test_shipped_samples_load_cleanly():
    root = samples_dir()
    ds, warned = load(root / "images", root / "instances.json")
    assert not warned and len(ds) == 8 and ds.report.num_skipped == 0 and ds.num_classes == 91
    assert ds.report.num_crowd >= 1 and ds.report.num_annotations > 40
    data = json.loads((root / "instances.json").read_text())
    assert {im["license"] for im in data["images"]} <= {4, 5, 7}
    attribution = (root / "ATTRIBUTION.md").read_text()
    assert all(im["file_name"] in attribution for im in data["images"]) and "CC BY 4.0" in attribution
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 2_000_000


@pytest.mark.skipif(not TINY.exists(), reason="../shared/data/coco2017_tiny not available")
def test_coco2017_tiny_val():
    start = time.perf_counter()
    ds, warned = load(TINY / "images" / "val", TINY / "annotations" / "instances_val.json")
    assert time.perf_counter() - start < 2.0 and not warned and len(ds) == 80 and ds.num_classes == 91
    data = json.loads((TINY / "annotations" / "instances_val.json").read_text())
    crowd = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    for image_id in sorted(crowd)[:3] + [ds.ids[0]]:
        image, t = ds[ds.ids.index(image_id)]
        info = ds.coco.imgs[image_id]
        n = sum(1 for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"])
        assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
        assert set(t) == {"boxes", "masks", "labels", "image_id", "area", "iscrowd", "orig_size", "size"}
        assert t["masks"].shape == (n, info["height"], info["width"]) and t["masks"].dtype == torch.bool
        assert t["iscrowd"].sum() == 0 and t["labels"].dtype == torch.int64
        assert len(ds.coco.getAnnIds(imgIds=[image_id])) > n  # crowd kept for evaluation
        # each mask's tight box agrees with the annotated box (COCO's differ by a few pixels at most)
        for m, box in zip(t["masks"], t["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert (tight - box).abs().max() <= 4.0


@pytest.mark.skipif(not TINY.exists(), reason="../shared/data/coco2017_tiny not available")
def test_coco2017_tiny_crowd_masks_match_pycocotools_per_annotation():
    ds = CocoInstances(TINY / "images" / "val", TINY / "annotations" / "instances_val.json", keep_crowd=True)
    crowd_images = sorted({a["image_id"] for a in ds.coco.anns.values() if a["iscrowd"]})[:2]
    for image_id in crowd_images:
        _, t = ds[ds.ids.index(image_id)]
        ann_ids = [a["id"] for a in ds.coco.imgToAnns[image_id]]  # targets keep the JSON order, as here
        reference = np.stack([ds.coco.annToMask(ds.coco.anns[a]) for a in ann_ids]).astype(bool)
        assert t["iscrowd"].sum() >= 1 and np.array_equal(reference, t["masks"].numpy())

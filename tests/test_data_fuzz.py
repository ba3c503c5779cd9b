"""Bad input: every message names the file and the id; randomly malformed COCO documents (hypothesis) give only
DatasetError or counted skips, and whatever passes the checks decodes."""
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

import solq.data.coco
from solq.data import CocoInstances, DatasetError, DataWarning
from solq.data.validation import compressed_rle_counts
from test_data_coco import ann, load, write_set

EXAMPLES = 2000  # README "Faults": how many documents one run tries, and how long it takes
OUTCOMES = {"error": 0, "skips": 0, "clean": 0}

# any JSON value: what a malformed field may hold instead of the right thing
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6) | st.sampled_from([0, -1, 1, 2 ** 63, 1e308, "", "1", "\x00", "ü/../x.png"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


def _segmentation(draw, w: int, h: int):
    kind = draw(st.sampled_from(["polygon", "counts", "string"]))
    if kind == "polygon":
        return [draw(st.lists(st.floats(0, max(w, h)), min_size=0, max_size=10))]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))  # cheaper to draw than h*w booleans
    rle = mask_utils.encode(np.asfortranarray(rng.random((h, w)) < rng.random(), dtype=np.uint8))
    if kind == "string":
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return {"size": [h, w], "counts": compressed_rle_counts(rle["counts"].decode("ascii"))}


def _locations(node, parent=None, key=None):
    """Every (container, key) in a JSON tree, the root as (None, None)."""
    yield parent, key
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in list(items):
        yield from _locations(v, node, k)


def _mutate(draw, doc):
    """One random damage: delete, replace with junk, wrap in a list, make a string, negate or blow up a number."""
    places = list(_locations(doc))
    parent, key = places[draw(st.integers(0, len(places) - 1))]
    value = doc if parent is None else parent[key]
    action = draw(st.sampled_from(["delete", "junk", "wrap", "string", "number"]))
    if action == "delete" and parent is not None:
        del parent[key]
        return doc
    if action == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        new = draw(st.sampled_from([-value, value * 10 ** 20, float("nan"), float("inf"), value + 0.5]))
    elif action == "wrap":
        new = [value]
    elif action == "string":
        new = str(value)
    else:
        new = draw(JUNK)
    if parent is None:
        return new
    parent[key] = new
    return doc


@st.composite
def malformed_documents(draw):
    """A small valid COCO instances document (polygons, RLE counts, compressed RLE), then 0-4 damages."""
    images = [{"id": i, "file_name": f"{i}.png", "width": draw(st.integers(1, 12)), "height": draw(st.integers(1, 12))}
              for i in range(1, draw(st.integers(0, 3)) + 1)]
    anns = []
    for j in range(1, draw(st.integers(0, 4)) + 1):
        img = draw(st.sampled_from(images)) if images else {"id": 7, "width": 4, "height": 4}
        w, h = img["width"], img["height"]
        x, y = draw(st.floats(0, w)), draw(st.floats(0, h))
        anns.append({"id": j, "image_id": img["id"], "category_id": draw(st.sampled_from([1, 2])),
                     "bbox": [x, y, draw(st.floats(0, w)), draw(st.floats(0, h))], "area": draw(st.floats(0, w * h)),
                     "iscrowd": draw(st.sampled_from([0, 1])), "segmentation": _segmentation(draw, w, h)})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for _ in range(draw(st.integers(0, 4))):
        doc = _mutate(draw, doc)
    return doc


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    """Where each document is written: in memory (/dev/shm) when there is one, since a write to a disk-backed
    temporary folder costs ~3 ms here, as much as the rest of a case."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="solq-fuzz-", dir=shm))
        yield folder / "instances.json"
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz") / "instances.json"


def _check_one(doc, path: Path, strict: bool) -> str:
    path.write_text(json.dumps(doc))  # NaN and Infinity as JSON's common extension, which json.load reads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = CocoInstances(path.parent, path, strict=strict, check_images="none")
        except DatasetError as e:
            assert str(path) in str(e), e
            return "error"
    warned = [w for w in caught if issubclass(w.category, DataWarning)]
    skipped = sum(map(len, ds.report.skipped_annotations.values()))
    assert len(ds.coco.anns) + skipped == len(doc.get("annotations", [])), "an annotation was neither kept nor counted"
    assert len(warned) == (1 if ds.report.problems() else 0) and all(str(path) in str(w.message) for w in warned)
    for i, image_id in enumerate(ds.ids):
        info = ds.coco.imgs[image_id]
        if info["width"] * info["height"] <= 4096:  # what passed the checks decodes
            t = ds.target(i)
            assert t["masks"].shape[1:] == (info["height"], info["width"]) and len(t["masks"]) == len(t["labels"])
            assert bool(t["boxes"].isfinite().all()) and bool((t["area"] >= 0).all())
    return "skips" if ds.report.problems() else "clean"


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=malformed_documents(), strict=st.booleans())
def test_malformed_documents_give_only_dataset_errors_or_counted_skips(doc_file, doc, strict):
    OUTCOMES[_check_one(doc, doc_file, strict)] += 1


def test_the_fuzzer_reaches_errors_skips_and_clean_documents():
    """Runs after the property test (file order): a generator that only ever produced errors would prove little."""
    total = sum(OUTCOMES.values())
    if total < EXAMPLES:
        pytest.skip("run together with the property test")
    assert min(OUTCOMES.values()) >= total // 20, OUTCOMES


def test_compressed_counts_decode_as_pycocotools_encodes():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (5, 7), (40, 33)]:
        mask = np.asfortranarray(rng.random((h, w)) < 0.3, dtype=np.uint8)
        rle = mask_utils.encode(mask)
        counts = compressed_rle_counts(rle["counts"].decode())
        assert sum(counts) == h * w and sum(counts[1::2]) == int(mask.sum())
        assert mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"] == rle["counts"]
    assert compressed_rle_counts("0") == [0] and compressed_rle_counts("~") is None  # 'no' is out of the code
    assert compressed_rle_counts("P") is None  # a continuation bit with nothing after it


# ------------------------------------------------------------------------- messages name file and id
def test_an_image_entry_without_width_names_its_id_and_position(tmp_path):
    root, f = write_set(tmp_path, [(1, (30, 20)), (17, (30, 20))], [])
    data = json.loads(f.read_text())
    del data["images"][1]["width"]
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"{f}: images\[1\] has no key 'width' \(id 17\)"):
        CocoInstances(root, f)


def test_an_undecodable_rle_names_its_annotation_and_image(tmp_path):
    bad = {"size": [20, 30], "counts": "0\x7f!"}  # characters outside the compressed-RLE code
    root, f = write_set(tmp_path, [(1, (30, 20)), (4, (30, 20))], [ann(1, 1, (0, 0, 5, 5)), ann(9, 4, (0, 0, 5, 5), seg=bad)])
    ds, warned = load(root, f)
    assert ds.report.skipped_annotations == {"malformed RLE (undecodable compressed counts)": [9]}
    message = str(warned[0].message)
    assert str(f) in message and "(ann id 9) (on image id 4)" in message


def test_a_missing_image_names_its_path(tmp_path):
    root, f = write_set(tmp_path, [(1, (30, 20)), (2, (30, 20))], [])
    (root / "2.png").unlink()
    ds, warned = load(root, f)
    assert f"image file missing (image id 2) (file {root / '2.png'})" in str(warned[0].message)


def test_a_segmentation_pycocotools_refuses_at_load_time_names_file_annotation_and_image(tmp_path, monkeypatch):
    root, f = write_set(tmp_path, [(3, (30, 20))], [ann(1, 3, (0, 0, 5, 5)), ann(8, 3, (2, 2, 9, 9))])
    ds, _ = load(root, f)
    original = solq.data.coco.decode_masks

    def refuse_ann_8(segs, h, w):
        if any(s == ds.coco.anns[8]["segmentation"] for s in segs):
            raise TypeError("pycocotools: bad input")
        return original(segs, h, w)

    monkeypatch.setattr(solq.data.coco, "decode_masks", refuse_ann_8)
    with pytest.raises(DatasetError, match=rf"{f}: annotation id 8 of image id 3 \({root / '3.png'}\): "
                                           r"undecodable segmentation \(TypeError"):
        ds[0]


@pytest.mark.parametrize("bad, reason", [
    ({"area": float("nan")}, "invalid area"), ({"area": -1}, "invalid area"), ({"iscrowd": 2}, "invalid iscrowd (must be 0 or 1)"),
    ({"segmentation": [[0, 0, "x", 1, 5, 5]]}, "malformed polygon (coordinates must be finite numbers)"),
    ({"segmentation": {"size": 20, "counts": [600]}}, "malformed RLE (size must be [height, width])"),
    ({"segmentation": {"size": [20, 30], "counts": [300, "a", 300]}}, "malformed RLE (counts must be integers >= 0)"),
])
def test_unusable_fields_are_skipped_with_their_reason(tmp_path, bad, reason):
    root, f = write_set(tmp_path, [(1, (30, 20))], [ann(1, 1, (0, 0, 10, 10)), {**ann(2, 1, (2, 2, 8, 8)), **bad}])
    ds, warned = load(root, f)
    assert ds.report.skipped_annotations == {reason: [2]} and math.isfinite(float(ds.target(0)["area"][0]))
    assert f"1 {reason} (ann id 2) (on image id 1)" in str(warned[0].message)


def test_a_huge_category_id_is_an_error_not_a_huge_model(tmp_path):
    root, f = write_set(tmp_path, [(1, (30, 20))], [], categories=[{"id": 10 ** 12, "name": "x"}])
    with pytest.raises(DatasetError, match=r"categories\[0\] has id 1000000000000, outside 0..100000"):
        CocoInstances(root, f)

"""ONNX export (issue 17): ``solq export`` writes the network of a shipped model, onnxruntime agrees with PyTorch
within 1e-4, the batch size is free, and solq.deploy's numpy post-processing gives PostProcess's masks without
torch."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from solq import deploy
from solq.cli import main
from solq.data import samples_dir
from solq.engine.checkpoint import build_from_checkpoint
from solq.engine.export import TOLERANCE, ExportError, export_onnx, sample_input

ort = pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
onnx = pytest.importorskip("onnx", reason="pip install -e '.[export]'")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = sorted((samples_dir() / "images").glob("*.jpg"))[1]


@pytest.fixture(scope="module")
def uqr_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "smoke_uqr.onnx"
    result = export_onnx("smoke-uqr", path)
    return result, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_matches_pytorch_and_describes_itself(uqr_export):
    result, session = uqr_export
    assert result["max_diff"] <= TOLERANCE and set(result["max_abs_diff"]) == {"pred_logits", "pred_boxes",
                                                                               "pred_vectors"}
    assert result["backend"] == "reference" and result["frame"] == (192, 192)  # the smoke model's max_size
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs == {"images": ["batch", 3, 192, 192], "mask": ["batch", 192, 192]}
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes", "pred_vectors"]
    meta = deploy.read_metadata(session)
    assert meta["codec"] == {"name": "dct", "resolution": 64, "num_coeffs": 128, "threshold": "midrange"}
    assert meta["mode"] == "uqr" and meta["topk"] == 100 and meta["frame"] == [192, 192]
    checker = onnx.load(str(result["path"]))
    onnx.checker.check_model(checker)


def test_batch_size_is_free_and_images_are_independent(uqr_export):
    _, session = uqr_export
    meta = deploy.read_metadata(session)
    a, ma = sample_input(meta, SAMPLE)
    b, mb = sample_input(meta)  # another image, another padding
    one = [session.run(None, {"images": x, "mask": m}) for x, m in ((a, ma), (b, mb))]
    both = session.run(None, {"images": np.concatenate([a, b]), "mask": np.concatenate([ma, mb])})
    for k, out in enumerate(both):
        assert out.shape[0] == 2
        np.testing.assert_allclose(out[1], one[1][k][0], atol=1e-4)
        np.testing.assert_allclose(out[0], one[0][k][0], atol=1e-4)


def _onnx_outputs(session, image):
    meta = deploy.read_metadata(session)
    rgb = np.asarray(Image.open(image).convert("RGB"))
    images, mask, _ = deploy.prepare_image(rgb, meta)
    return meta, rgb.shape[:2], session.run(None, {"images": images, "mask": mask})


def test_numpy_postprocess_equals_postprocess(uqr_export):
    _, session = uqr_export
    meta, hw, (logits, boxes, vectors) = _onnx_outputs(session, SAMPLE)
    _, _, _, postprocessor, _ = build_from_checkpoint("smoke-uqr")
    [want] = postprocessor({"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes),
                            "pred_vectors": torch.from_numpy(vectors)}, torch.tensor([hw]))
    [got] = deploy.postprocess(logits, boxes, vectors, [hw], meta)
    assert got["masks"].shape == tuple(want["masks"].shape) == (100, *hw)
    np.testing.assert_array_equal(got["query_index"], want["query_index"].numpy())
    np.testing.assert_array_equal(got["labels"], want["labels"].numpy())
    np.testing.assert_allclose(got["scores"], want["scores"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["boxes"], want["boxes"].numpy(), rtol=1e-6, atol=1e-4)
    assert want["masks"].any() and (got["masks"] == want["masks"].numpy()).all()


def test_deploy_runs_without_torch(uqr_export, tmp_path):
    """The README's deployment snippet in a process where importing torch fails."""
    result, session = uqr_export
    meta, hw, outputs = _onnx_outputs(session, SAMPLE)
    [want] = deploy.postprocess(*outputs, [hw], meta)
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np, onnxruntime as ort
from PIL import Image
from solq.deploy import read_metadata, prepare_image, postprocess
session = ort.InferenceSession({str(result['path'])!r}, providers=["CPUExecutionProvider"])
meta = read_metadata(session)
rgb = np.asarray(Image.open({str(SAMPLE)!r}).convert("RGB"))
images, mask, _ = prepare_image(rgb, meta)
[det] = postprocess(*session.run(None, {{"images": images, "mask": mask}}), [rgb.shape[:2]], meta)
np.savez({str(tmp_path / 'det.npz')!r}, **det)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    got = np.load(tmp_path / "det.npz")
    assert (got["masks"] == want["masks"]).all() and (got["query_index"] == want["query_index"]).all()


def test_paste_masks_matches_paste_in_image_at_odd_boxes():
    from solq.coding import paste_in_image

    rng = np.random.default_rng(0)
    crops = rng.random((6, 16, 16)) > 0.4
    boxes = np.array([[3.2, 4.7, 20.1, 30.9], [-5, -3, 10, 12], [25, 30, 60, 41], [0, 0, 40, 30],
                      [10, 10, 10, 20], [39.5, 29.5, 80, 70]], np.float32)  # outside, degenerate, clipped
    want = paste_in_image(torch.from_numpy(crops), torch.from_numpy(boxes), (30, 40)).numpy()
    assert (deploy.paste_masks(crops, boxes, (30, 40)) == want).all() and want.any()


def test_cli_exports_sqr_masks_and_fails_above_the_tolerance(tmp_path, capsys):
    out = tmp_path / "sqr.onnx"
    assert main(["export", "--checkpoint", "smoke-sqr", "--output", str(out), "--height", "160", "--width", "192"]) == 0
    text = capsys.readouterr().out
    assert "pred_masks" in text and "attention backend reference" in text and "[B,3,160,192]" in text
    diff = float(text.split("on the sample image: ")[1].split()[0])
    assert diff <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes", "pred_masks"]
    assert main(["export", "--checkpoint", "smoke-sqr", "--output", str(tmp_path / "strict.onnx"),
                 "--tolerance", "0"]) == 1
    assert "differs from PyTorch by" in capsys.readouterr().err
    with pytest.raises(ExportError, match="opset >= 16"):
        export_onnx("smoke-uqr", tmp_path / "old.onnx", opset=13)
    meta = json.loads(onnx.load(str(out)).metadata_props[0].value)
    assert meta["mode"] == "sqr"
    logits, boxes, masks = session.run(None, dict(zip(["images", "mask"], sample_input(meta))))
    with pytest.raises(ValueError, match="'sqr' model's masks are not written"):
        deploy.postprocess(logits, boxes, masks, [(160, 192)], meta)
    assert "masks" not in deploy.postprocess(logits, boxes, None, [(160, 192)], meta)[0]

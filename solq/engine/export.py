"""``solq export``: a checkpoint's network (backbone to heads) as an ONNX file, checked with onnxruntime.

The file has two inputs, ``images`` float32 [B,3,H,W] (normalised as the evaluation transform does) and ``mask``
bool [B,H,W] (True on padding), and the outputs ``pred_logits`` [B,Q,C], ``pred_boxes`` [B,Q,4] and
``pred_vectors`` [B,Q,n_k] (UQR) or ``pred_masks`` [B,Q,H/16,W/16] (SQR): the last decoder layer's, as
``PostProcess`` reads them. The batch size B is free; H x W is fixed at export (``--height``/``--width``,
default max_size x max_size of the evaluation transform, which holds any image it resizes): the deformable
attention splits its flattened multi-level memory into levels with sizes read as Python integers
(``spatial_shapes.tolist()``), which the TorchScript exporter records as constants and ``torch.export`` refuses
as data-dependent. Smaller images are zero-padded into the frame and marked in ``mask``
(``solq.deploy.prepare_image``), which the network handles as it handles padded batches.

The attention is exported with the ``reference`` backend (one ``grid_sample`` per level, ONNX GridSample,
opset >= 16); the fused and Triton backends have no ONNX form. The file's metadata (key ``solq``, JSON) holds
what numpy post-processing needs (``solq.deploy``). The export is checked on a sample image: the largest
absolute difference between onnxruntime's and PyTorch's outputs must stay within ``tolerance`` (1e-4).

onnx and onnxruntime are optional (``pip install -e '.[export]'``) and imported when an export runs.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from solq import deploy
from solq.data import samples_dir
from solq.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from solq.engine.checkpoint import build_from_checkpoint

__all__ = ["EXPORT_BACKEND", "TOLERANCE", "ExportError", "OnnxNetwork", "default_frame", "export_onnx"]

EXPORT_BACKEND = "reference"
TOLERANCE = 1e-4
MIN_OPSET = 16  # GridSample
_INSTALL = "pip install -e '.[export]'"


class ExportError(RuntimeError):
    """An export that cannot be made or does not match PyTorch (the message says why)."""


class OnnxNetwork(nn.Module):
    """A SOLQ or SQR model with tensor inputs and a tuple of outputs, as ONNX wants it.

    ``forward(images [B,3,H,W] float32, mask [B,H,W] bool)`` -> (pred_logits [B,Q,C], pred_boxes [B,Q,4], and
    pred_vectors [B,Q,n_k] for ``mode`` uqr, pred_masks [B,Q,h,w] for sqr, nothing more for det);
    :attr:`output_names` names them."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model = model
        extra = {"uqr": ["pred_vectors"], "sqr": ["pred_masks"]}.get(mode, [])
        self.output_names = ["pred_logits", "pred_boxes", *extra]

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images, mask)
        return tuple(out[k] for k in self.output_names)


def default_frame(cfg) -> tuple[int, int]:
    """(H, W) that holds every image the evaluation transform resizes: max_size x max_size (eval_size when
    there is no max_size)."""
    side = int(cfg.data.max_size or cfg.data.eval_size)
    return side, side


def _metadata(cfg, frame: tuple[int, int], output_names: list[str], categories: dict) -> dict:
    """The JSON stored in the ONNX file for :mod:`solq.deploy` (see ``deploy.read_metadata``)."""
    c = cfg.codec
    return {"mode": cfg.model.mode, "frame": list(frame), "eval_size": cfg.data.eval_size,
            "max_size": cfg.data.max_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "topk": cfg.eval.topk, "mask_threshold": cfg.eval.mask_threshold,
            "codec": {"name": c.name, "resolution": c.resolution, "num_coeffs": c.num_coeffs, "threshold": c.threshold},
            "num_classes": cfg.model.num_classes, "categories": {str(k): v for k, v in categories.items()},
            "outputs": output_names, "attention_backend": EXPORT_BACKEND}


def _import_onnx():
    try:  # optional dependencies, imported only when exporting
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"solq export needs onnx and onnxruntime ({e.name} is missing): {_INSTALL}") from None
    return onnx, onnxruntime


def sample_input(meta: dict, image: Optional[str | Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """The check's input: ``image`` (default: the first shipped sample) prepared by ``deploy.prepare_image``.
    Returns (images float32 [1,3,H,W], mask bool [1,H,W])."""
    path = Path(image) if image else sorted((samples_dir() / "images").glob("*.jpg"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    images, mask, _ = deploy.prepare_image(rgb, meta)
    return images, mask


def export_onnx(checkpoint: str | Path, output: str | Path, *, opset: int = 17, height: Optional[int] = None,
                width: Optional[int] = None, image: Optional[str | Path] = None, tolerance: float = TOLERANCE,
                config: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """Export ``checkpoint`` (solq file, release file or shipped name such as ``smoke-uqr``) to ``output``.

    height/width: the input frame (default :func:`default_frame`); image: the check's sample (default: a
    shipped one). Returns {"path", "frame" (H, W), "outputs" (names), "max_abs_diff" {output: difference},
    "max_diff", "backend", "opset", "seconds"}. Raises ExportError (the file is kept, for inspection) when the
    largest difference exceeds ``tolerance``, or when onnx/onnxruntime are missing or the opset is too old.
    """
    onnx, ort = _import_onnx()
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the attention's grid_sample needs ONNX opset >= {MIN_OPSET}")
    start = time.perf_counter()
    cfg, model, _, _, categories = build_from_checkpoint(
        checkpoint, config=config, overrides=[*overrides, f"model.attention_backend={EXPORT_BACKEND}"])
    net = OnnxNetwork(model, cfg.model.mode).eval()
    frame = default_frame(cfg)
    frame = (int(height or frame[0]), int(width or frame[1]))
    meta = _metadata(cfg, frame, net.output_names, categories)
    images, mask = sample_input(meta, image)
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"images": {0: "batch"}, "mask": {0: "batch"}, **{k: {0: "batch"} for k in net.output_names}}
    with warnings.catch_warnings():  # the tracer's notes on Python ints (the frame is fixed, see the docstring)
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.from_numpy(images), torch.from_numpy(mask)), str(out_path), dynamo=False,
                          input_names=["images", "mask"], output_names=net.output_names, opset_version=opset,
                          dynamic_axes=batch)
    proto = onnx.load(str(out_path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = deploy.METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(out_path))

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images, "mask": mask})
    with torch.no_grad():
        want = net(torch.from_numpy(images), torch.from_numpy(mask))
    diffs = {k: float(np.abs(g - w.numpy()).max()) for k, g, w in zip(net.output_names, got, want)}
    result = {"path": out_path, "frame": frame, "outputs": net.output_names, "max_abs_diff": diffs,
              "max_diff": max(diffs.values()), "backend": EXPORT_BACKEND, "opset": opset,
              "seconds": time.perf_counter() - start}
    if result["max_diff"] > tolerance:
        raise ExportError(f"{out_path}: onnxruntime differs from PyTorch by {result['max_diff']:.3g} (> {tolerance:g}) "
                          f"on the sample image: {diffs}")
    return result

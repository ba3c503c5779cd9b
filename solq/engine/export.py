"""``solq export``: a checkpoint's network (backbone to heads) as an ONNX file, checked with onnxruntime.

The file has two inputs, ``images`` float32 [B,3,H,W] (normalised as the evaluation transform does) and ``mask``
bool [B,H,W] (True on padding), and the outputs ``pred_logits`` [B,Q,C], ``pred_boxes`` [B,Q,4] and
``pred_vectors`` [B,Q,n_k] (UQR) or ``pred_masks`` [B,Q,H/16,W/16] (SQR): the last decoder layer's, as
``PostProcess`` reads them. B, H and W are free (dynamic axes ``batch``, ``height``, ``width``): one image goes
in at its own size with an all-False mask, several go in padded to the largest (``solq.deploy.stack_images``).
The TorchScript tracer records sizes read from ``x.shape`` as Shape ops; the model keeps its per-level sizes in
that form while tracing (``transformer._spatial_shapes``, ``msda_reference``), so no size of the sample becomes a
constant. ``--height``/``--width`` only set the size of the traced sample (default max_size x max_size of the
evaluation transform; the sample image is padded into it, shrunk first when it does not fit).

The attention is exported with the ``reference`` backend (one ``grid_sample`` per level, ONNX GridSample,
opset >= 16); the fused and Triton backends have no ONNX form. The file's metadata (key ``solq``, JSON) holds
what numpy post-processing needs (``solq.deploy``). The export is checked on a sample image at two sizes, the
traced one (padded) and the image's own resized size (no padding): the largest absolute difference between
onnxruntime's and PyTorch's outputs must stay within ``tolerance`` (1e-4) at each.

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

__all__ = ["EXPORT_BACKEND", "TOLERANCE", "ExportError", "OnnxNetwork", "default_trace_size", "export_onnx",
           "sample_input"]

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


def default_trace_size(cfg) -> tuple[int, int]:
    """(H, W) of the traced sample: max_size x max_size (eval_size when there is no max_size), which holds every
    image the evaluation transform resizes, so the sample is padded and the trace sees a real padding mask."""
    side = int(cfg.data.max_size or cfg.data.eval_size)
    return side, side


def _metadata(cfg, trace_size: tuple[int, int], output_names: list[str], categories: dict) -> dict:
    """The JSON stored in the ONNX file for :mod:`solq.deploy` (see ``deploy.read_metadata``)."""
    c = cfg.codec
    return {"mode": cfg.model.mode, "trace_size": list(trace_size), "dynamic_axes": ["batch", "height", "width"],
            "eval_size": cfg.data.eval_size, "max_size": cfg.data.max_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "topk": cfg.eval.topk, "mask_threshold": cfg.eval.mask_threshold,
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


def sample_input(meta: dict, image: Optional[str | Path] = None,
                 frame: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """A check's input: ``image`` (default: the first shipped sample) prepared by ``deploy.prepare_image``.

    frame: None (the resized image, no padding) or (H, W): the image zero-padded into H x W, first shrunk to
    fit when its resized size does not. Returns (images float32 [1,3,H,W], mask bool [1,H,W] True on padding)."""
    path = Path(image) if image else sorted((samples_dir() / "images").glob("*.jpg"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    images, mask, (nh, nw) = deploy.prepare_image(rgb, meta)
    if frame is None:
        return images, mask
    fh, fw = int(frame[0]), int(frame[1])
    if nh > fh or nw > fw:
        # the largest short side whose long side still fits (prepare_image: long = int(short * long/short))
        h, w = rgb.shape[:2]
        side = min(fh, int(fw * h / w)) if h <= w else min(fw, int(fh * w / h))
        meta = {**meta, "eval_size": max(side, 1), "max_size": 0}
    images, mask, _ = deploy.prepare_image(rgb, meta, (fh, fw))
    return images, mask


def export_onnx(checkpoint: str | Path, output: str | Path, *, opset: int = 17, height: Optional[int] = None,
                width: Optional[int] = None, image: Optional[str | Path] = None, tolerance: float = TOLERANCE,
                config: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """Export ``checkpoint`` (solq file, release file or shipped name such as ``smoke-uqr``) to ``output``.

    height/width: the size of the traced sample, the image padded into it (default :func:`default_trace_size`;
    the file takes any size); image: the checks' sample (default: a shipped one). Returns {"path", "trace_size"
    (H, W), "outputs" (names), "checks" [{"size" (H, W), "padded" bool, "max_abs_diff" {output: difference},
    "max_diff"}] (the traced size, then the image's own size), "max_abs_diff" {output: largest over the checks},
    "max_diff", "backend", "opset", "seconds"}. Raises ExportError (the file is kept, for inspection) when the largest
    difference exceeds ``tolerance``, or when onnx/onnxruntime are missing or the opset is too old.
    """
    onnx, ort = _import_onnx()
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the attention's grid_sample needs ONNX opset >= {MIN_OPSET}")
    start = time.perf_counter()
    cfg, model, _, _, categories = build_from_checkpoint(
        checkpoint, config=config, overrides=[*overrides, f"model.attention_backend={EXPORT_BACKEND}"])
    net = OnnxNetwork(model, cfg.model.mode).eval()
    trace_size = default_trace_size(cfg)
    trace_size = (int(height or trace_size[0]), int(width or trace_size[1]))
    meta = _metadata(cfg, trace_size, net.output_names, categories)
    samples = [(sample_input(meta, image, trace_size), True), (sample_input(meta, image), False)]
    images, mask = samples[0][0]
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"},
               **{k: {0: "batch"} for k in net.output_names}}
    if "pred_masks" in net.output_names:  # stride 16 of the input
        dynamic["pred_masks"] = {0: "batch", 2: "mask_height", 3: "mask_width"}
    with warnings.catch_warnings():
        # the tracer's notes on Python values: those left are fixed by the model (level and query counts, widths,
        # shape checks), not by the input size, which the checks below vary
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.from_numpy(images), torch.from_numpy(mask)), str(out_path), dynamo=False,
                          input_names=["images", "mask"], output_names=net.output_names, opset_version=opset,
                          dynamic_axes=dynamic)
    proto = onnx.load(str(out_path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = deploy.METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(out_path))

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    checks = []
    for (x, m), padded in samples:
        got = session.run(None, {"images": x, "mask": m})
        with torch.no_grad():
            want = net(torch.from_numpy(x), torch.from_numpy(m))
        diffs = {k: float(np.abs(g - w.numpy()).max()) for k, g, w in zip(net.output_names, got, want)}
        checks.append({"size": tuple(x.shape[2:]), "padded": padded, "max_abs_diff": diffs,
                       "max_diff": max(diffs.values())})
    worst = {k: max(c["max_abs_diff"][k] for c in checks) for k in net.output_names}
    result = {"path": out_path, "trace_size": trace_size, "outputs": net.output_names, "checks": checks,
              "max_abs_diff": worst, "max_diff": max(worst.values()), "backend": EXPORT_BACKEND, "opset": opset,
              "seconds": time.perf_counter() - start}
    if result["max_diff"] > tolerance:
        sizes = "; ".join(f"{c['size'][0]}x{c['size'][1]}: {c['max_abs_diff']}" for c in checks)
        raise ExportError(f"{out_path}: onnxruntime differs from PyTorch by {result['max_diff']:.3g} (> {tolerance:g}) "
                          f"on the sample image ({sizes})")
    return result

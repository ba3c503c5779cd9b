"""The authors' released checkpoints <-> our state dict.

Our module names equal the release's, so the mapping is near-identity. The differences:

- ``vector_embed.{k}.*`` (k = 0..L-1, six references to one tensor in the release) <-> our single
  ``vector_embed.*`` MLP;
- ``transformer.decoder.bbox_embed.{k}.*`` (and ``transformer.decoder.class_embed.{k}.*`` with two-stage)
  duplicate ``bbox_embed.{k}.*`` / ``class_embed.{k}.*``: dropped on load, re-created on export;
- FrozenBN ``num_batches_tracked`` and thop's ``*total_ops`` / ``*total_params`` are dropped.

Files are read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed, since the release
stores its ``args`` in every checkpoint); anything needing arbitrary unpickling is refused.
"""
from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from solq.config import Config, validate

from . import build_detector

__all__ = ["load_official_checkpoint", "to_official_state_dict", "OfficialCheckpointError"]

# Top-level order of the release's SOLQ.state_dict() (used only to order the export).
_RELEASE_ORDER = ("transformer", "class_embed", "bbox_embed", "vector_embed", "query_embed", "input_proj", "backbone")
_BACKBONES = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}


class OfficialCheckpointError(ValueError):
    """The file or dict is not a loadable SOLQ / Deformable DETR release checkpoint; says why."""


def _read(path_or_state_dict: Any) -> tuple[dict, dict, str]:
    """Returns (raw state dict, release args as a dict or {}, a name for messages)."""
    if isinstance(path_or_state_dict, (str, Path)):
        name = str(path_or_state_dict)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(name, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            first = f"it references {found.group(1)}" if found else type(e).__name__
            raise OfficialCheckpointError(
                f"{name}: refusing to load: the file needs arbitrary Python objects to unpickle, which could "
                f"run code ({first}). Only tensors, containers and argparse.Namespace are accepted "
                f"(torch.load(weights_only=True)). If you trust the file, re-save its weights with "
                f"torch.save(torch.load(path, weights_only=False)['model'], new_path).") from None
    else:
        name, obj = "<state dict>", path_or_state_dict
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(f"{name}: expected a dict, got {type(obj).__name__}")
    args = obj.get("args", None)
    args = vars(args) if isinstance(args, argparse.Namespace) else (dict(args) if isinstance(args, Mapping) else {})
    sd = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "transformer.level_embed" not in sd:
        raise OfficialCheckpointError(f"{name}: not a SOLQ / Deformable DETR checkpoint "
                                      f"(no 'transformer.level_embed' among {len(sd)} tensors)")
    return sd, args, name


def _count(sd: Mapping, pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` (a regex with one group) over the keys, or 0."""
    idx = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _infer_model(sd: Mapping, args: dict, name: str, nheads: int | None) -> tuple[dict, dict]:
    """Model fields from tensor shapes (and the release args for what shapes cannot tell).
    Returns (fields, assumed) where ``assumed`` lists fields that were not determined by the shapes."""
    levels, d = sd["transformer.level_embed"].shape
    f: dict[str, Any] = {"hidden_dim": int(d), "num_feature_levels": int(levels)}
    f["enc_layers"] = _count(sd, r"transformer\.encoder\.layers\.(\d+)\.")
    f["dec_layers"] = _count(sd, r"transformer\.decoder\.layers\.(\d+)\.")
    f["dim_feedforward"] = int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0])
    f["two_stage"] = "transformer.enc_output.weight" in sd
    f["with_box_refine"] = any(k.startswith("transformer.decoder.bbox_embed.") for k in sd)
    f["num_classes"] = int(sd["class_embed.0.weight"].shape[0])
    assumed: dict[str, Any] = {}
    if "query_embed.weight" in sd:
        f["num_queries"] = int(sd["query_embed.weight"].shape[0])
    else:  # two-stage: the number of proposals is not stored in any tensor
        f["num_queries"] = int(args.get("num_queries", 300))
        assumed["num_queries"] = f["num_queries"]
    # heads x points cannot be split from the shapes: take nheads from the caller, the args, or 8
    m = nheads or int(args.get("nheads", 8))
    if nheads is None and "nheads" not in args:
        assumed["nheads"] = m
    f["nheads"] = m
    for which, key in (("enc", "transformer.encoder.layers.0.self_attn.attention_weights.weight"),
                       ("dec", "transformer.decoder.layers.0.cross_attn.attention_weights.weight")):
        rows = int(sd[key].shape[0])
        if rows % (m * levels):
            raise OfficialCheckpointError(f"{name}: {key} has {rows} rows, not a multiple of nheads ({m}) x "
                                          f"levels ({levels}); pass the right nheads")
        f[f"{which}_n_points"] = rows // (m * levels)
    if "vector_embed.0.layers.0.weight" in sd:
        n_layers = _count(sd, r"vector_embed\.0\.layers\.(\d+)\.")
        if n_layers != 3:
            raise OfficialCheckpointError(f"{name}: vector_embed.0 has {n_layers} layers, expected 3")
        f["mode"] = "uqr"
        f["vector_hidden_dim"] = int(sd["vector_embed.0.layers.0.weight"].shape[0])
        f["vector_dim"] = int(sd["vector_embed.0.layers.2.weight"].shape[0])
    else:
        f["mode"] = "det"
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in sd
    blocks = _count(sd, r"backbone\.0\.body\.layer3\.(\d+)\.")
    if (bottleneck, blocks) not in _BACKBONES:
        raise OfficialCheckpointError(f"{name}: unsupported backbone (layer3 has {blocks} "
                                      f"{'bottleneck' if bottleneck else 'basic'} blocks); only ResNet-18/34/50/101")
    f["backbone"] = _BACKBONES[(bottleneck, blocks)]
    for key in ("dilation", "activation", "dropout"):
        if key in args:
            f[key] = args[key]
        else:
            assumed[key] = {"dilation": False, "activation": "relu", "dropout": 0.1}[key]
    return f, assumed


def _map_keys(sd: Mapping) -> tuple[dict, list[str], list[str]]:
    """Release keys -> ours. Returns (mapped, dropped keys, warnings about differing duplicates)."""
    out, dropped, problems = {}, [], []
    for k, v in sd.items():
        if k.endswith(("total_ops", "total_params", "num_batches_tracked")):
            dropped.append(k)
            continue
        m = re.match(r"vector_embed\.(\d+)\.(.*)", k)
        if m:
            ref = sd.get(f"vector_embed.0.{m.group(2)}")
            if m.group(1) == "0":
                out[f"vector_embed.{m.group(2)}"] = v
            else:
                dropped.append(k)
                if ref is None or ref.shape != v.shape or not torch.equal(ref, v):
                    problems.append(f"{k} differs from vector_embed.0 (the shared vector head); using .0")
            continue
        m = re.match(r"transformer\.decoder\.((?:bbox|class)_embed\..*)", k)
        if m:
            dropped.append(k)
            ref = sd.get(m.group(1))
            if ref is None or ref.shape != v.shape or not torch.equal(ref, v):
                problems.append(f"{k} is not identical to {m.group(1)}; using {m.group(1)}")
            continue
        out[k] = v
    return out, dropped, problems


def load_official_checkpoint(path_or_state_dict, *, nheads: int | None = None, return_report: bool = False):
    """Read a release checkpoint (a path, a checkpoint dict with weights under 'model', or a state dict).

    Infers width, levels, layers, FFN width, queries, points, classes, n_k, vector hidden width, backbone
    depth, box refinement and two-stage from the keys and shapes; nheads (and activation, dilation,
    dropout) come from ``nheads=``, else the checkpoint's ``args``, else the release defaults.

    Returns (Config, state_dict) where the state dict loads strictly into ``build_detector(cfg)``; with
    ``return_report`` also a dict {"source", "inferred", "assumed", "dropped", "unused", "missing",
    "mismatched", "problems"}. Unused, missing or mismatched keys and differing duplicates are warned about.
    Raises OfficialCheckpointError for refused or unrecognised files.
    """
    sd, args, name = _read(path_or_state_dict)
    fields, assumed = _infer_model(sd, args, name, nheads)
    cfg = Config()
    vector_dim = fields.pop("vector_dim", None)
    for k, v in fields.items():
        setattr(cfg.model, k, v)
    if vector_dim is not None:
        cfg.codec.num_coeffs = vector_dim
        if "gt_mask_len" in args:
            cfg.codec.resolution = int(args["gt_mask_len"])
    validate(cfg)
    mapped, dropped, problems = _map_keys(sd)

    with torch.device("meta"):  # the expected key set and shapes, without allocating weights
        expected = build_detector(cfg, vector_dim=vector_dim).state_dict()
    unused = sorted(k for k in mapped if k not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    mismatched = sorted(f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in mapped if k in expected and mapped[k].shape != expected[k].shape)
    state = OrderedDict((k, mapped[k]) for k in expected if k in mapped)
    msgs = problems + ([f"{len(unused)} unused key(s): {unused[:8]}{' ...' if len(unused) > 8 else ''}"]
                       if unused else []) + ([f"{len(missing)} missing key(s): {missing[:8]}"] if missing else []) \
        + ([f"shape mismatches: {mismatched[:8]}"] if mismatched else [])
    for msg in msgs:
        warnings.warn(f"{name}: {msg}", stacklevel=2)
    if not return_report:
        return cfg, state
    report = {"source": name, "inferred": {**fields, "vector_dim": vector_dim}, "assumed": assumed,
              "dropped": dropped, "unused": unused, "missing": missing, "mismatched": mismatched,
              "problems": problems}
    return cfg, state, report


def to_official_state_dict(model) -> "OrderedDict[str, torch.Tensor]":
    """Our SOLQ detector's state dict in the release layout (the inverse of the key mapping above).

    Adds one ``vector_embed.{k}`` copy per prediction layer (same tensor), the ``transformer.decoder.
    bbox_embed`` duplicates (box refinement) and ``transformer.decoder.class_embed`` ones (two-stage);
    ordered by top-level module as the release. For the default release config: 633 keys.
    A model with ``vector_standardize`` has its code statistics folded into the vector head's last layer
    (weight * std, mean + std * bias), which gives the release's raw head the same outputs.
    """
    sd = model.state_dict()
    if getattr(model, "vector_standardize", False):
        sd = OrderedDict(sd)
        mean, std = sd.pop("vector_mean"), sd.pop("vector_std")
        last = f"vector_embed.layers.{len(model.vector_embed.layers) - 1}"
        sd[f"{last}.weight"] = std[:, None] * sd[f"{last}.weight"]
        sd[f"{last}.bias"] = torch.addcmul(mean, std, sd[f"{last}.bias"])
    num_pred = len(model.class_embed)
    items: list[tuple[str, torch.Tensor]] = []
    for k, v in sd.items():
        if k.startswith("vector_embed."):
            rest = k[len("vector_embed."):]
            items += [(f"vector_embed.{j}.{rest}", v) for j in range(num_pred)]
        else:
            items.append((k, v))
    dups = []
    if model.with_box_refine:
        dups += [(f"transformer.decoder.{k}", v) for k, v in sd.items() if k.startswith("bbox_embed.")]
    if model.two_stage:
        dups += [(f"transformer.decoder.{k}", v) for k, v in sd.items() if k.startswith("class_embed.")]
    items += dups

    def rank(item):
        top = item[0].split(".", 1)[0]
        return _RELEASE_ORDER.index(top) if top in _RELEASE_ORDER else len(_RELEASE_ORDER)

    return OrderedDict(sorted(items, key=rank))  # sorted() is stable: order within a module is kept

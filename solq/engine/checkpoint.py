"""Checkpoints: atomic writes, ``weights_only`` loading, RNG capture, resume discovery, release files.

A checkpoint is a dict of tensors and plain containers so that ``torch.load(weights_only=True)`` reads it:
``model``, ``optimizer``, ``lr_scheduler``, ``scaler`` (state dicts), ``epoch`` (the epoch in progress),
``batch_in_epoch`` (micro-batches of that epoch already consumed), ``step`` (optimiser steps so far),
``config`` (``Config.to_dict()``), ``rng`` (one RNG state per rank), ``world_size``, ``categories``
({id: name}), ``code_version`` and ``format``.

Files in a run folder: ``checkpoint.pth`` (always the newest) and ``checkpoint_epoch{NNNN}.pth`` (every
``train.save_every``-th epoch, kept).
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from solq.config import Config, DataConfig, RuntimeConfig, apply_overrides, load_config, validate
from solq.engine.runtime import compile_model
from solq.files import write_atomic
from solq.models import build_model, pretrained
from solq.models.official import OfficialCheckpointError, load_official_checkpoint

__all__ = [
    "CheckpointError", "FORMAT", "LAST_NAME", "save_checkpoint", "load_checkpoint", "is_valid_checkpoint",
    "epoch_checkpoint_name", "list_checkpoints", "find_resume_checkpoint", "capture_rng_state",
    "restore_rng_state", "is_release_checkpoint", "load_model_weights", "config_for_checkpoint",
    "build_from_checkpoint", "save_weights_only", "stored_config",
]

FORMAT = "solq-checkpoint-v1"
LAST_NAME = "checkpoint.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a solq checkpoint; the message names the file."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`solq.files.write_atomic`: a temporary file in the same
    folder, flush + fsync, then ``os.replace``). A kill at any moment leaves either the old file or the new
    one, never a partial file.

    Returns the path written. Raises :class:`solq.files.OutputWriteError` naming the path and the cause
    (no space, read-only folder, permission); the previous checkpoint at ``path`` is then intact.
    """
    return write_atomic(path, lambda f: torch.save(state, f), what="checkpoint")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Returns the dict; raises CheckpointError naming the file when it is missing, truncated or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path}: not a checkpoint dict with a 'model' entry")
    return obj


def is_valid_checkpoint(path: str | Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False


def epoch_checkpoint_name(epoch: int) -> str:
    """File name of the kept checkpoint written after ``epoch`` (1-based count of finished epochs)."""
    return f"checkpoint_epoch{epoch:04d}.pth"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The ``*.pth`` checkpoint files of a run folder, newest first (modification time, then name)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = [p for p in d.glob("checkpoint*.pth") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_resume_checkpoint(directory: str | Path) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint of ``directory`` that loads, as (path, state); None when there is none.

    Unreadable (e.g. truncated) files are skipped with a warning naming them.
    """
    for path in list_checkpoints(directory):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping invalid checkpoint: {e}", RuntimeWarning, stacklevel=2)
            continue
        if state.get("format") != FORMAT:
            warnings.warn(f"skipping {path}: not a solq training checkpoint", RuntimeWarning, stacklevel=2)
            continue
        return path, state
    return None


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain values (``weights_only`` friendly):
    {"torch": uint8 tensor, "cuda": [uint8 tensor per GPU] (when CUDA is initialised), "numpy": {...},
    "python": {...}}."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


# -------------------------------------------------------------------------------- release checkpoints
_RELEASE_MARKERS = ("transformer.level_embed", "query_embed.weight", "class_embed.0.weight")


def is_release_checkpoint(state: dict) -> bool:
    """True for the authors' checkpoints: no 'config' entry and release key names under 'model'."""
    model = state.get("model") if isinstance(state, dict) else None
    return ("config" not in state and isinstance(model, dict)
            and any(k in model for k in _RELEASE_MARKERS))


def load_model_weights(path: str | Path, map_location: Any = "cpu") -> tuple[Optional[dict], dict, dict]:
    """Weights of a solq checkpoint or of an authors' release checkpoint.

    Returns (config dict or None, model state_dict, the whole checkpoint for solq files / {} for release
    files). For a release file the config comes from ``solq.models.official.load_official_checkpoint``
    (inferred from the tensor shapes) as a dict.
    """
    path = pretrained.resolve(path)  # a shipped name, e.g. "smoke-uqr", becomes its file
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (nor one of the shipped names "
                              f"{sorted(pretrained.SHIPPED)})")
    try:
        state, first_error = load_checkpoint(path, map_location), None
    except CheckpointError as e:  # maybe a release file with pickled extras (argparse args): the mapper decides
        state, first_error = None, e
    if state is not None and "config" in state:
        return state["config"], state["model"], state
    try:
        cfg, weights = load_official_checkpoint(str(path))
    except (OfficialCheckpointError, OSError) as e:
        raise CheckpointError(f"{first_error or path}; not a release checkpoint either: {e}") from e
    return cfg.to_dict(), weights, {}


def save_weights_only(checkpoint: str | Path, destination: str | Path, *, extra: Optional[dict] = None,
                      clean_data_paths: bool = True) -> Path:
    """A slim copy of a solq training checkpoint, for shipping: ``model`` (state dict), ``config``,
    ``categories``, ``step``, ``code_version``, ``format`` and ``extra`` (e.g. measured metrics), no optimiser,
    scheduler or RNG states. ``clean_data_paths`` puts the data section's paths back to the defaults, so the
    file does not name folders of the machine that trained it. Written atomically; returns ``destination``."""
    state = load_checkpoint(checkpoint)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{checkpoint}: not a solq training checkpoint (no config/model)")
    config = dict(state["config"])
    if clean_data_paths:
        default = DataConfig()
        config["data"] = {**config["data"], **{k: getattr(default, k) for k in
                                               ("root", "train_images", "train_annotations", "val_images",
                                                "val_annotations")}}
        config["runtime"] = {**config["runtime"], "output_dir": RuntimeConfig().output_dir, "resume": ""}
    slim = {"model": state["model"], "config": config, "categories": state.get("categories", {}),
            "step": state.get("step", 0), "code_version": state.get("code_version", ""),
            "format": state.get("format", FORMAT), "extra": dict(extra or {})}
    save_checkpoint(slim, destination)
    return Path(destination)


# model keys added after checkpoints were written with the behaviour they had before: {key: that behaviour}.
# A stored config without the key gets this value, not the new default, so an old model runs as it was trained.
_LEGACY_MODEL_DEFAULTS = {
    # solq fed the SQR mask head the encoder output until it matched the release (srcs[-1], "input_proj");
    # the shipped smoke-sqr model was trained that way
    "sqr_mask_features": "encoder",
}


def stored_config(saved: dict) -> Config:
    """A checkpoint's stored config dict as a Config, with :data:`_LEGACY_MODEL_DEFAULTS` filled in for model keys
    it lacks (the behaviour it was trained with), the rest from the current defaults."""
    model = dict(saved.get("model") or {})
    for key, value in _LEGACY_MODEL_DEFAULTS.items():
        model.setdefault(key, value)
    return Config.from_dict({**saved, "model": model})


def config_for_checkpoint(saved: Optional[dict], config: Optional[str] = None, overrides=()):
    """The Config to run a checkpoint with.

    Without ``config`` it is the checkpoint's own config; with ``config`` (preset or YAML) that one, except
    for the ``model`` and ``codec`` sections, which must match the weights and come from the checkpoint.
    Model keys the stored config predates take the behaviour it was trained with (:func:`stored_config`).
    ``runtime.compile`` is not inherited from the checkpoint (compiling takes minutes at the first call: the
    loading process opts in). ``overrides`` ("a.b=c") are applied last. Returns a validated Config.
    """
    stored = stored_config(saved) if saved else None
    if config:
        cfg = load_config(config)
        if stored is not None:
            cfg.model, cfg.codec = stored.model, stored.codec
    else:
        cfg = stored if stored is not None else load_config("paper-r50")
        cfg.runtime.compile = RuntimeConfig.compile
    return validate(apply_overrides(cfg, overrides))


def build_from_checkpoint(path: str | Path, *, config: Optional[str] = None, overrides=(),
                          device: Any = "cpu"):
    """Model, criterion and post-processor with the weights of a solq or release checkpoint, in eval mode.

    Returns (cfg, model, criterion, postprocessor, categories) where categories is {id: name} as stored
    in a solq checkpoint ({} for release files).
    """
    saved, weights, state = load_model_weights(path)
    cfg = config_for_checkpoint(saved, config, overrides)
    model, criterion, postprocessor = build_model(cfg, initial_weights=False)  # the checkpoint has every weight
    model.load_state_dict(weights)
    compile_model(model.to(device).eval(), cfg)
    criterion.to(device)
    return cfg, model, criterion, postprocessor, dict(state.get("categories", {}))

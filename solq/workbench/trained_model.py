"""A trained model that a notebook reads instead of training: which model it is, and the metrics recorded with it.

The notebooks that read a model (Tables 4 and 5, and ``uqr_vs_sqr`` opened on the shipped teaching models) say
which model they read with :func:`model_facts` (printed and written into their metrics.json), take the metrics
recorded with it from :func:`stored_metrics` (no evaluation), and :func:`read_trained_run` gives the training
notebooks a :class:`~solq.workbench.experiment.TrainingRun` of such a model, so the rest of the notebook runs
as after a training.

A model reference is what every ``checkpoint`` parameter takes: a run folder, an experiment point folder, a
checkpoint file (solq or the authors' release) or a shipped name (``smoke-uqr``, ``smoke-sqr``; see
``solq.models.pretrained``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from solq.engine.checkpoint import config_for_checkpoint, load_model_weights
from solq.models import pretrained
from solq.viz.predictor import resolve_checkpoint
from solq.workbench.experiment import TrainingRun, evaluate_checkpoint, read_run_metrics

__all__ = ["model_facts", "stored_metrics", "read_trained_run"]


def _state(checkpoint: str | Path) -> tuple[Optional[dict], dict]:
    """(config dict or None, the checkpoint's stored dict minus the weights) of a model reference."""
    saved, _, state = load_model_weights(resolve_checkpoint(checkpoint))
    return saved, {k: v for k, v in state.items() if k not in ("model", "optimizer", "lr_scheduler")}


def model_facts(checkpoint: str | Path) -> dict:
    """What the model of ``checkpoint`` (a model reference, see the module doc) is, as flat metrics:

    ``model/checkpoint`` (the resolved file), ``model/shipped`` (the shipped name, or ""), ``model/mode``
    (det, sqr, uqr), ``model/backbone``, ``model/feature_levels``, ``model/hidden_dim``, ``model/steps``
    (optimiser steps it was trained for; -1 when not recorded, e.g. an authors' release file) and
    ``model/batch_per_process`` (images per process and step, from its training config; an 8-GPU run's total
    batch is 8 times that) and ``model/train_seed``. Raises FileNotFoundError for a reference that names no model.
    """
    path = resolve_checkpoint(checkpoint)
    saved, state = _state(path)
    cfg = config_for_checkpoint(saved)
    extra = state.get("extra") or {}
    shipped = next((n for n in pretrained.SHIPPED if pretrained.resolve(n) == path), "")
    steps = state.get("step", extra.get("steps"))
    return {"model/checkpoint": str(path), "model/shipped": shipped, "model/mode": cfg.model.mode,
            "model/backbone": cfg.model.backbone, "model/feature_levels": cfg.model.num_feature_levels,
            "model/hidden_dim": cfg.model.hidden_dim, "model/steps": int(steps) if steps is not None else -1,
            "model/batch_per_process": int(extra.get("batch_size", cfg.train.batch_size)),
            "model/train_seed": int(extra.get("seed", cfg.train.seed))}


def stored_metrics(checkpoint: str | Path) -> tuple[Optional[dict], str]:
    """The metrics recorded with a trained model, without evaluating it.

    ``checkpoint``: a model reference (module doc). Looks, in order, at the folder's metrics.json (an experiment
    point's flat file or a training run's nested one), the metrics.json beside a checkpoint file (its run
    folder's), and the ``extra["metrics"]`` stored in a slim file (the shipped models). Returns (flat metrics as
    :func:`solq.workbench.experiment.read_run_metrics`, a sentence saying where they come from), or
    (None, why not) when nothing is recorded or the reference names no model.
    """
    ref = pretrained.resolve(checkpoint)
    if ref.is_dir():
        found = read_run_metrics(ref)
        if found is not None:
            return found, f"recorded in {ref / 'metrics.json'}"
    try:
        path = resolve_checkpoint(ref)
    except FileNotFoundError as e:
        return None, f"no model: {e}"
    found = read_run_metrics(path.parent) if path.name.endswith(".pth") else None
    if found is not None:
        return found, f"recorded in {path.parent / 'metrics.json'} (the run of {path.name})"
    extra = _state(path)[1].get("extra") or {}
    if extra.get("metrics"):
        where = extra.get("scored_on", "its validation set")
        return {k: float(v) for k, v in extra["metrics"].items()}, f"stored in {path.name}: scored on {where}"
    return None, f"{path}: no metrics recorded with it"


def read_trained_run(checkpoint: str | Path, *, overrides: Sequence[str] = (), progress_bar: bool = True
                     ) -> TrainingRun:
    """A :class:`~solq.workbench.experiment.TrainingRun` of a model read instead of trained.

    ``metrics``: :func:`stored_metrics` when recorded, else box and mask AP measured now on the validation set of
    its config with ``overrides`` (data paths, ``runtime.device``); plus ``train/steps`` (-1 when unknown) and
    ``train/seconds`` = 0 (nothing trained here). ``config``: its config with ``overrides``; ``run_dir``: the folder
    holding the checkpoint file (for a shipped model the package's weights folder: no training log);
    ``checkpoint``: the file; ``seconds``: 0.
    """
    path = resolve_checkpoint(checkpoint)
    metrics, _ = stored_metrics(checkpoint)
    saved, state = _state(path)
    cfg = config_for_checkpoint(saved, None, overrides)
    if metrics is None:
        metrics, cfg = evaluate_checkpoint(path, overrides=overrides, boundary=False, progress_bar=progress_bar)
    steps = state.get("step", (state.get("extra") or {}).get("steps"))
    metrics = {**metrics, "train/steps": int(steps) if steps is not None else -1, "train/seconds": 0.0}
    return TrainingRun(metrics, cfg, path.parent, path, 0.0)

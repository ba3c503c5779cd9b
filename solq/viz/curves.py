"""Training curves from a run's JSON-lines log, and precision-recall curves from a COCO evaluation.

The engine's ``log.jsonl`` holds one record per line with a ``type``: ``train`` (every
``train.log_every`` steps: ``step``, ``epoch``, ``loss``, each weighted loss term ``loss_*`` with ``_i``
for auxiliary decoder layer i, ``lr`` per parameter group, ``grad_norm``), ``epoch`` (epoch means),
``eval`` (``bbox``/``segm`` dicts of AP, AP50, ..., ``loss`` dict of val losses), ``start``, ``end``.
Precision arrays come from ``evaluate_coco(..., return_evaluators=True)``: ``evaluator.eval["precision"]``
[T,R,K,A,M] = IoU thresholds x 101 recall points x categories x areas (all, small, medium, large) x
max detections (1, 10, 100), -1 where undefined.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["read_log", "loss_terms", "plot_training_curves", "plot_ap_curves", "precision_recall", "plot_precision_recall",
           "AREAS"]

AREAS = ("all", "small", "medium", "large")
_AUX = re.compile(r"^(loss_\w+?)_(\d+|enc)$")


def read_log(path: str | Path) -> dict[str, list[dict]]:
    """Records of a run's log by type: {"train": [...], "epoch": [...], "eval": [...], ...}.

    ``path`` is ``log.jsonl`` or the run folder holding it. Raises FileNotFoundError / ValueError naming
    the file and line of a bad record.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "log.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"training log {p} does not exist")
    out: dict[str, list[dict]] = {}
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {n}: not a JSON record ({e.msg})") from None
        out.setdefault(rec.get("type", "unknown"), []).append(rec)
    return out


def loss_terms(records: Sequence[Mapping]) -> tuple[list[str], list[str]]:
    """(final-layer terms, auxiliary terms) among the ``loss_*`` keys of the records, sorted."""
    keys = sorted({k for r in records for k, v in r.items() if k.startswith("loss_") and isinstance(v, (int, float))})
    aux = [k for k in keys if _AUX.match(k)]
    return [k for k in keys if k not in aux], aux


def _series(records: Sequence[Mapping], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and x in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def plot_training_curves(log: Any, *, show_aux: bool = True, metrics: Sequence[str] = ("AP", "AP50"),
                         axes: Optional[Sequence] = None):
    """Four panels: the total and each loss term over steps (auxiliary layers thin and faded), the
    learning rate of each parameter group, AP of each iou type over epochs, and the val losses.

    ``log``: a run folder, a ``log.jsonl`` path, or the dict of :func:`read_log`. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    recs = read_log(log) if not isinstance(log, Mapping) else log
    train, evals = recs.get("train", []), recs.get("eval", [])
    if axes is None:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    fig = axes[0].figure
    ax = axes[0]
    main, aux = loss_terms(train)
    cmap = plt.get_cmap("tab10")
    x, y = _series(train, "loss")
    ax.plot(x, y, color="black", lw=1.5, label="loss")
    for i, key in enumerate(main):
        ax.plot(*_series(train, key), color=cmap(i % 10), lw=1.0, label=key)
        if show_aux:
            for a in (k for k in aux if _AUX.match(k).group(1) == key):
                ax.plot(*_series(train, a), color=cmap(i % 10), lw=0.5, alpha=0.35)
    ax.set_xlabel("step")
    ax.set_title("training loss (weighted terms; faint: aux layers)", fontsize=8)
    if len(x) and np.all(y > 0):
        ax.set_yscale("log")
    ax.legend(fontsize=6)

    ax = axes[1]
    groups = sorted({g for r in train for g in (r.get("lr") or {}) if isinstance(r.get("lr"), Mapping)})
    for g in groups:
        pts = [(r["step"], r["lr"][g]) for r in train if isinstance(r.get("lr"), Mapping) and g in r["lr"]]
        ax.plot(*np.asarray(pts, dtype=np.float64).T, label=str(g))
    ax.set_xlabel("step")
    ax.set_title("learning rate", fontsize=8)
    if groups:
        ax.set_yscale("log")
        ax.legend(fontsize=6)

    ax = axes[2]
    for t in ("bbox", "segm", "boundary"):
        for j, m in enumerate(metrics):
            pts = [(r["epoch"], r[t][m]) for r in evals if isinstance(r.get(t), Mapping) and m in r[t]
                   and r[t][m] is not None and r[t][m] >= 0]
            if pts:
                ax.plot(*np.asarray(pts, dtype=np.float64).T, marker="o", ms=3, linestyle="-" if j == 0 else "--",
                        label=f"{t} {m}")
    ax.set_xlabel("epoch")
    ax.set_title("validation AP", fontsize=8)
    if ax.lines:
        ax.legend(fontsize=6)

    ax = axes[3]
    val = [{"epoch": r["epoch"], **r["loss"]} for r in evals if isinstance(r.get("loss"), Mapping)]
    vmain, _ = loss_terms(val)
    for i, key in enumerate(["loss", *vmain]):
        xs, ys = _series(val, key, "epoch")
        if len(xs):
            ax.plot(xs, ys, marker="o", ms=3, color="black" if key == "loss" else cmap((i - 1) % 10), label=key)
    ax.set_xlabel("epoch")
    ax.set_title("validation loss", fontsize=8)
    if ax.lines:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def precision_recall(evaluator: Any, *, iou: Optional[float] = 0.5, area: str = "all", max_dets: int = 100,
                     category: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """A precision-recall curve from a COCOeval (after ``accumulate``) or its precision array [T,R,K,A,M].

    Args:
        iou: the IoU threshold (one of 0.5, 0.55, ..., 0.95) or None for the mean over thresholds.
        area: "all", "small", "medium" or "large". max_dets: 1, 10 or 100.
        category: a category id (needs the evaluator, for its ``params.catIds``) or None for the mean over
            categories that have ground truth.
    Returns (recall [101], precision [101]); precision is NaN where undefined.
    """
    if hasattr(evaluator, "eval"):
        prec = np.asarray(evaluator.eval["precision"], dtype=np.float64)
        params = evaluator.params
        ious, cats, dets = list(params.iouThrs), list(params.catIds), list(params.maxDets)
        recall = np.asarray(params.recThrs, dtype=np.float64)
    else:
        prec = np.asarray(evaluator, dtype=np.float64)
        ious, cats, dets = list(np.linspace(0.5, 0.95, prec.shape[0])), None, [1, 10, 100]
        recall = np.linspace(0, 1, prec.shape[1])
    if area not in AREAS:
        raise ValueError(f"area must be one of {AREAS}, got {area!r}")
    if max_dets not in dets:
        raise ValueError(f"max_dets must be one of {dets}, got {max_dets}")
    p = prec[:, :, :, AREAS.index(area), dets.index(max_dets)]  # [T,R,K]
    if iou is not None:
        hits = np.flatnonzero(np.isclose(ious, iou))
        if not len(hits):
            raise ValueError(f"iou {iou} is not an evaluated threshold {np.round(ious, 2).tolist()}")
        p = p[hits[0]][None]
    if category is not None:
        if cats is None:
            raise ValueError("category needs the COCOeval object (for its category ids), not a bare array")
        if category not in cats:
            raise ValueError(f"category {category} is not among the evaluated ids {cats}")
        p = p[:, :, [cats.index(category)]]
    p = np.where(p < 0, np.nan, p)
    with np.errstate(invalid="ignore"):
        valid = ~np.isnan(p)
        curve = np.where(valid.any((0, 2)), np.nansum(p, axis=(0, 2)) / np.maximum(valid.sum((0, 2)), 1), np.nan)
    return recall, curve


def plot_precision_recall(evaluators: Mapping[str, Any], *, ious: Sequence[Optional[float]] = (0.5, 0.75, None),
                          area: str = "all", ax=None, label_prefix: str = ""):
    """Precision-recall curves of each iou type ({"bbox": COCOeval, "segm": ...}) at the given IoU
    thresholds (None: mean over 0.5:0.95; its area under the curve is the AP). Returns the Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    styles = {0: "-", 1: "--", 2: ":", 3: "-."}
    for i, (name, ev) in enumerate(evaluators.items()):
        for j, iou in enumerate(ious):
            r, p = precision_recall(ev, iou=iou, area=area)
            ap = float(np.nanmean(p)) if np.isfinite(p).any() else float("nan")
            tag = "0.5:0.95" if iou is None else f"{iou:g}"
            ax.plot(r, p, linestyle=styles[j % 4], color=plt.get_cmap("tab10")(i % 10),
                    label=f"{label_prefix}{name} IoU {tag} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall (area {area})", fontsize=8)
    ax.legend(fontsize=6)
    return ax.figure


def plot_ap_curves(runs: Mapping[str, Any], *, metrics: Sequence[str] = ("bbox/AP", "segm/AP"),
                   title: str = ""):
    """AP against optimiser steps (left) and against training wall time (right) for several runs.

    ``runs``: {label: run folder or log.jsonl}; each run's ``eval`` records give the points (``elapsed_s``, the
    seconds since training started, is logged by ``solq train``; runs without it get no right-hand curve).
    ``metrics``: "bbox/AP", "segm/AP", "bbox/AP50", ... (shown in %). Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    styles = ["-", "--", ":", "-."]
    for r, (label, log) in enumerate(runs.items()):
        evals = read_log(log).get("eval", [])
        for m, metric in enumerate(metrics):
            group, name = metric.split("/", 1)
            pts = [(e["step"], e.get("elapsed_s"), 100 * e[group][name]) for e in evals if name in e.get(group, {})]
            if not pts:
                continue
            steps, secs, ap = zip(*pts)
            kw = dict(color=f"C{r}", linestyle=styles[m % len(styles)], marker="o", markersize=3,
                      label=f"{label}: {metric}")
            axes[0].plot(steps, ap, **kw)
            if all(s is not None for s in secs):
                axes[1].plot(np.asarray(secs) / 60, ap, **kw)
    axes[0].set_xlabel("optimiser steps")
    axes[1].set_xlabel("training wall time (min)")
    for ax in axes:
        ax.set_ylabel("AP (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside, not on, the curves
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

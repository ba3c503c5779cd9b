"""What the training notebooks compute: a Config from notebook parameters, a training run with its
evaluation, the flat metrics the report reads, and the galleries the notebooks show.

A training notebook (quickstart, ablation, uqr_vs_sqr) does::

    P = validate_parameters({...}, {**training_schema(), "mode": (...), ...})
    cfg = config_or_error(P, run_dir=out / "run")
    run = train_and_evaluate(cfg, nproc_per_node=P["nproc_per_node"])
    write_metrics(out, {**run.metrics, ...}, config=run.config)

Metric keys (fractions in [0, 1]): ``segm/AP``, ``segm/AP50``, ..., ``bbox/APs``, ... as
``solq.evaluation.evaluate_coco`` names them, ``boundary/...`` when Boundary AP was computed,
``loss/<term>`` (validation losses), ``eval/num_images``, ``eval/seconds``, ``train/steps``,
``train/epochs``, ``train/seconds``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from solq.coding import build_codec_from_config
from solq.coding.study import load_coco, reconstruction_study
from solq.config import PRESETS, Config, ConfigError, load_config
from solq.engine.builders import data_overrides, dataset_paths
from solq.engine.checkpoint import config_for_checkpoint, load_model_weights
from solq.engine.evaluate import run_evaluation
from solq.engine.train import fit
from solq.viz.gallery import prediction_gallery  # re-exported: the notebooks' gallery of a run
from solq.viz.predictor import resolve_checkpoint
from solq.workbench.notebook import Param, flatten_metrics, resolve_path

__all__ = ["FACTOR_KEYS", "TRAIN_KEYS", "training_schema", "config_or_error", "data_overrides",
           "parameter_overrides", "config_from_parameters", "TrainingRun", "train_and_evaluate", "flat_metrics",
           "read_run_metrics", "evaluate_checkpoint", "codec_upper_bound", "prediction_gallery", "torchrun_command"]

# notebook parameter -> config key (the factor under study and the training budget)
FACTOR_KEYS = {
    "mode": "model.mode",
    "backbone": "model.backbone",
    "codec": "codec.name",
    "pca_jitter": "codec.jitter",
    "mask_resolution": "codec.resolution",
    "num_coeffs": "codec.num_coeffs",
    "vector_loss_coef": "loss.vector_loss_coef",
    "vector_loss_stages": "loss.vector_loss_stages",
}
TRAIN_KEYS = {
    "epochs": "train.epochs",
    "lr_drop": "train.lr_drop",
    "batch_size": "train.batch_size",
    "max_steps": "train.max_steps",
    "eval_every": "train.eval_every",
    "seed": "train.seed",
    "device": "runtime.device",
}
_METRIC_GROUPS = ("bbox", "segm", "boundary", "loss")


def training_schema() -> dict:
    """The ``validate_parameters`` schema of the parameters every training notebook shares (scale, seed,
    preset, data, device, budget, processes, extra overrides, output folder)."""
    return {
        "scale": ("smoke", "paper"),
        "seed": Param(int, min=0),
        "preset": Param(str, nonempty=True, help=f"a preset {sorted(PRESETS)} or a config YAML file"),
        "backbone": Param(str, choices=("", "small", "resnet18", "resnet34", "resnet50", "resnet101", "swin_t",
                                        "swin_s", "swin_b", "swin_l"),
                          help="empty keeps the preset's"),
        "dataset": ("synthetic", "coco"),
        "data_root": Param(str, nonempty=True),
        "coco_root": Param(str),
        "device": Param(str, nonempty=True, help="cpu, cuda, cuda:N or auto"),
        "epochs": Param(int, min=1),
        "lr_drop": Param(int, min=1),
        "batch_size": Param(int, min=1, help="images per process"),
        "max_steps": Param(int, min=0, help="0: no limit"),
        "eval_every": Param(int, min=0, help="epochs between evaluations; 0: at the end only"),
        "nproc_per_node": Param(int, min=1, help="processes (GPUs) of a torchrun launch on this node"),
        "overrides": Param(list, items=str, help='config overrides such as "model.num_queries=100"'),
        "output_dir": Param(str, nonempty=True),
    }


def config_or_error(params: Mapping[str, Any], *, run_dir: str | Path, extra: Sequence[str] = ()) -> Config:
    """:func:`config_from_parameters`, with a config error turned into a ValueError that says it comes
    from the notebook parameters (for the validation cell)."""
    try:
        return config_from_parameters(params, run_dir=run_dir, extra=extra)
    except ConfigError as e:
        raise ValueError(f"invalid notebook parameters: the config they make is invalid: {e}") from None


def parameter_overrides(params: Mapping[str, Any]) -> list[str]:
    """``"a.b=value"`` overrides for the notebook parameters that map to config keys (``FACTOR_KEYS``,
    ``TRAIN_KEYS``); empty strings (e.g. ``backbone=""``: the preset's) are skipped."""
    out = []
    for name, key in {**FACTOR_KEYS, **TRAIN_KEYS}.items():
        value = params.get(name)
        if value is None or value == "":
            continue
        out.append(f"{key}={value}")
    return out


def config_from_parameters(params: Mapping[str, Any], *, run_dir: str | Path, extra: Sequence[str] = ()) -> Config:
    """The Config of a notebook's training run.

    ``params``: ``preset`` (name or YAML path), ``dataset`` with ``data_root`` / ``coco_root`` (relative
    paths start at the project root, see ``solq.workbench.notebook.resolve_path``), any of ``FACTOR_KEYS`` / ``TRAIN_KEYS``, and ``overrides``
    (list of "a.b=c", applied last, after ``extra``). The run folder becomes ``runtime.output_dir`` with
    ``runtime.resume=auto``. Raises ConfigError naming the key at fault.
    """
    if "preset" not in params:
        raise ConfigError("notebook parameters: 'preset' is missing (e.g. smoke, paper-r50)")
    preset = params["preset"] if params["preset"] in PRESETS else str(resolve_path(params["preset"]))
    roots = [str(resolve_path(params[k])) if params.get(k) else "" for k in ("data_root", "coco_root")]
    data = data_overrides(params.get("dataset", "synthetic"), *roots)
    overrides = [*data, *parameter_overrides(params), *extra, *params.get("overrides", []),
                 f"runtime.output_dir={run_dir}", "runtime.resume=auto"]
    return load_config(preset, overrides)


@dataclass
class TrainingRun:
    """A finished training: flat ``metrics`` (see the module doc), the resolved ``config`` (num_classes
    and fitted codec files filled in), the ``run_dir`` and its ``checkpoint``, and wall ``seconds``."""

    metrics: dict
    config: Config
    run_dir: Path
    checkpoint: Path
    seconds: float


def flat_metrics(engine_metrics: Mapping[str, Any]) -> dict:
    """The engine's evaluation dict -> flat keys: ``bbox/AP`` ... ``segm/...``, ``boundary/...``,
    ``loss/...`` (fractions and loss values), ``eval/num_images``, ``eval/seconds``."""
    out = flatten_metrics({k: v for k, v in engine_metrics.items() if k in _METRIC_GROUPS})
    if "num_images" in engine_metrics:
        out["eval/num_images"] = int(engine_metrics["num_images"])
    for key in ("eval_seconds", "time"):  # the evaluation's wall time (older runs: "time")
        if key in engine_metrics:
            out["eval/seconds"] = float(engine_metrics[key])
            break
    return out


def _comparable(cfg: Config) -> dict:
    """Config fields that decide whether an existing run folder continues this run."""
    d = cfg.to_dict()
    d["runtime"] = {k: v for k, v in d["runtime"].items() if k not in ("resume", "output_dir", "num_threads", "device")}
    d["model"]["num_classes"] = 0  # filled from the data by the engine
    d["codec"]["file"] = ""  # a fitted pca/sparse codec is written into the run folder
    return d


def _prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Keep ``run_dir`` when it holds a run of the same config (``resume=auto`` continues or just
    re-evaluates it); otherwise remove it, so a stale checkpoint of other parameters is never resumed."""
    saved = run_dir / "config.yaml"
    if not run_dir.exists():
        return
    if saved.is_file():
        try:
            same = _comparable(load_config(str(saved))) == _comparable(cfg)
        except ConfigError:
            same = False
        if same:
            return
        print(f"{run_dir}: holds a run of other parameters; starting afresh")
    shutil.rmtree(run_dir)


def torchrun_command(config_file: str | Path, run_dir: str | Path, nproc_per_node: int) -> list[str]:
    """The command launching ``solq train`` on ``nproc_per_node`` local processes (one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc_per_node)}",
            "-m", "solq.cli", "train", "--config", str(config_file), "--output", str(run_dir), "--resume", "auto",
            "--no-progress"]


def _run_torchrun(cfg: Config, run_dir: Path, nproc_per_node: int) -> dict:
    """Launch torchrun, stream its output (also into ``run_dir/torchrun.log``); return the run's metrics.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    requested = run_dir / "requested_config.yaml"
    cfg.to_yaml(requested)
    cmd = torchrun_command(requested, run_dir, nproc_per_node)
    print("launching:", " ".join(cmd), flush=True)
    with open(run_dir / "torchrun.log", "a") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            print(line, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {proc.returncode}; see {run_dir / 'torchrun.log'}")
    result = run_dir / "metrics.json"
    if not result.is_file():
        raise RuntimeError(f"torchrun finished but wrote no {result}; see {run_dir / 'torchrun.log'}")
    return json.loads(result.read_text())


def train_and_evaluate(cfg: Config, *, nproc_per_node: int = 1, progress_bar: bool = True,
                       tensorboard: bool = False) -> TrainingRun:
    """Train ``cfg`` into ``cfg.runtime.output_dir`` and evaluate it on the validation set.

    One process: ``solq.engine.fit`` in this process. ``nproc_per_node`` > 1: ``torchrun`` on this node
    (e.g. 8 GPUs at the paper scale). An existing run folder of the same config is resumed (or only
    re-evaluated when finished); one of another config is replaced.
    Returns a :class:`TrainingRun`.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    run_dir = Path(cfg.runtime.output_dir)
    _prepare_run_dir(cfg, run_dir)
    start = time.perf_counter()
    if nproc_per_node == 1:
        result = fit(cfg, progress_bar=progress_bar, tensorboard=tensorboard)
        engine_metrics, epoch, step = result["metrics"], result["epoch"], result["step"]
    else:
        record = _run_torchrun(cfg, run_dir, nproc_per_node)
        engine_metrics, epoch, step = record, record.get("epoch"), record.get("step")
    seconds = time.perf_counter() - start
    resolved = load_config(str(run_dir / "config.yaml"))  # as the engine completed it (classes, codec file)
    metrics = {**flat_metrics(engine_metrics), "train/epochs": epoch, "train/steps": step, "train/seconds": seconds}
    return TrainingRun(metrics, resolved, run_dir, run_dir / "checkpoint.pth", seconds)


def read_run_metrics(path: str | Path) -> Optional[dict]:
    """The flat metrics of a finished run: ``path`` is a metrics.json file, an experiment point folder
    (its metrics.json) or a training run folder (the engine's metrics.json, flattened). None when absent."""
    p = Path(path)
    f = p if p.suffix == ".json" else p / "metrics.json"
    if not f.is_file():
        return None
    raw = json.loads(f.read_text())
    if any(isinstance(raw.get(g), dict) for g in _METRIC_GROUPS):  # the engine's nested file
        return flat_metrics(raw)
    return {k: v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_checkpoint(checkpoint: str | Path, *, overrides: Sequence[str] = (), boundary: bool = True,
                        results_dir: Optional[str | Path] = None, progress_bar: bool = True) -> tuple[dict, Config]:
    """Box, mask and (``boundary``) Boundary AP of a checkpoint (file or run folder) on the validation set
    of its config with ``overrides`` (data paths, ``data.max_images``, ``runtime.device``).

    Returns (flat metrics as :func:`flat_metrics`, the Config used).
    """
    path = resolve_checkpoint(checkpoint)
    extra = [*overrides, f"eval.boundary={'true' if boundary else 'false'}"]
    metrics = run_evaluation(path, overrides=extra, dump_dir=results_dir, progress_bar=progress_bar)
    saved, _, _ = load_model_weights(path)
    return flat_metrics(metrics), config_for_checkpoint(saved, None, extra)


def codec_upper_bound(cfg: Config, *, max_images: int = 0) -> dict:
    """What the run's mask coding alone allows on its validation ground truth: every GT mask replaced by
    paste(binarize(decode(encode(crop(mask))))) in its own box (``solq.coding.study``). Returns
    {"mask_iou", "mask_AP", ...} (fractions) for the codec of ``cfg`` (fitted pca/sparse loaded from
    ``cfg.codec.file``)."""
    _, ann = dataset_paths(cfg, "val")
    codec = build_codec_from_config(cfg.codec)
    metrics = reconstruction_study(codec, load_coco(ann), max_images=max_images, progress=False)
    return {k: v for k, v in metrics.items() if k.startswith("mask_")}

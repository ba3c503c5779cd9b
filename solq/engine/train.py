"""The training loop: ``train_one_epoch`` (one pass over a loader) and ``fit`` (a whole run from a Config).

Recipe (as in the authors' release): AdamW with per-group learning rates, StepLR per epoch, gradient clipping with the
total norm logged, optional gradient accumulation and mixed precision (bf16, or fp16 with a GradScaler).
A non-finite loss stops the run with :class:`NonFiniteLossError` before anything is written, so the last
checkpoint stays the last good one. See ``solq.engine.builders`` for why runs are reproducible and resumable.

Faults: SIGTERM or SIGUSR1 stops the run after the current optimiser step with a checkpoint of that step
(:mod:`solq.preemption`; every torchrun rank stops after the same step). The run folder is checked for
writability before anything is built, and a checkpoint or metrics write that fails (full disk, read-only
folder) stops every rank with :class:`solq.files.OutputWriteError` naming the file and the cause, leaving the
previous checkpoint as it was.

This module builds a run, trains it epoch by epoch and ends it; the run's state, saving it as a checkpoint and
resuming from one are :mod:`solq.engine.run_state` (``TrainState`` is defined there and importable from here).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import solq
from solq.config import Config
from solq.data import collate
from solq.engine import distributed as du
from solq.engine.builders import (SeededDataset, build_datasets, build_train_loader, build_val_loader, complete_config,
                                  fit_codec, vector_statistics)
from solq.engine.checkpoint import LAST_NAME
from solq.engine.evaluate import iou_types_for, weighted_total
from solq.engine.logger import MeanMeter, RunLogger, progress
from solq.engine.optim import build_optimizer, build_scheduler
from solq.engine.run_state import Run, TrainState, load_training_state, on_main_rank, resume_source
from solq.engine.runtime import autocast, compile_model, configure_runtime, seed_everything, to_float32
from solq.files import OutputWriteError, check_writable, write_text_atomic
from solq.models import build_model
from solq.preemption import StopRequest

__all__ = ["TrainState", "NonFiniteLossError", "train_one_epoch", "fit"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the optimiser step being computed, ``terms`` the
    (rank-averaged) weighted loss terms at that moment."""

    def __init__(self, message: str, step: int, terms: dict):
        super().__init__(message)
        self.step, self.terms = step, terms


def _total_norm(params: list[torch.Tensor], clip_max_norm: float) -> torch.Tensor:
    """Clip to ``clip_max_norm`` when > 0; either way return the total gradient norm before clipping."""
    if clip_max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _format_terms(terms: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in terms.items())


def train_one_epoch(model: torch.nn.Module, criterion, loader, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, state: TrainState, scaler: Optional[torch.amp.GradScaler] = None,
                    amp: str = "none", accumulate: int = 1, clip_max_norm: float = 0.1, max_steps: int = 0,
                    logger: Optional[RunLogger] = None, log_every: int = 10,
                    on_step: Optional[Callable[[TrainState], None]] = None, progress_bar: bool = True,
                    scheduler=None, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Train over the remaining batches of ``loader`` (already positioned at ``state.batch_in_epoch``).

    Every ``accumulate`` micro-batches (fewer for the epoch's last group) make one optimiser step; each
    micro-batch loss is divided by the group size, and DDP synchronises gradients only on the group's
    last micro-batch. ``state`` is updated in place after each step, then ``on_step(state)`` is called
    (checkpointing). Stops early once ``state.step`` reaches ``max_steps`` (> 0) or, after any step,
    ``should_stop()`` returns True (a stop signal; a collective under torchrun). ``scheduler``, when given,
    is stepped after every optimiser step (per-step schedules; the epoch schedule is stepped by ``fit``).

    Returns the epoch means of "loss", the weighted terms, "class_error" and "grad_norm" (rank-averaged).
    Raises NonFiniteLossError (on every rank at once) when the loss is not finite.
    """
    model.train()
    criterion.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = isinstance(model, DDP)
    pos, total = state.batch_in_epoch, state.batch_in_epoch + len(loader)
    meter = MeanMeter()
    bar = progress(None, total=total, initial=pos, desc=f"epoch {state.epoch}",
                   enabled=progress_bar and du.is_main_process())
    batches = iter(loader)
    optimizer.zero_grad(set_to_none=True)
    while pos < total and not (max_steps and state.step >= max_steps):
        group = min(accumulate, total - pos)
        step_start, data_time, step_values = time.perf_counter(), 0.0, None
        for j in range(group):
            t0 = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)
            data_time += time.perf_counter() - t0
            sync = model.no_sync() if ddp and j < group - 1 else contextlib.nullcontext()
            with sync:
                with autocast(device, amp):
                    outputs = model(batch.images, batch.mask, targets=batch.targets)  # targets: denoising queries
                loss_dict = criterion(to_float32(outputs), batch.targets)
                loss, terms = weighted_total(loss_dict, criterion.weight_dict)
                logged = {"loss": loss, **{k: loss_dict[k] for k in loss_dict if k not in terms}, **terms}
                keys = sorted(logged)  # the same order on every rank for the all-reduce
                raw = torch.stack([logged[k].detach().float() for k in keys])
                values = dict(zip(keys, du.all_reduce_mean(raw).tolist()))
                if not math.isfinite(values["loss"]):
                    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
                    raise NonFiniteLossError(
                        f"non-finite loss at step {state.step + 1} (epoch {state.epoch}, batch {pos + 1} of {total}): "
                        f"non-finite terms: {_format_terms(bad)}; all terms: {_format_terms(values)}",
                        state.step + 1, values)
                scaler.scale(loss / group).backward()
            step_values = {k: v / group + (step_values or {}).get(k, 0.0) for k, v in values.items()}
            pos += 1
            bar.update(1)
        scaler.unscale_(optimizer)
        grad_norm = float(_total_norm(params, clip_max_norm))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        state.step += 1
        state.batch_in_epoch = pos
        step_values["grad_norm"] = grad_norm
        meter.update(step_values)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        bar.set_postfix(loss=f"{step_values['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        refresh=False)
        if logger is not None and (state.step % max(log_every, 1) == 0 or state.step == 1):
            logger.log({"type": "train", "epoch": state.epoch, "step": state.step, **step_values, "lr": lrs,
                        "step_time": time.perf_counter() - step_start, "data_time": data_time,
                        **({"scale": scaler.get_scale()} if scaler.is_enabled() else {})},
                       step=state.step, tb_prefix="train/")
        if on_step is not None:
            on_step(state)
        if should_stop is not None and should_stop():
            break
    bar.close()
    return meter.means()


# ------------------------------------------------------------------------------------------------ fit
def _unused_parameters(model, criterion, dataset, device, seed: int, rank: int) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward/backward on one training image
    (DDP needs ``find_unused_parameters`` exactly when this is not empty). RNG states are left untouched."""
    batch = collate([SeededDataset(dataset, seed)[(0, rank % len(dataset))]]).to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.train()
        loss, _ = weighted_total(criterion(to_float32(model(batch.images, batch.mask, targets=batch.targets)), batch.targets),
                                 criterion.weight_dict)
        loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


def fit(cfg: Config, *, save_every_steps: int | None = None, progress_bar: bool = True, tensorboard: bool = True) -> dict:
    """Train a model as ``cfg`` says, evaluating every ``train.eval_every`` epochs and at the end.

    Joins the torchrun process group when launched by torchrun (and leaves it at the end if it joined).
    Writes into ``runtime.output_dir``: ``config.yaml``, ``log.jsonl`` (+ ``tb/``), ``checkpoint.pth``,
    ``checkpoint_epochNNNN.pth`` and ``metrics.json``. ``runtime.resume`` "auto" continues from the newest
    valid checkpoint there, a path from that file. ``save_every_steps`` > 0 also checkpoints every that
    many optimiser steps (mid-epoch; resuming from it is exact); None takes ``train.save_every_steps``.

    SIGTERM or SIGUSR1 (while ``fit`` runs in the main thread) ends the run after the current optimiser step
    with a checkpoint of that step and a "stopped" log record; ``runtime.resume`` "auto" continues from it
    exactly. A second signal, or ``train.stop_grace_s`` running out, exits the process at once
    (:mod:`solq.preemption`).

    Returns {"metrics": last evaluation ({} when stopped), "epoch", "step", "output_dir", "checkpoint",
    "num_classes" (taken from the data when ``model.num_classes`` is 0), "codec_file" (a codec fitted for
    this run, else the config's), "stopped" (the signal's name when a signal stopped the run, else None)};
    ``cfg`` itself is not changed: the run's completed copy is saved as ``config.yaml``.
    Raises :class:`solq.files.OutputWriteError` (every rank) when the run folder or a checkpoint cannot be
    written.
    """
    if save_every_steps is None:
        save_every_steps = cfg.train.save_every_steps
    stop = StopRequest(grace_s=cfg.train.stop_grace_s).install()
    created = not du.is_dist()
    try:
        info = du.init_distributed(cfg.runtime.dist_backend, cfg.runtime.device)
        try:
            return _fit(cfg, info, stop, save_every_steps, progress_bar, tensorboard)
        finally:
            if created:
                du.cleanup()
    finally:
        stop.uninstall()


def _fit(cfg: Config, info: du.DistInfo, stop: StopRequest, save_every_steps: int, progress_bar: bool,
         tensorboard: bool) -> dict:
    run = _build_run(cfg, info, stop, progress_bar, tensorboard)
    try:
        metrics, evaluated_at = _train_epochs(run, save_every_steps)
        if run.stop.stopping:
            return _stopped(run)
        return _finish(run, metrics, evaluated_at)
    except NonFiniteLossError as e:
        last = run.out / LAST_NAME
        note = (f"; the last good checkpoint {last} is left unchanged" if last.exists()
                else "; no checkpoint was written")
        _log_error(run, e.step, str(e))
        raise NonFiniteLossError(str(e) + note, e.step, e.terms) from None
    except OutputWriteError as e:
        _log_error(run, run.state.step, str(e))
        raise


def _log_error(run: Run, step: int, message: str) -> None:
    """An "error" record (the logger only warns when the disk is what failed), then the log is closed."""
    run.logger.log({"type": "error", "epoch": run.state.epoch, "step": step, "error": message})
    run.logger.close()


def _build_run(cfg: Config, info: du.DistInfo, stop: StopRequest, progress_bar: bool, tensorboard: bool) -> Run:
    """Data, codec, model, optimiser, schedule and logger of a run, resumed when ``runtime.resume`` says so.
    The run folder is checked for writability first (OutputWriteError on every rank)."""
    configure_runtime(cfg)
    started = time.perf_counter()
    device, t = info.device, cfg.train
    out = Path(cfg.runtime.output_dir)
    on_main_rank(info, lambda: check_writable(out, what="run folder"))
    resume = resume_source(cfg.runtime.resume, out)
    train_ds, val_ds = build_datasets(cfg)
    codec, codec_file = fit_codec(cfg, train_ds, out)
    cfg = complete_config(cfg, num_classes=train_ds.num_classes, codec_file=codec_file)  # the run's own copy
    seed_everything(t.seed)  # same initial weights on every rank
    model, criterion, postprocessor = build_model(cfg, codec=codec)
    if getattr(model, "vector_standardize", False) and resume is None:  # a resumed run loads them
        model.set_vector_statistics(*vector_statistics(cfg, train_ds, codec))
    compile_model(model.to(device), cfg)
    criterion.to(device)
    optimizer = build_optimizer(cfg, model)
    pin = device.type == "cuda"
    train_loader = build_train_loader(train_ds, cfg, rank=info.rank, world_size=info.world_size, pin_memory=pin)
    val_loader = build_val_loader(val_ds, cfg, rank=info.rank, world_size=info.world_size, pin_memory=pin)
    scheduler = build_scheduler(cfg, optimizer, -(-len(train_loader) // t.accumulate))
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    state = TrainState()
    if resume is not None:
        path, ckpt = resume
        state = load_training_state(ckpt, path, cfg, info, model, optimizer, scheduler, scaler)
    else:
        seed_everything(t.seed + info.rank)
    bare = model
    if info.distributed:
        unused = _unused_parameters(model, criterion, train_ds, device, t.seed, info.rank)
        if unused and info.is_main:
            warnings.warn(f"{len(unused)} trainable parameters get no gradient (DDP find_unused_parameters=True): "
                          f"{unused[:5]}{' ...' if len(unused) > 5 else ''}", RuntimeWarning, stacklevel=3)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=bool(unused))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "config.yaml")
    logger = RunLogger(out, enabled=info.is_main, tensorboard=tensorboard)
    logger.log({"type": "start", "code_version": solq.code_version(), "world_size": info.world_size,
                "device": str(device), "resumed_from": str(resume[0]) if resume else None,
                "epoch": state.epoch, "step": state.step, "config": cfg.to_dict()})
    return Run(cfg=cfg, info=info, out=out, model=model, bare=bare, criterion=criterion,
                postprocessor=postprocessor, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                train_loader=train_loader, val_loader=val_loader, val_coco=val_ds.coco, state=state, logger=logger,
                categories={int(k): str(v) for k, v in train_ds.category_names.items()},
                iou_types=iou_types_for(bare, cfg.eval.iou_types), started=started, progress_bar=progress_bar,
                stop=stop)


def _train_epochs(run: Run, save_every_steps: int) -> tuple[dict, int]:
    """Epochs until ``train.epochs`` or ``train.max_steps``, checkpointing and evaluating as configured, or
    until a stop signal (``run.stop.stopping``; the checkpoint of the step it stopped after is written).
    Returns (the last evaluation's metrics, the step it was made at; -1 when none)."""
    t, state = run.cfg.train, run.state
    steps_per_epoch = len(run.train_loader)

    def on_step(s: TrainState) -> None:
        if save_every_steps > 0 and s.step % save_every_steps == 0 and s.batch_in_epoch < steps_per_epoch:
            run.save(False)

    metrics: dict = {}
    evaluated_at = -1
    while state.epoch < t.epochs and not (t.max_steps and state.step >= t.max_steps) and not run.stop_agreed():
        run.train_loader.sampler.set_epoch(state.epoch, start=state.batch_in_epoch * t.batch_size)
        epoch_start = time.perf_counter()
        means = train_one_epoch(run.model, run.criterion, run.train_loader, run.optimizer, device=run.info.device,
                                state=state, scaler=run.scaler, amp=t.amp, accumulate=t.accumulate,
                                clip_max_norm=t.clip_max_norm, max_steps=t.max_steps, logger=run.logger,
                                log_every=t.log_every, on_step=on_step, progress_bar=run.progress_bar,
                                scheduler=run.scheduler if run.per_step_lr else None, should_stop=run.stop_agreed)
        if state.batch_in_epoch < steps_per_epoch:  # stopped by max_steps or a signal mid-epoch
            if run.saved_step != state.step:
                run.save(False)
            break
        if not run.per_step_lr:
            run.scheduler.step()
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        run.logger.log({"type": "epoch", "epoch": state.epoch, "step": state.step, **means,
                        "epoch_time": time.perf_counter() - epoch_start}, step=state.step, tb_prefix="epoch/")
        run.save(t.save_every > 0 and state.epoch % t.save_every == 0)
        if run.stop.stopping:  # after the epoch's last step: its checkpoint is written, evaluation waits
            break
        if t.eval_every > 0 and state.epoch % t.eval_every == 0 and state.epoch < t.epochs:
            metrics, evaluated_at = run.evaluate(), state.step
    return metrics, evaluated_at


def _finish(run: Run, metrics: dict, evaluated_at: int) -> dict:
    """The final evaluation (unless the last epoch's is current), metrics.json, the "end" record; fit's result."""
    state = run.state
    if evaluated_at != state.step:
        metrics = run.evaluate()
    if run.info.is_main:
        write_text_atomic(run.out / "metrics.json",
                          json.dumps({"epoch": state.epoch, "step": state.step, **metrics}, indent=2),
                          what="metrics file")
    run.logger.log({"type": "end", "epoch": state.epoch, "step": state.step})
    run.logger.close()
    return _result(run, metrics)


def _stopped(run: Run) -> dict:
    """End a run that a signal stopped: the checkpoint of this step (unless written already), a "stopped"
    record and message naming it; no evaluation. Returns fit's result with "stopped" set."""
    state = run.state
    if run.saved_step != state.step:  # e.g. a signal before the first step
        run.save(False)
    checkpoint = run.out / LAST_NAME
    run.logger.log({"type": "stopped", "signal": run.stop.signal_name, "epoch": state.epoch,
                    "batch_in_epoch": state.batch_in_epoch, "step": state.step, "checkpoint": str(checkpoint)})
    run.logger.close()
    rank = f"rank {run.info.rank}: " if run.info.distributed else ""  # every rank says where it stopped
    # one write with its newline, so the lines of ranks sharing a pipe do not run into each other
    sys.stdout.write(f"{rank}{run.stop.signal_name}: stopped after step {state.step} (epoch {state.epoch}, batch "
                     f"{state.batch_in_epoch}); checkpoint {checkpoint}; continue with --resume auto\n")
    sys.stdout.flush()
    return _result(run, {})


def _result(run: Run, metrics: dict) -> dict:
    """fit's return value (see :func:`fit`)."""
    state = run.state
    return {"metrics": metrics, "epoch": state.epoch, "step": state.step, "output_dir": str(run.out),
            "checkpoint": str(run.out / LAST_NAME), "num_classes": run.cfg.model.num_classes,
            "codec_file": run.cfg.codec.file, "stopped": run.stop.signal_name if run.stop.stopping else None}

"""A training run's state: its position (:class:`TrainState`), what it holds once built (:class:`Run`), saving
it as a checkpoint and restoring it from one.

``solq.engine.train`` builds a :class:`Run`, trains it and ends it; this module is what that loop saves and
resumes: ``Run.save`` writes ``checkpoint.pth`` (rank 0 writes, every rank's RNG state inside, a failed write
raised on every rank by :func:`on_main_rank`), :func:`resume_source` finds the checkpoint ``runtime.resume`` names
and :func:`load_training_state` restores model, optimiser, schedule, scaler and RNG streams from it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import solq
from solq.config import Config
from solq.engine import distributed as du
from solq.engine.checkpoint import (FORMAT, LAST_NAME, CheckpointError, capture_rng_state, epoch_checkpoint_name,
                                    find_resume_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint)
from solq.engine.evaluate import evaluate
from solq.engine.logger import RunLogger
from solq.engine.runtime import seed_everything
from solq.files import OutputWriteError
from solq.preemption import StopRequest

__all__ = ["TrainState", "Run", "on_main_rank", "resume_source", "load_training_state"]


@dataclass
class TrainState:
    """Position of a run: ``epoch`` in progress (0-based), micro-batches of it consumed, optimiser steps."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0


def resume_source(resume: str, out: Path) -> Optional[tuple[Path, dict]]:
    """Where a run resumes from: ``resume`` is ``runtime.resume`` ("" none, "auto" the newest valid checkpoint
    in ``out``, else a checkpoint path). Returns (path, loaded checkpoint), or None to start from scratch."""
    if not resume:
        return None
    if resume == "auto":
        found = find_resume_checkpoint(out)
        if found is None:
            print(f"resume=auto: no valid checkpoint in {out}; starting from scratch")
        return found
    return Path(resume), load_checkpoint(resume)


def on_main_rank(info: du.DistInfo, write: Callable[[], Any]) -> None:
    """Run ``write`` on rank 0 only; when it raises OutputWriteError, raise it on every rank (so no rank waits
    in a collective for one that has stopped)."""
    error = None
    if info.is_main:
        try:
            write()
        except OutputWriteError as e:
            error = e
    failure = du.broadcast_object(None if error is None else (str(error), error.errno))
    if error is not None:
        raise error
    if failure is not None:
        raise OutputWriteError(f"rank 0: {failure[0]}", failure[1])


@dataclass
class Run:
    """What one training run holds once built (``solq.engine.train._build_run``): the loop and the saving read
    it."""

    cfg: Config  # the run's completed copy (num_classes, codec file)
    info: du.DistInfo
    out: Path
    model: torch.nn.Module  # DDP-wrapped when distributed
    bare: torch.nn.Module  # the model itself (state dicts, evaluation)
    criterion: torch.nn.Module
    postprocessor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: Any
    val_loader: Any
    val_coco: Any
    state: TrainState
    logger: RunLogger
    categories: dict
    iou_types: tuple
    started: float
    progress_bar: bool
    stop: StopRequest
    saved_step: int = -1  # the step of the newest checkpoint this process wrote

    def stop_agreed(self) -> bool:
        """Whether any rank got a stop signal (a collective under torchrun: all ranks ask at the same point)."""
        return self.stop.agreed(lambda flag: du.any_rank(flag, self.info.device))

    @property
    def per_step_lr(self) -> bool:
        """Whether the schedule steps after every optimiser step (else once per epoch)."""
        return getattr(self.scheduler, "per_step", False)

    def save(self, epoch_copy: bool) -> None:
        """Checkpoint the current state (``checkpoint.pth``; also ``checkpoint_epochNNNN.pth`` when asked); rank
        0 writes. Raises OutputWriteError on every rank when the write fails (the previous file stays)."""
        rngs = du.all_gather_object(capture_rng_state())  # every rank's RNG, so each resumes its own stream
        st, t = self.state, self.cfg.train

        def write() -> None:
            ckpt = {"format": FORMAT, "model": self.bare.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch, "step": st.step,
                    "batch_size": t.batch_size, "world_size": self.info.world_size, "config": self.cfg.to_dict(),
                    "rng": rngs, "categories": self.categories, "code_version": solq.code_version()}
            save_checkpoint(ckpt, self.out / LAST_NAME)
            if epoch_copy:
                save_checkpoint(ckpt, self.out / epoch_checkpoint_name(st.epoch))

        on_main_rank(self.info, write)
        self.saved_step = st.step

    def evaluate(self) -> dict:
        """Score the model on the val set now; logged as an "eval" record."""
        metrics = evaluate(self.bare, self.postprocessor, self.val_loader, self.val_coco, device=self.info.device,
                           criterion=self.criterion, amp=self.cfg.train.amp, iou_types=self.iou_types,
                           boundary=self.cfg.eval.boundary, progress_bar=self.progress_bar)
        self.logger.log({"type": "eval", "epoch": self.state.epoch, "step": self.state.step,
                         "elapsed_s": round(time.perf_counter() - self.started, 1), **metrics},
                        step=self.state.step, tb_prefix="val/")
        return metrics


def load_training_state(ckpt: dict, path: Path, cfg: Config, info: du.DistInfo, model, optimizer, scheduler,
                         scaler) -> TrainState:
    """Restore model/optimiser/scheduler/scaler/RNG from a solq checkpoint; returns the TrainState."""
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a solq training checkpoint (use solq eval for release weights)")
    if ckpt["config"].get("model") != cfg.to_dict()["model"]:
        warnings.warn(f"resuming from {path}: its model config differs from the current one", RuntimeWarning,
                      stacklevel=3)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["step"]))
    same_layout = ckpt.get("world_size") == info.world_size and ckpt.get("batch_size") == cfg.train.batch_size
    if same_layout:
        restore_rng_state(ckpt["rng"][info.rank])
    else:  # different process layout: keep the epoch position in images, reseed (not bit-exact)
        seen = state.batch_in_epoch * ckpt.get("batch_size", cfg.train.batch_size) * ckpt.get("world_size", 1)
        state.batch_in_epoch = seen // (cfg.train.batch_size * info.world_size)
        seed_everything(cfg.train.seed + info.rank + state.step)
        warnings.warn(f"resuming from {path} with world_size x batch_size {info.world_size}x{cfg.train.batch_size} "
                      f"instead of {ckpt.get('world_size')}x{ckpt.get('batch_size')}: data order is kept, RNG streams "
                      f"are reseeded", RuntimeWarning, stacklevel=3)
    if info.is_main:
        print(f"resumed from {path}: epoch {state.epoch}, batch {state.batch_in_epoch}, step {state.step}")
    return state

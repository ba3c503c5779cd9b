"""Optimiser and schedule: AdamW with three parameter groups chosen by name substring (as in the authors' release) and
the learning-rate schedule: the release's StepLR stepped once per epoch (``train.lr_schedule=step``, no
warm-up), or, stepped once per optimiser step, a linear warm-up over ``train.warmup_steps`` followed by the
step decay or by a cosine decay to ``train.min_lr_ratio`` x lr at the last step (``cosine``).

| group | matches (substring of the parameter name) | lr |
|---|---|---|
| backbone | ``backbone_names`` (default "backbone.0", as the release) | ``train.lr_backbone`` (2e-5) |
| linear_proj | ``linear_proj_names`` ("reference_points", "sampling_offsets") | lr x ``lr_linear_proj_mult`` |
| default | everything else | ``train.lr`` (2e-4) |

Frozen parameters (``requires_grad=False``) are left out; a parameter shared by several modules appears once
(``named_parameters`` de-duplicates), as in the release.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import nn

from solq.config import Config

__all__ = ["BACKBONE_NAMES", "LINEAR_PROJ_NAMES", "param_groups", "build_optimizer", "build_scheduler",
           "PerStepLR", "lr_factor"]

BACKBONE_NAMES = ("backbone.0",)
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def _matches(name: str, keys: Sequence[str]) -> bool:
    return any(k in name for k in keys)


def param_groups(model: nn.Module, *, lr: float, lr_backbone: float, lr_linear_proj_mult: float,
                 weight_decay: float, backbone_names: Sequence[str] = BACKBONE_NAMES,
                 linear_proj_names: Sequence[str] = LINEAR_PROJ_NAMES) -> list[dict]:
    """Split the trainable parameters of ``model`` into the three groups of the table above.

    Returns a list of optimiser param-group dicts with keys ``params``, ``lr``, ``weight_decay`` and
    ``name`` (``"default"``, ``"backbone"``, ``"linear_proj"``); empty groups are dropped. The backbone test
    comes first, so a backbone parameter whose name also contains a linear-proj key is a backbone one.
    """
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, backbone_names):
            groups["backbone"].append(p)
        elif _matches(name, linear_proj_names):
            groups["linear_proj"].append(p)
        else:
            groups["default"].append(p)
    lrs = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"params": ps, "lr": lrs[k], "weight_decay": weight_decay, "name": k}
            for k, ps in groups.items() if ps]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with the ``cfg.train`` learning rates and weight decay.

    Uses the fused kernel where torch has one for every parameter's device (CPU and CUDA): on CPU it is
    about 6x faster than the per-tensor loop for the smoke model.
    """
    t = cfg.train
    groups = param_groups(model, lr=t.lr, lr_backbone=t.lr_backbone, lr_linear_proj_mult=t.lr_linear_proj_mult,
                          weight_decay=t.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


class PerStepLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that the training loop steps after every optimiser step (``per_step`` is True)."""

    per_step = True


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0, steps_per_epoch: int = 1,
              lr_drop: int = 40, min_lr_ratio: float = 0.01) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based: the lr used by the (step+1)-th update).

    Warm-up: (step + 1) / warmup_steps while step < warmup_steps. Then "step": 0.1 from epoch ``lr_drop``
    (epochs of ``steps_per_epoch`` steps); "cosine": min_lr_ratio + (1 - min_lr_ratio) (1 + cos(pi t)) / 2 with
    t the fraction of the post-warm-up steps done, reaching min_lr_ratio at step total_steps - 1.
    """
    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    if schedule == "step":
        return warm * (0.1 if step // max(steps_per_epoch, 1) >= lr_drop else 1.0)
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule: {schedule!r} is not 'step' or 'cosine'")
    span = max(total_steps - 1 - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return warm * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 1):
    """The release's StepLR(step_size=train.lr_drop, gamma=0.1), stepped once per epoch, when
    ``train.lr_schedule`` is "step" without warm-up; otherwise a :class:`PerStepLR` of :func:`lr_factor`,
    stepped once per optimiser step (``steps_per_epoch`` optimiser steps make an epoch; the run ends after
    ``train.max_steps`` or ``train.epochs`` epochs, whichever comes first)."""
    t = cfg.train
    if t.lr_schedule == "step" and t.warmup_steps == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(t.lr_drop, 1), gamma=0.1)
    total = t.epochs * steps_per_epoch
    if t.max_steps > 0:
        total = min(total, t.max_steps)
    factor = functools.partial(lr_factor, schedule=t.lr_schedule, total_steps=total, warmup_steps=t.warmup_steps,
                               steps_per_epoch=steps_per_epoch, lr_drop=t.lr_drop, min_lr_ratio=t.min_lr_ratio)
    return PerStepLR(optimizer, factor)

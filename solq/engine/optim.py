"""Optimiser and schedule of reference §1.3: AdamW with three parameter groups chosen by name substring,
StepLR stepped once per epoch.

| group | matches (substring of the parameter name) | lr |
|---|---|---|
| backbone | ``backbone_names`` (default "backbone.0", as the release) | ``train.lr_backbone`` (2e-5) |
| linear_proj | ``linear_proj_names`` ("reference_points", "sampling_offsets") | lr x ``lr_linear_proj_mult`` |
| default | everything else | ``train.lr`` (2e-4) |

Frozen parameters (``requires_grad=False``) are left out; a parameter shared by several modules appears once
(``named_parameters`` de-duplicates), as in the release.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from solq.config import Config

__all__ = ["BACKBONE_NAMES", "LINEAR_PROJ_NAMES", "param_groups", "build_optimizer", "build_scheduler"]

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


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    """StepLR(step_size=train.lr_drop, gamma=0.1), stepped once per epoch."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg.train.lr_drop, 1), gamma=0.1)

"""How a process runs: seeding, thread count and determinism from ``cfg.runtime``, mixed precision.

Below both the training loop and the evaluation (and every entry point that runs a model), so neither
imports the other for these helpers.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from solq.config import Config
from solq.engine import allocator

__all__ = ["seed_everything", "configure_runtime", "compile_model", "autocast", "to_float32", "AMP_DTYPES"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def configure_runtime(cfg: Config) -> None:
    """Thread count, determinism switches and CPU memory retention from ``cfg.runtime``."""
    if cfg.runtime.keep_freed_memory:
        allocator.retain_freed_memory()
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)
    if cfg.runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def compile_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Compile ``model``'s forward in place with ``torch.compile(backend=cfg.runtime.compile)`` when that is
    set (``nn.Module.compile``: parameter names and state dict stay those of the eager model, so checkpoints,
    DDP and the optimizer see the same module). Compilation happens at the first call. Returns the same module."""
    if cfg.runtime.compile:
        model.compile(backend=cfg.runtime.compile)
    return model


def autocast(device: torch.device, amp: str = "none"):
    """``torch.autocast`` for ``amp`` in {"none", "bf16", "fp16"} on ``device``'s type (a no-op for "none")."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp: {amp!r} is not one of none, bf16, fp16")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def to_float32(tree):
    """Cast every floating tensor of a nested dict/list of model outputs to float32 (losses and
    post-processing run in full precision after an autocast forward)."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() and tree.dtype != torch.float32 else tree
    if isinstance(tree, dict):
        return {k: to_float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_float32(v) for v in tree)
    return tree

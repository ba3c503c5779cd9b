"""solq.engine: training, evaluation, checkpoints, distributed helpers, logging, prediction, benchmarking.

DETR-like: ``train.train_one_epoch`` and ``evaluate.evaluate`` are the two loops; ``train.fit`` runs a whole
training from a Config (torchrun-aware); ``evaluate.run_evaluation``, ``predict.predict`` and
``bench.bench_modes`` are what ``solq eval``, ``solq predict`` and ``solq bench`` call.
"""
from .checkpoint import (CheckpointError, build_from_checkpoint, find_resume_checkpoint, load_checkpoint,
                         save_checkpoint)
from .evaluate import evaluate, run_evaluation
from .optim import build_optimizer, build_scheduler, param_groups
from .train import NonFiniteLossError, TrainState, fit, train_one_epoch

__all__ = ["fit", "train_one_epoch", "TrainState", "NonFiniteLossError", "evaluate", "run_evaluation",
           "save_checkpoint", "load_checkpoint", "find_resume_checkpoint", "build_from_checkpoint",
           "CheckpointError", "build_optimizer", "build_scheduler", "param_groups"]

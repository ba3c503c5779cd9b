"""Learning-rate schedules: the release's epoch StepLR unchanged; per-step warm-up + cosine / step decay."""
import math

import pytest
import torch

from solq.config import load_config
from solq.engine.optim import PerStepLR, build_scheduler, lr_factor


def _optimizer(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_release_schedule_is_steplr_per_epoch():
    sched = build_scheduler(load_config("release-r50"), _optimizer(), steps_per_epoch=100)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and not getattr(sched, "per_step", False)
    assert sched.step_size == 40 and sched.gamma == 0.1


def test_warmup_then_cosine_values():
    f = lambda s: lr_factor(s, schedule="cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(109) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    mid = 10 + 99 / 2
    assert lr_factor(int(mid), schedule="cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    values = [f(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_per_step_step_decay_with_warmup():
    f = lambda s: lr_factor(s, schedule="step", total_steps=1000, warmup_steps=4, steps_per_epoch=10, lr_drop=3)  # noqa: E731
    assert [f(s) for s in (0, 3, 29, 30)] == pytest.approx([0.25, 1.0, 1.0, 0.1])


def test_per_step_scheduler_follows_max_steps_and_resumes():
    cfg = load_config("smoke", ["train.lr_schedule=cosine", "train.warmup_steps=5", "train.max_steps=50",
                                "train.epochs=100", "train.lr=1e-3", "train.min_lr_ratio=0.0"])
    opt = _optimizer()
    sched = build_scheduler(cfg, opt, steps_per_epoch=20)
    assert isinstance(sched, PerStepLR) and sched.per_step
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)  # step 0 of the warm-up
    lrs = []
    for _ in range(49):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the 50th update (step 49) is the last: min lr
    # a fresh scheduler loaded from the state dict continues where the first one was
    opt2 = _optimizer()
    sched2 = build_scheduler(cfg, opt2, steps_per_epoch=20)
    state = sched.state_dict()
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch
    assert sched2.get_last_lr() == sched.get_last_lr()

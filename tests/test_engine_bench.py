"""solq.engine.bench: the machine matmul rate, the achieved-GFLOP/s column of the table, the interleaved timing
loop (with a fake clock: no machine timing asserted)."""
import math

import pytest
import torch

from solq.engine.bench import format_bench_table, matmul_gflops, timed_interleaved, timed_median


def _row(**extra):
    row = {"mode": "uqr", "params_detector": 40_000_000, "params_mask_branch": 500_000, "gmacs_detector": 90.0,
           "gmacs_mask_branch_last_layer": 0.05, "gmacs_decode_one_mask": 0.0001, "fps_forward": 0.5,
           "fps_with_postprocess": 0.4, "train_steps_per_s": 0.1, "peak_memory_inference_mb": 900.0,
           "peak_memory_train_mb": 2500.0}
    row.update(extra)
    return row


def test_matmul_gflops_is_a_positive_finite_rate():
    rate = matmul_gflops(size=64, repeats=2)
    assert math.isfinite(rate) and rate > 0
    assert matmul_gflops("cpu", size=32, repeats=1, dtype=torch.float64) > 0


def test_table_shows_achieved_against_matmul_rate():
    table = format_bench_table([_row(achieved_gflops_forward=45.0, machine_matmul_gflops=150.0)])
    assert "GFLOP/s net / opt / matmul" in table.splitlines()[0]
    assert "45.0 / 150.0 (30%)" in table.splitlines()[-1]  # a result from before the opt rate existed
    table = format_bench_table([_row(achieved_gflops_forward=45.0, achieved_gflops_forward_inference_opt=60.0,
                                     machine_matmul_gflops=150.0)])
    assert "45.0 / 60.0 / 150.0 (30% / 40%)" in table.splitlines()[-1]


def test_table_tolerates_results_without_the_rates():
    last = format_bench_table([_row()]).splitlines()[-1]
    assert last.split()[-1] == "n/a"
    assert "0.50" in last  # the existing columns are still there


class FakeClock:
    """A clock that only moves when a fake workload says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float) -> None:
        self.now += seconds


def _fake_net_and_post(clock, calls, net_costs, post_cost):
    """A fake network whose i-th call costs net_costs[i % len] seconds, and the network + a post-processing of
    post_cost seconds (its network call uses the same cost sequence), both logging their calls in ``calls``."""
    count = {"net": 0}

    def net():
        clock.work(net_costs[count["net"] % len(net_costs)])
        count["net"] += 1

    def net_only():
        calls.append("net")
        net()

    def net_post():
        calls.append("post")
        net()
        clock.work(post_cost)
    return net_only, net_post


def test_interleaved_timing_alternates_and_reports_medians_and_spreads():
    clock, calls = FakeClock(), []
    # the machine gets faster as the run goes on (each network call costs 0.1 s less than the last, as when
    # another job on a shared machine finishes): timed one after the other, the network alone would get the slow
    # early calls and net + post the fast late ones, and +post would come out faster than the network alone
    net_costs = [3.0 - 0.1 * i for i in range(20)]
    net_only, net_post = _fake_net_and_post(clock, calls, net_costs, post_cost=0.05)
    fwd, post = timed_interleaved([net_only, net_post], 7, 2, torch.device("cpu"), clock=clock)
    assert calls == ["net", "post", "post", "net"] * 4 + ["net", "post"]  # 2 warm-up + 7 timed rounds
    for s in (fwd, post):
        assert s["iters"] == 7
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
        assert s["max"] - s["min"] > 0.5  # the slowdown shows as spread
    assert post["median"] >= fwd["median"]  # what includes more work is never reported as faster
    # timed calls 4..17 (after the 4 warm-up calls): net gets 4, 7, 8, 11, 12, 15, 16; post 5, 6, 9, 10, 13, 14, 17
    assert fwd["median"] == pytest.approx(3.0 - 0.1 * 11)
    assert post["median"] == pytest.approx(3.0 - 0.1 * 10 + 0.05)
    assert (fwd["min"], fwd["max"]) == (pytest.approx(1.4), pytest.approx(2.6))


def test_timed_median_is_the_single_function_case():
    med, spread = timed_median(lambda: None, 3, 1, torch.device("cpu"))
    assert med >= 0 and spread >= 0
    with pytest.raises(ValueError):
        timed_interleaved([], 3, 1, torch.device("cpu"))


def test_table_shows_fps_medians_spreads_and_iterations():
    row = _row(fps_forward=0.52, fps_forward_min=0.50, fps_forward_max=0.55, fps_with_postprocess=0.49,
               fps_with_postprocess_min=0.47, fps_with_postprocess_max=0.51, timing_iters=10, timing_warmup=2)
    lines = format_bench_table([row]).splitlines()
    assert "FPS net" in lines[0] and "FPS +post" in lines[0] and "FPS net opt" in lines[0]
    assert "0.52 [0.50-0.55]" in lines[2] and "0.49 [0.47-0.51]" in lines[2]
    assert "n/a" in lines[2]  # no optimised-forward timing in this row
    row.update(fps_forward_inference_opt=0.61, fps_forward_inference_opt_min=0.6, fps_forward_inference_opt_max=0.62)
    assert "0.61 [0.60-0.62]" in format_bench_table([row]).splitlines()[2]
    assert "10 iterations after 2 warm-up rounds" in lines[-1] and "alternate" in lines[-1]

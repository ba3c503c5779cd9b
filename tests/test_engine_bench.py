"""solq.engine.bench: the machine matmul rate and the achieved-GFLOP/s column of the table (no timing asserted)."""
import math

import torch

from solq.engine.bench import format_bench_table, matmul_gflops


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
    assert "GFLOP/s net / matmul" in table.splitlines()[0]
    assert "45.0 / 150.0 (30%)" in table.splitlines()[-1]


def test_table_tolerates_results_without_the_rates():
    last = format_bench_table([_row()]).splitlines()[-1]
    assert last.split()[-1] == "n/a"
    assert "0.50" in last  # the existing columns are still there

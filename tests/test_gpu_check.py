"""benchmarks/gpu_check.py on a machine without CUDA: its refusal, its arguments, and its kernel section run in
Triton's CPU interpreter (the comparison logic that decides pass/fail on a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def _run(*args, env_extra=None, timeout=300):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_refuses_clearly_without_cuda(tmp_path):
    proc = _run("--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "nothing was run" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_cpu_only_for_the_kernel_section_in_the_interpreter(tmp_path):
    proc = _run("--device", "cpu", "--sections", "fps", "--out", str(tmp_path))
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
    assert _run("--sections", "gpu").returncode == 2  # argparse rejects an unknown section
    assert "--train-size" in _run("--help").stdout


def test_relative_errors_flag_a_wrong_kernel():
    want = [torch.tensor([1.0, -2.0]), torch.zeros(3)]
    assert gpu_check.relative_errors([torch.tensor([1.0, -2.0]), torch.zeros(3)], want) == [0.0, 0.0]
    errs = gpu_check.relative_errors([torch.tensor([1.0, -1.0]), torch.full((3,), 0.5)], want)
    assert errs == [pytest.approx(0.5), pytest.approx(0.5)]  # 1/2 of the scale; absolute where the truth is 0


def test_markdown_table_has_every_row_and_column():
    table = gpu_check.markdown([{"a": 1.23456, "b": "x"}, {"a": 0.000123}], ["a", "b"])
    lines = table.splitlines()
    assert lines[0] == "| a | b |" and len(lines) == 4
    assert "1.235" in lines[2] and "0.000123" in lines[3] and lines[3].endswith("|  |")


def test_kernel_section_in_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    proc = _run("--device", "cpu", "--sections", "kernels", "--out", str(tmp_path),
                env_extra={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["sections"]["kernels"]["checks"]
    # every odd case, in float32 (one input mix) and both half dtypes (two mixes each)
    assert len(checks) == len(gpu_check.ODD_CASES) * 5 and all(r["passed"] for r in checks)
    assert {r["dtype"] for r in checks} == {"float32", "bfloat16", "float16"}
    assert all(r["grad_loc"] < 10 * r["tolerance"] and r["out"] < r["tolerance"] for r in checks)
    assert "all checks passed" in proc.stdout and (tmp_path / "gpu_check.md").read_text().startswith("# gpu_check")

"""benchmarks/profile_forward.py on a tiny model: every part is labelled, the parts add up to the forward, and
the tables are printed and written (no timing asserted)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_forward  # noqa: E402

TINY = ["model.hidden_dim=32", "model.nheads=2", "model.num_queries=8", "model.vector_hidden_dim=32",
        "codec.resolution=16", "codec.num_coeffs=16"]


def test_parts_add_up_to_the_forward(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_forward.main(["--config", "smoke", "--size", "64x80", "--threads", "1", "--repeats", "1",
                                 "--out", str(out), "--set", *TINY]) == 0
    parts = json.loads(out.read_text())["parts_ms"]
    counted = [k for k in parts if k not in ("forward", "post-processing", "other") and "(all)" not in k]
    for key in ("backbone", "input projections", "encoder: deformable sampling", "decoder: self-attention",
                "encoder: FFN linears", "heads"):
        assert parts[key] > 0, key  # the hooks reached this part
    assert abs(sum(parts[k] for k in counted) + parts["other"] - parts["forward"]) < 1e-6 * max(parts["forward"], 1)
    assert parts["encoder: deformable attention (all)"] >= parts["encoder: attention linears"]
    printed = capsys.readouterr().out
    assert "| **forward** |" in printed and "aten::" in printed


def test_inference_opt_profile_runs(tmp_path):
    out = tmp_path / "p.json"
    assert profile_forward.main(["--config", "smoke", "--size", "64x64", "--threads", "1", "--repeats", "1",
                                 "--inference-opt", "--out", str(out), "--set", *TINY]) == 0
    assert json.loads(out.read_text())["inference_opt"] is True

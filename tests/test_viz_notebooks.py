"""The viz notebooks run end to end through papermill with tiny parameters and write their figures and
metrics.json. decoder_attention runs standalone (an empty checkpoint, not the shipped default: it trains a two-step
tiny smoke model);
failure_cases and explorer then use that model's run folder."""
import json
from pathlib import Path

import nbformat
import pytest

from solq.config import load_config
from tiny_overrides import TINY  # 64-px scenes, width 32: the smoke model trains in seconds on one core

papermill = pytest.importorskip("papermill")
pytestmark = pytest.mark.slow  # three kernels, one tiny training run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from solq.workbench.runner import ensure_kernel

    root = tmp_path_factory.mktemp("viz_notebooks")
    ensure_kernel("python3", private_dir=root / "jupyter")
    return root


def _run(workdir: Path, name: str, **params) -> tuple[Path, nbformat.NotebookNode]:
    out = workdir / name
    base = {"data_root": str(workdir / "synthetic"), "output_dir": str(out), "smoke_steps": 2,
            "smoke_overrides": TINY}
    executed = workdir / f"{name}.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(executed),
                               parameters={**base, **params}, kernel_name="python3", cwd=str(ROOT),
                               progress_bar=False, execution_timeout=600)  # a hung kernel fails, not CI
    return out, nbformat.read(executed, as_version=4)


def _images_shown(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def attention_run(workdir):
    return _run(workdir, "decoder_attention", checkpoint="", num_images=2, queries_per_image=2)


def test_decoder_attention_standalone(attention_run):
    out, nb = attention_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "smoke_model" / "checkpoint.pth").is_file()  # trained here: the checkpoint was empty
    assert metrics["num_images"] == 2 and 1 <= metrics["num_queries"] <= 4
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == metrics["figures"] == 3 and "attention_outline_summary.png" in pngs
    assert _images_shown(nb) == 3
    layers = metrics["config"]["model"]["dec_layers"]
    for layer in range(layers):
        shares = [metrics[f"attention/layer{layer}/{k}"] for k in ("outline", "inside", "outside")]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
    rows = json.loads((out / "outline_rows.json").read_text())
    assert len(rows) == layers * metrics["num_queries"]  # one row per query and decoder layer
    assert metrics["config"]["model"]["hidden_dim"] == 32


def test_failure_cases(workdir, attention_run):
    run = attention_run[0] / "smoke_model"
    out, nb = _run(workdir, "failure_cases", checkpoint=str(run), score_threshold=0.0, num_cases=4)
    metrics = json.loads((out / "metrics.json").read_text())
    cases = json.loads((out / "failure_cases.json").read_text())
    kinds = ("missed", "merged", "duplicate", "wrong_class", "poor_boundary")
    assert sum(metrics[f"failures/{k}"] for k in kinds) == len(cases) > 0
    assert 0.0 <= metrics["segm/AP"] <= 1.0 and 0.0 <= metrics["bbox/AP"] <= 1.0
    assert metrics["num_images"] == 3
    assert metrics["overall/objects"] == sum(metrics[f"by_occlusion/{b}/objects"]
                                             for b in ("0-10%", "10-30%", "30-50%", "50-100%"))
    for name in ("precision_recall.png", "failure_gallery.png", "failure_statistics.png"):
        assert (out / name).is_file()
    assert "| category |" in (out / "failure_statistics.md").read_text()
    assert _images_shown(nb) == metrics["figures"]


def test_explorer_notebook(workdir, attention_run):
    run = attention_run[0] / "smoke_model"
    out, nb = _run(workdir, "explorer", checkpoint=str(run), compare_checkpoint="", score_threshold=0.05)
    metrics = json.loads((out / "metrics.json").read_text())
    counts = [metrics[f"detections_at_threshold/{t}"] for t in ("0", "0.05", "0.5", "1")]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0
    m = load_config("smoke", TINY).model  # heads x levels x points of the chosen query
    assert metrics["attention_points"] == m.nheads * m.num_feature_levels * m.dec_n_points == 2 * 3 * 2
    assert metrics["ground_truth_shown"] > 0 and metrics["num_images"] == 3
    assert (out / "explorer_view.png").is_file()
    widgets = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the explorer widget was not displayed"

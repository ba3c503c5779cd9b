"""`solq demo` (the main job of `make demo`) end to end with a tiny budget: synthetic scenes, the SQR and UQR
models through the Table 2 experiment, Table 4, the mask-coding study on the shipped samples, and the HTML
report with the tables and figures; a second run skips every completed part."""
import json
import re
import time

import pytest

pytest.importorskip("papermill")

# 64-px scenes, a width-32 model, two steps per model; the mask-coding study on two sample images
TINY_MODEL = ["data.train_scales=[48,64]", "data.max_size=64", "data.crop_resize_scales=[64]", "data.crop_min=40",
              "data.crop_max=64", "data.eval_size=64", "model.hidden_dim=32", "model.dim_feedforward=64",
              "model.nheads=2", "model.num_queries=8", "model.vector_hidden_dim=32", "codec.resolution=16",
              "codec.num_coeffs=16", "runtime.num_threads=1", "train.batch_size=2"]
TINY_CODING = {"codecs": ["dct"], "resolutions": [64], "dims": [64], "max_images": 2}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from solq.workbench.demo import run_demo
    from solq.workbench.runner import ensure_kernel

    out = tmp_path_factory.mktemp("demo")
    ensure_kernel("python3", private_dir=out / "jupyter")
    kwargs = dict(steps=2, image_size=64, num_train=6, num_val=3, model_overrides=TINY_MODEL,
                  coding_parameters=TINY_CODING, progress=False)
    start = time.perf_counter()
    html = run_demo(out / "demo_output", **kwargs)
    return out / "demo_output", html, time.perf_counter() - start, kwargs


def test_demo_writes_a_report_with_tables_and_figures(demo, capsys):
    out, html, _, _ = demo
    assert html == out / "report" / "report.html" and html.is_file()
    text = html.read_text()
    for experiment in ("table2_uqr_vs_sqr", "table4_boundary_ap", "mask_coding_upper_bound"):
        assert f"data-experiment='{experiment}' data-scale='smoke'" in text, f"no table of {experiment}"
    assert text.count("<table") >= 3 and "<img" in text and "D-DETR*+UQR" in text
    assert "Problems" not in text, re.findall(r"<li>(.*?)</li>", text)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.tex").is_file()


def test_demo_runs_are_experiment_points(demo):
    out, _, seconds, _ = demo
    print(f"tiny demo: {seconds:.0f} s")
    runs = out / "runs"
    for point in ("table2_uqr_vs_sqr/smoke/mode=sqr", "table2_uqr_vs_sqr/smoke/mode=uqr",
                  "table4_boundary_ap/smoke/default"):
        metrics = json.loads((runs / point / "metrics.json").read_text())
        assert metrics["scale"] == "smoke" and 0.0 <= metrics["segm/AP"] <= 1.0, point
        assert (runs / point / "notebook.ipynb").is_file() and (runs / point / ".complete.json").is_file()
    uqr = json.loads((runs / "table2_uqr_vs_sqr/smoke/mode=uqr/metrics.json").read_text())
    assert uqr["train/steps"] == 2 and uqr["config"]["data"]["root"] == str(out / "synthetic")
    assert "compare/SQR/mean_iou" in uqr  # Figures 3/5 drawn against the SQR point
    assert (runs / "table2_uqr_vs_sqr/smoke/mode=uqr/fig3_fig5_comparison.png").is_file()
    boundary = json.loads((runs / "table4_boundary_ap/smoke/default/metrics.json").read_text())
    assert boundary["checkpoint"].startswith(str(runs / "table2_uqr_vs_sqr/smoke/mode=uqr"))
    coding = list((runs / "mask_coding_upper_bound" / "smoke").glob("*/metrics.json"))
    assert coding, "the mask-coding study did not run"


def test_second_demo_skips_completed_parts(demo, capsys):
    from solq.workbench.demo import run_demo

    out, html, seconds, kwargs = demo
    before = html.stat().st_mtime_ns
    capsys.readouterr()
    start = time.perf_counter()
    run_demo(out, **kwargs)
    printed = capsys.readouterr().out
    assert printed.count(": skipped") == 4 and "4 of 4 parts done" in printed
    assert html.stat().st_mtime_ns > before  # the report is compiled again
    assert time.perf_counter() - start < seconds / 3  # nothing trained again

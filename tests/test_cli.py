"""The `solq` command: help texts, config errors, and eval / predict / bench end to end on a tiny checkpoint."""
import argparse
import json

import pytest
import torch
from pycocotools import mask as mask_utils

from solq.cli import _parser, main
from solq.config import load_config
from solq.models.inference import optimize_for_inference

ENGINE_COMMANDS = ("train", "eval", "predict", "bench")


pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_help_explains_every_option_and_gives_an_example(command, capsys):
    sub = _subparsers()[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and f"solq {command}" in text.split("example:")[1]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.metavar or action.dest]
        assert any(n in text for n in names), f"{command}: {names} not in --help"
        assert action.help and len(action.help) > 10, f"{command} {names}: no help text"


@pytest.mark.parametrize("overrides, expected", [
    (["train.epochs=abc"], "train.epochs: expected an integer"),
    (["train.nonsense=1"], "unknown key 'train.nonsense'"),
    (["nosection.x=1"], "unknown section 'nosection'"),
    (["train.amp=fp8"], "train.amp"),
    (["epochs"], "expected the form section.key=value"),
])
def test_bad_set_gives_a_clear_error(overrides, expected, capsys):
    assert main(["train", "--set", *overrides, "--output", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and expected in err and "Traceback" not in err


def test_bad_config_name_is_reported(capsys):
    assert main(["bench", "--config", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


@pytest.mark.parametrize("argv, steps, jobs", [([], None, 2), (["--steps", "150", "--jobs", "1"], 150, 1)])
def test_demo_passes_steps_to_run_demo(argv, steps, jobs, tmp_path, monkeypatch, capsys):
    import solq.workbench.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append((out, kw)) or out / "report.html")
    assert main(["demo", "--out", str(tmp_path), *argv]) == 0
    assert calls == [(tmp_path, {"steps": demo.DEMO_STEPS if steps is None else steps, "jobs": jobs})]
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["0", "-5", "ten"])
def test_demo_rejects_a_step_count_below_one(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", bad])
    assert exit_info.value.code == 2 and "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "two"])
def test_run_rejects_a_job_count_below_one_before_running_anything(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "experiments/table2_uqr_vs_sqr.yaml", "--jobs", bad])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--jobs" in err and "positive integer" in err


def test_demo_help_names_steps_and_its_default(capsys):
    from solq.workbench.demo import DEMO_STEPS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "--steps N" in text and f"default {DEMO_STEPS}" in text and "solq demo" in text.split("example:")[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A solq checkpoint of an untrained tiny model whose config points at 64-px synthetic data."""
    from solq.data.synthetic import generate
    from solq.models import build_model

    tmp = tmp_path_factory.mktemp("cli")
    generate(tmp / "synth", 2, 3, 64, 0, progress=False)
    cfg = load_config("smoke", [f"data.root={tmp / 'synth'}", "data.eval_size=64", "data.max_size=64",
                                "model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2",
                                "model.num_queries=8", "model.vector_hidden_dim=32", "model.num_classes=9",
                                "codec.resolution=32", "codec.num_coeffs=32", "eval.topk=20"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    path = tmp / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "categories": {1: "disc", 2: "square"}}, path)
    return tmp, path


def test_eval_writes_metrics_and_result_files(tiny_checkpoint):
    tmp, ckpt = tiny_checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--output", str(tmp / "eval"), "--dump", str(tmp / "dump"),
                 "--set", "eval.boundary=true", "--no-progress"]) == 0
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and {"bbox", "segm", "boundary"} <= set(metrics)
    assert set(metrics["boundary"]) == set(metrics["segm"])
    segm = json.loads((tmp / "dump" / "segm_results.json").read_text())
    bbox = json.loads((tmp / "dump" / "bbox_results.json").read_text())
    assert len(segm) == len(bbox) == 3 * 20  # top-k per image, masks included (the release dumps boxes only)
    assert mask_utils.decode(segm[0]["segmentation"]).shape == (64, 64)


def test_eval_and_predict_run_the_folded_copy_unless_told_not_to(tiny_checkpoint, monkeypatch):
    """eval.inference_opt (default true): solq eval and solq predict run optimize_for_inference's model, with the
    same scores as the model as built (outputs equal within 1e-4); false runs the model as built."""
    import importlib

    evaluate_mod = importlib.import_module("solq.engine.evaluate")  # the package exports functions of these names
    predict_mod = importlib.import_module("solq.engine.predict")

    tmp, ckpt = tiny_checkpoint
    calls = []

    def spy(model, **kwargs):
        calls.append(model)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the smoke CNN has norms
        out = optimize_for_inference(model, **kwargs)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in out.modules())  # the norms are folded
        return out

    monkeypatch.setattr(evaluate_mod, "optimize_for_inference", spy)
    monkeypatch.setattr(predict_mod, "optimize_for_inference", spy)
    scores = {}
    for opt in ("true", "false"):
        assert main(["eval", "--checkpoint", str(ckpt), "--output", str(tmp / f"eval-{opt}"), "--no-progress",
                     "--set", f"eval.inference_opt={opt}"]) == 0
        assert main(["predict", "--checkpoint", str(ckpt), str(tmp / "synth" / "val"), "--output",
                     str(tmp / f"pred-{opt}"), "--score-threshold", "0", "--set", f"eval.inference_opt={opt}"]) == 0
        assert len(calls) == 2  # both commands with true, neither with false
        metrics = json.loads((tmp / f"eval-{opt}" / "metrics.json").read_text())
        preds = json.loads((tmp / f"pred-{opt}" / "predictions.json").read_text())
        scores[opt] = (metrics["bbox"]["AP"], metrics["segm"]["AP"], sorted(r["score"] for r in preds))
    assert scores["true"][:2] == pytest.approx(scores["false"][:2], abs=1e-3)
    assert scores["true"][2] == pytest.approx(scores["false"][2], abs=1e-4)


def test_predict_writes_overlays_and_coco_results(tiny_checkpoint, capsys):
    tmp, ckpt = tiny_checkpoint
    images = sorted((tmp / "synth" / "val").iterdir())
    out = tmp / "pred"
    # a folder, a glob and a file (the file also matched by the others: listed once)
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp / "synth" / "val"), str(tmp / "synth" / "train" / "*"),
                 str(images[0]), "--output", str(out), "--score-threshold", "0"]) == 0
    meta = json.loads((out / "images.json").read_text())
    assert len(meta["images"]) == 5 and {"id": 1, "name": "disc"} in meta["categories"]
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == 5 * 20 and {r["image_id"] for r in results} == {m["id"] for m in meta["images"]}
    assert all(len(r["bbox"]) == 4 and "segmentation" in r for r in results)
    assert len(list(out.glob("*.png"))) == 5
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp / "nothing-*.jpg")]) == 1
    assert "nothing-*.jpg" in capsys.readouterr().err


def test_bench_compares_modes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "smoke", "--set", "model.num_classes=5", "model.hidden_dim=32",
                 "model.nheads=2", "model.num_queries=8", "--modes", "uqr,sqr", "--size", "64x96", "--iters", "2",
                 "--warmup", "0", "--train-iters", "1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["uqr", "sqr"]
    uqr, sqr = rows
    assert uqr["params_detector"] == sqr["params_detector"]
    assert 0 < uqr["params_mask_branch"] < sqr["params_mask_branch"]
    assert uqr["params_total"] == uqr["params_detector"] + uqr["params_mask_branch"]
    assert uqr["gflops_total"] > uqr["gflops_mask_branch"] > 0 and uqr["gmacs_total"] == uqr["gflops_total"] / 2
    assert uqr["gflops_detector"] == pytest.approx(sqr["gflops_detector"])  # the same D-DETR in both
    assert sqr["gflops_mask_branch"] > uqr["gflops_mask_branch_last_layer"] > 0
    assert all(r["fps_forward"] > 0 and r["fps_with_postprocess"] > 0 and r["train_steps_per_s"] > 0 for r in rows)
    for r in rows:  # medians with their spreads, from the same number of interleaved iterations
        assert r["timing_iters"] == 2 and r["timing_warmup"] == 0
        assert r["time_forward_s"]["iters"] == r["time_with_postprocess_s"]["iters"] == 2
        for key in ("fps_forward", "fps_with_postprocess", "fps_forward_inference_opt"):
            assert 0 < r[f"{key}_min"] <= r[key] <= r[f"{key}_max"]
        assert r["inference_opt_max_rel_diff"] < 1e-4  # folded norms and channels_last keep the outputs
        # the same FLOPs over the opt copy's median time
        assert r["achieved_gflops_forward_inference_opt"] == pytest.approx(
            r["gflops_total"] / r["time_forward_inference_opt_s"]["median"])
    printed = capsys.readouterr().out
    assert "uqr" in printed and "2 iterations after 0 warm-up rounds" in printed
    assert main(["bench", "--size", "big"]) == 2


def test_bench_times_the_compiled_network_in_the_same_loop(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "smoke", "--set", "model.num_classes=5", "model.hidden_dim=32",
                 "model.nheads=2", "model.num_queries=8", "runtime.compile=eager", "--size", "64x96", "--iters", "2",
                 "--warmup", "0", "--train-iters", "0", "--output", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["compile_backend"] == "eager" and row["compile_s"] > 0
    assert row["compiled_max_rel_diff"] < 1e-5  # tracing alone does not change the arithmetic
    assert row["time_forward_compiled_s"]["iters"] == row["time_forward_s"]["iters"] == 2
    assert 0 < row["fps_forward_compiled_min"] <= row["fps_forward_compiled"] <= row["fps_forward_compiled_max"]
    assert "torch.compile (eager): first call (compiling)" in capsys.readouterr().out
    assert main(["bench", "--config", "smoke", "--set", "runtime.compile=yes"]) == 2  # not a backend name

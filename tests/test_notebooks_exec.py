"""The workbench notebooks run end to end through papermill with tiny parameters and write metrics.json with
the keys the report reads; invalid parameters stop the validation cell with a message naming them. Also the
functions behind the training notebooks (solq.workbench.experiment).

One tiny UQR model (quickstart) is shared by the boundary_ap and efficiency notebooks; the SQR model of
uqr_vs_sqr is the comparison of the UQR one."""
import json
from pathlib import Path

import nbformat
import pytest
from tiny_overrides import TINY  # 64-px scenes, width 32: a training step takes a fraction of a second

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from solq.workbench.runner import ensure_kernel

    root = tmp_path_factory.mktemp("workbench_notebooks")
    ensure_kernel("python3", private_dir=root / "jupyter")
    return root


def _execute(workdir: Path, name: str, tag: str, **params) -> tuple[Path, dict, nbformat.NotebookNode]:
    out = workdir / tag
    executed = workdir / f"{tag}.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(executed),
                               parameters={"output_dir": str(out), **params}, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False, execution_timeout=600)  # a hung kernel fails
    return out, json.loads((out / "metrics.json").read_text()), nbformat.read(executed, as_version=4)


def _train(workdir: Path, name: str, tag: str, **params):
    base = {"data_root": str(workdir / "synthetic"), "max_steps": 2, "overrides": TINY}
    return _execute(workdir, name, tag, **{**base, **params})


def _images_shown(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _assert_coco(metrics: dict, groups=("bbox", "segm")) -> None:
    for g in groups:
        for k in COCO_KEYS:
            v = metrics[f"{g}/{k}"]
            assert v == -1.0 or 0.0 <= v <= 1.0, (g, k, v)  # fractions (-1: no object of that size)


@pytest.fixture(scope="module")
def quickstart(workdir):
    return _train(workdir, "quickstart", "quickstart", num_images=2, score_threshold=0.0)


@pytest.fixture(scope="module")
def sqr_run(workdir):
    return _train(workdir, "uqr_vs_sqr", "sqr", mode="sqr", checkpoint="", num_gallery_images=1)  # "": train


def test_quickstart_trains_evaluates_and_draws(quickstart):
    out, metrics, nb = quickstart
    _assert_coco(metrics)
    assert metrics["train/steps"] == 2 and metrics["eval/num_images"] == 3 and metrics["mode"] == "uqr"
    assert metrics["gallery/objects"] > 0 and metrics["gallery/detections"] > 0  # threshold 0 draws every query
    assert (out / "run" / "checkpoint.pth").is_file()
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"training_scenes.png", "training_curves.png", "predictions.png"} and metrics["figures"] == 3
    assert _images_shown(nb) == 3
    assert metrics["config"]["model"]["hidden_dim"] == 32 and metrics["config"]["model"]["num_classes"] > 0
    assert metrics["code_version"]


def test_ablation_fits_the_codec_and_reports_its_upper_bound(workdir):
    out, metrics, _ = _train(workdir, "ablation", "ablation_pca", codec="pca", vector_loss_stages=1,
                             vector_loss_coef=2.0, num_gallery_images=0)
    _assert_coco(metrics)
    assert (metrics["codec"], metrics["vector_loss_stages"], metrics["vector_loss_coef"]) == ("pca", 1, 2.0)
    cfg = metrics["config"]
    assert cfg["codec"]["name"] == "pca" and Path(cfg["codec"]["file"]).is_file()  # fitted into the run folder
    assert cfg["loss"]["vector_loss_stages"] == 1 and cfg["loss"]["vector_loss_coef"] == 2.0
    bound = metrics["upper_bound/mask_AP"]
    assert 0.0 < bound <= 1.0 and 0.0 < metrics["upper_bound/mask_iou"] <= 1.0
    assert metrics["segm/AP"] <= bound  # two steps of training stay below what the coding allows
    assert {p.name for p in out.glob("*.png")} == {"training_curves.png"}


def test_uqr_vs_sqr_compares_the_two_models(workdir, sqr_run):
    sqr_out, sqr_metrics, _ = sqr_run
    assert sqr_metrics["mode"] == "sqr" and sqr_metrics["config"]["model"]["mode"] == "sqr"
    _assert_coco(sqr_metrics)
    assert (sqr_out / "predictions.png").is_file()  # sqr: no comparison, its own gallery
    out, metrics, nb = _train(workdir, "uqr_vs_sqr", "uqr", mode="uqr", checkpoint="", compare_run=str(sqr_out),
                              num_gallery_images=2, score_threshold=0.0)
    assert metrics["compare/checkpoint"] == str(sqr_out / "run" / "checkpoint.pth")
    for name in ("SQR", "UQR"):
        assert 0.0 <= metrics[f"compare/{name}/mean_iou"] <= 1.0
    assert (out / "fig3_fig5_comparison.png").is_file() and not (out / "predictions.png").exists()
    assert _images_shown(nb) == metrics["figures"] == 2


def test_uqr_vs_sqr_opens_on_the_shipped_models(workdir):
    """By default the notebook trains nothing: it reads smoke-uqr, compares with smoke-sqr (Figures 3/5) and reports
    the metrics stored in the file; a checkpoint of another mode is refused."""
    import time

    import torch
    from papermill.exceptions import PapermillExecutionError

    from solq.data.synthetic import generate
    from solq.models import pretrained

    scenes = workdir / "shipped_scenes"
    generate(scenes, 1, 2, 64, 0, progress=False)  # two small val images for the figures
    start = time.perf_counter()
    out, metrics, nb = _execute(workdir, "uqr_vs_sqr", "shipped", data_root=str(scenes), num_gallery_images=1)
    seconds = time.perf_counter() - start
    stored = torch.load(pretrained.path("smoke-uqr"), weights_only=True)["extra"]
    assert metrics["model/shipped"] == "smoke-uqr" and metrics["model/mode"] == metrics["mode"] == "uqr"
    assert metrics["train/steps"] == metrics["model/steps"] == stored["steps"] and metrics["train/seconds"] == 0
    assert metrics["segm/AP"] == stored["metrics"]["segm/AP"] and metrics["bbox/AP"] == stored["metrics"]["bbox/AP"]
    assert metrics["compare/checkpoint"] == str(pretrained.path("smoke-sqr"))
    assert 0.0 <= metrics["compare/UQR/mean_iou"] <= 1.0 and 0.0 <= metrics["compare/SQR/mean_iou"] <= 1.0
    assert {p.name for p in out.glob("*.png")} == {"fig3_fig5_comparison.png"} and not (out / "run").exists()
    assert _images_shown(nb) == metrics["figures"] == 1
    assert seconds < 60, f"opening on the shipped models took {seconds:.0f} s"
    with pytest.raises(PapermillExecutionError, match="'smoke-uqr' is a uqr model but mode is 'sqr'"):
        _execute(workdir, "uqr_vs_sqr", "shipped_sqr", data_root=str(scenes), mode="sqr")


def test_boundary_ap_of_a_shared_checkpoint(workdir, quickstart):
    run = quickstart[0] / "run"
    out, metrics, _ = _execute(workdir, "boundary_ap", "boundary", checkpoint=str(run),
                               data_root=str(workdir / "synthetic"), max_images=2, score_threshold=0.0)
    _assert_coco(metrics, ("bbox", "segm", "boundary"))
    assert metrics["eval/num_images"] == 2 and metrics["method"] == "SOLQ"
    assert metrics["checkpoint"] == metrics["model/checkpoint"] == str(run / "checkpoint.pth")
    assert (metrics["model/mode"], metrics["model/steps"], metrics["model/shipped"]) == ("uqr", 2, "")
    # Boundary AP takes the min of mask and boundary IoU per pair, so it never exceeds mask AP at IoU 0.5
    assert metrics["boundary/AP50"] <= metrics["segm/AP50"] + 1e-9
    assert {p.name for p in out.glob("*.png")} == {"boundary_ap_by_size.png", "boundary_bands.png"}


def test_efficiency_measures_costs_and_reads_the_run(workdir, quickstart):
    qs_out, qs_metrics, _ = quickstart
    out, metrics, _ = _execute(workdir, "efficiency", "efficiency", mode="uqr", checkpoint_uqr=str(qs_out),
                               height=64, width=96, warmup=0, iterations=1, train_iterations=0,
                               overrides=["model.hidden_dim=32", "model.nheads=2", "model.num_queries=8",
                                          "model.vector_hidden_dim=32", "runtime.num_threads=1"])
    for key in ("params_detector", "params_mask_branch", "gmacs_detector", "gmacs_mask_branch",
                "gmacs_mask_branch_last_layer", "gmacs_decode_one_mask", "fps_forward"):  # report's Table 5 keys
        assert metrics[key] > 0, key
    # the vector MLP is the UQR mask branch: 32 -> 32 -> 32 -> n_k=128 (smoke codec), weights and biases
    assert metrics["params_mask_branch"] == 32 * 32 + 32 + 32 * 32 + 32 + 32 * 128 + 128
    # ... and its multiply-adds on one decoder layer's 8 queries (bias adds not counted)
    assert metrics["gmacs_mask_branch_last_layer"] == pytest.approx(8 * (32 * 32 + 32 * 32 + 32 * 128) / 1e9)
    assert metrics["segm/AP"] == qs_metrics["segm/AP"]
    # the model whose mask AP is reported is named: the quickstart's run, 2 steps of batch 2
    assert metrics["model/checkpoint"] == str(qs_out / "run" / "checkpoint.pth")
    assert (metrics["model/mode"], metrics["model/steps"], metrics["model/batch_per_process"]) == ("uqr", 2, 2)
    assert (out / "cost_uqr.png").is_file()


def test_invalid_parameter_stops_the_validation_cell(workdir):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as info:
        _train(workdir, "ablation", "invalid", codec="jpeg")
    err = info.value
    assert err.ename == "ValueError" and "'codec'" in err.evalue and "'jpeg' is not one of" in err.evalue
    # the third executed cell: after the parameters and papermill's injected ones, the validation
    assert err.exec_count == 3 and "validate_parameters(" in err.source
    assert not (workdir / "invalid" / "run").exists()  # nothing was trained


# ------------------------------------------------------------------ solq.workbench.experiment
def _params(tmp_path, **kw):
    base = {"scale": "smoke", "seed": 3, "preset": "smoke", "backbone": "", "dataset": "synthetic",
            "data_root": str(tmp_path / "synthetic"), "coco_root": "", "device": "cpu", "epochs": 4, "lr_drop": 3,
            "batch_size": 2, "max_steps": 5, "eval_every": 0, "nproc_per_node": 1, "overrides": [],
            "output_dir": str(tmp_path)}
    return {**base, **kw}


def test_config_from_parameters_maps_each_factor(tmp_path):
    from solq.workbench.experiment import config_from_parameters

    cfg = config_from_parameters(_params(tmp_path, mode="det", codec="sparse", mask_resolution=32, num_coeffs=20,
                                         vector_loss_coef=0.7, vector_loss_stages=2, backbone="resnet34",
                                         overrides=["model.num_queries=7", "train.max_steps=9"]),
                                 run_dir=tmp_path / "run")
    assert (cfg.model.mode, cfg.model.backbone, cfg.model.num_queries) == ("det", "resnet34", 7)
    assert (cfg.codec.name, cfg.codec.resolution, cfg.codec.num_coeffs) == ("sparse", 32, 20)
    assert (cfg.loss.vector_loss_coef, cfg.loss.vector_loss_stages) == (0.7, 2)
    assert (cfg.train.epochs, cfg.train.lr_drop, cfg.train.batch_size, cfg.train.seed) == (4, 3, 2, 3)
    assert cfg.train.max_steps == 9  # overrides come last
    assert cfg.data.root == str(tmp_path / "synthetic") and cfg.runtime.output_dir == str(tmp_path / "run")
    assert cfg.runtime.resume == "auto" and cfg.model.hidden_dim == 96  # the smoke preset's width
    rel = config_from_parameters(_params(tmp_path, data_root="data/synthetic"), run_dir=tmp_path / "run")
    assert rel.data.root == str(ROOT / "data" / "synthetic")  # relative paths start at the project root
    coco = config_from_parameters(_params(tmp_path, dataset="coco", coco_root="/data/coco"), run_dir=tmp_path)
    assert (coco.data.dataset, coco.data.root) == ("coco", "/data/coco")


def test_config_errors_name_the_key(tmp_path):
    from solq.workbench.experiment import config_or_error

    with pytest.raises(ValueError, match=r"notebook parameters.*loss\.vector_loss_stages"):
        config_or_error(_params(tmp_path, vector_loss_stages=5), run_dir=tmp_path)  # smoke has 2 decoder layers
    with pytest.raises(ValueError, match=r"codec\.num_coeffs \(300\) exceeds"):
        config_or_error(_params(tmp_path, mask_resolution=16, num_coeffs=300), run_dir=tmp_path)
    with pytest.raises(ValueError, match="neither a preset"):
        config_or_error(_params(tmp_path, preset="no-such-preset"), run_dir=tmp_path)


def test_run_folder_of_other_parameters_is_replaced(tmp_path):
    from solq.workbench.experiment import _prepare_run_dir, config_from_parameters

    run = tmp_path / "run"
    cfg = config_from_parameters(_params(tmp_path), run_dir=run)
    run.mkdir()
    saved = config_from_parameters(_params(tmp_path), run_dir=run)
    saved.model.num_classes, saved.runtime.resume = 5, ""  # as the engine writes it: classes filled in
    saved.to_yaml(run / "config.yaml")
    (run / "checkpoint.pth").write_bytes(b"x")
    _prepare_run_dir(cfg, run)
    assert (run / "checkpoint.pth").is_file()  # same run: kept for resume=auto
    other = config_from_parameters(_params(tmp_path, vector_loss_coef=1.0), run_dir=run)
    _prepare_run_dir(other, run)
    assert not run.exists()  # another configuration: never resumed


def test_flat_and_read_run_metrics(tmp_path):
    from solq.workbench.experiment import flat_metrics, read_run_metrics

    engine = {"epoch": 2, "step": 10, "bbox": {"AP": 0.25, "APs": -1.0}, "segm": {"AP": 0.125},
              "loss": {"loss_ce": 1.5}, "num_images": 4, "eval_seconds": 2.0}
    flat = flat_metrics(engine)
    assert flat == {"bbox/AP": 0.25, "bbox/APs": -1.0, "segm/AP": 0.125, "loss/loss_ce": 1.5,
                    "eval/num_images": 4, "eval/seconds": 2.0}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(engine))
    assert read_run_metrics(tmp_path / "run") == flat  # the engine's nested file
    (tmp_path / "metrics.json").write_text(json.dumps({"segm/AP": 0.5, "mode": "uqr", "config": {}}))
    assert read_run_metrics(tmp_path) == {"segm/AP": 0.5}  # a notebook's flat file
    assert read_run_metrics(tmp_path / "missing") is None


def test_torchrun_command_launches_solq_train():
    import sys

    from solq.workbench.experiment import torchrun_command

    cmd = torchrun_command("/r/requested.yaml", "/r", 8)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=8" in cmd
    assert cmd[cmd.index("-m", 3) + 1:][:4] == ["solq.cli", "train", "--config", "/r/requested.yaml"]
    assert cmd[cmd.index("--resume") + 1] == "auto" and cmd[cmd.index("--output") + 1] == "/r"


def test_stored_metrics_and_model_facts(tmp_path):
    import torch

    from solq.models import pretrained
    from solq.workbench.trained_model import model_facts, stored_metrics

    stored = torch.load(pretrained.path("smoke-sqr"), weights_only=True)
    metrics, where = stored_metrics("smoke-sqr")  # a shipped file: the metrics stored in it
    assert metrics["segm/AP"] == stored["extra"]["metrics"]["segm/AP"] and "seed 1" in where
    facts = model_facts(pretrained.path("smoke-sqr"))
    assert facts["model/shipped"] == "smoke-sqr" and facts["model/mode"] == "sqr"
    assert (facts["model/steps"], facts["model/batch_per_process"], facts["model/train_seed"]) == (
        stored["extra"]["steps"], stored["extra"]["batch_size"], stored["extra"]["seed"])
    point = tmp_path / "point"  # an experiment point: its flat metrics.json, the checkpoint in run/
    (point / "run").mkdir(parents=True)
    (point / "run" / "checkpoint.pth").write_bytes(b"not read")
    (point / "run" / "metrics.json").write_text(json.dumps({"segm": {"AP": 0.25}}))
    assert stored_metrics(point)[0] == {"segm/AP": 0.25}  # no point file yet: the run's (the engine's, flattened)
    (point / "metrics.json").write_text(json.dumps({"segm/AP": 0.5, "mode": "uqr"}))
    assert stored_metrics(point) == ({"segm/AP": 0.5}, f"recorded in {point / 'metrics.json'}")
    assert stored_metrics(point / "run" / "checkpoint.pth")[0] == {"segm/AP": 0.25}  # the engine's, flattened
    assert stored_metrics(tmp_path / "nothing")[0] is None

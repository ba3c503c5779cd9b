"""The shipped teaching models (``smoke-uqr``, ``smoke-sqr``): reachable by name everywhere a checkpoint is taken,
plain ``weights_only`` files of at most 15 MB, and still scoring what they scored when they were made (the metrics
stored in the file, which the README quotes) on the same deterministic synthetic val scenes."""
import json

import pytest
import torch

from solq.data.synthetic import generate
from solq.engine.checkpoint import build_from_checkpoint, load_model_weights
from solq.engine.evaluate import run_evaluation
from solq.models import pretrained
from solq.viz.predictor import resolve_checkpoint
from solq.workbench.notebook import Param, checkpoint_path, validate_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["smoke-uqr", "smoke-sqr"])
def test_shipped_file_by_name(name):
    path = pretrained.path(name)
    assert name in pretrained.names() and path.stat().st_size <= 15 * 2 ** 20
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert {"model", "config", "categories", "extra"} <= set(state)
    assert state["config"]["model"]["mode"] == name.split("-")[1]
    assert state["config"]["data"]["root"] == "data/synthetic"  # no folder of the machine that made it
    assert set(state["extra"]["metrics"]) >= {"bbox/AP", "segm/AP"}
    assert resolve_checkpoint(name) == path == checkpoint_path(name)
    config, weights, _ = load_model_weights(name)
    assert config["model"]["mode"] == name.split("-")[1] and weights.keys() == state["model"].keys()
    assert validate_parameters({"checkpoint": name}, {"checkpoint": Param(str, path="checkpoint")})
    with pytest.raises(ValueError, match="does not exist"):
        validate_parameters({"checkpoint": "no-such-model"}, {"checkpoint": Param(str, path="checkpoint")})


def _scores_as_stored(name: str, tmp_path) -> dict:
    """Evaluate the shipped model ``name`` on the val scenes it was scored on (100 of seed 1 at 256 px; each image
    seeded by seed, split and index, so the training split's size does not change them) and assert that its box
    AP, mask AP and mask AP50 are the stored ones within 0.5 points. Returns the metrics."""
    stored = torch.load(pretrained.path(name), weights_only=True)["extra"]
    assert "seed 1" in stored["scored_on"] and "256 px" in stored["scored_on"]
    generate(tmp_path, 1, 100, 256, 0, val_seed=1, progress=False)
    metrics = run_evaluation(name, overrides=[f"data.root={tmp_path}", "runtime.device=cpu", "eval.boundary=false"],
                             progress_bar=False)
    for key in ("bbox/AP", "segm/AP", "segm/AP50"):
        kind, metric = key.split("/")
        assert metrics[kind][metric] == pytest.approx(stored["metrics"][key], abs=0.005), (key, json.dumps(metrics))
    return metrics


def test_uqr_still_scores_what_it_scored(tmp_path, capsys):
    metrics = _scores_as_stored("smoke-uqr", tmp_path)
    assert metrics["bbox"]["AP"] > 0.3 and metrics["segm"]["AP"] > 0.2  # a model that finds the objects


def test_sqr_still_scores_what_it_scored(tmp_path):
    _scores_as_stored("smoke-sqr", tmp_path)


def test_sqr_file_from_before_the_mask_features_option_loads_with_the_encoder_output(tmp_path):
    """SQR checkpoints made before model.sqr_mask_features existed fed the mask head the encoder output: a stored
    config without the key loads as "encoder", not as the new default (the release's "input_proj"); a stored
    value loads as stored."""
    state = torch.load(pretrained.path("smoke-sqr"), weights_only=True)
    stored = state["config"]["model"].get("sqr_mask_features", "encoder")
    assert build_from_checkpoint("smoke-sqr")[1].mask_features == stored
    state["config"]["model"].pop("sqr_mask_features", None)
    torch.save(state, tmp_path / "old_sqr.pt")
    cfg, model, _, _, _ = build_from_checkpoint(str(tmp_path / "old_sqr.pt"))
    assert cfg.model.sqr_mask_features == "encoder" and model.mask_features == "encoder"


@pytest.mark.parametrize("name", ["smoke-uqr", "smoke-sqr"])
def test_the_script_trains_the_settings_stored_in_the_shipped_file(name, teaching_recipe):
    """scripts/make_teaching_models.sh pins the model settings the shipped files were made with (its RECIPE):
    the smoke preset with those overrides has the model and codec sections stored in the file, except keys the
    file predates, which load with the behaviour it was trained with."""
    from solq.config import load_config
    from solq.engine.checkpoint import stored_config

    mode = name.split("-")[1]
    trained = load_config("smoke", overrides=teaching_recipe[mode] + [f"model.mode={mode}"]).to_dict()
    saved = torch.load(pretrained.path(name), weights_only=True)["config"]
    stored = stored_config(saved).to_dict()
    for section in ("model", "codec"):
        differ = {k: (trained[section][k], stored[section][k]) for k in trained[section]
                  if trained[section][k] != stored[section][k] and k in saved[section]}
        assert set(differ) <= {"num_classes"}, (section, differ)  # 0 = from the data; the file stores 9
    assert trained["train"]["batch_size"] == saved["train"]["batch_size"] and trained["data"] == saved["data"] | {
        "root": trained["data"]["root"]}

"""The typed config: presets, YAML round trip, overrides with type checking and clear errors."""
import pytest

from solq.config import PRESETS, Config, ConfigError, load_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_and_round_trip_through_yaml(preset, tmp_path):
    cfg = load_config(preset)
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    again = load_config(path)
    assert again == cfg


def test_preset_sizes_follow_the_reference():
    assert load_config("release-r50").model.hidden_dim == 384
    paper = load_config("paper-r50").model
    assert (paper.hidden_dim, paper.dim_feedforward, paper.num_queries) == (256, 1024, 300)
    assert (paper.backbone_norm, paper.freeze_stages, paper.two_stage) == ("frozen", 2, False)  # the release
    smoke = load_config("smoke")  # from scratch: a trainable norm, nothing frozen, the backbone at the full lr
    assert (smoke.model.backbone, smoke.model.backbone_norm, smoke.model.freeze_stages) == ("small", "batch", 0)
    assert smoke.train.lr_backbone == smoke.train.lr and smoke.model.backbone_weights == "synthetic-small"


def test_overrides_are_typed():
    cfg = load_config("smoke", ["train.epochs=7", "train.lr=1e-3", "model.with_box_refine=false",
                                "data.train_scales=[64, 96]", "codec.threshold=0.5"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.with_box_refine is False
    assert cfg.data.train_scales == [64, 96]
    assert cfg.codec.threshold == "0.5"


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "train.epoch"),
    ("nosuch.key=1", "nosuch"),
    ("train.epochs=three", "train.epochs"),
    ("model.with_box_refine=maybe", "model.with_box_refine"),
    ("model.mode=panoptic", "model.mode"),
    ("model.hidden_dim=100", "hidden_dim"),
    ("epochs", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("smoke", [override])


def test_yaml_file_with_preset_and_unknown_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("preset: smoke\ntrain:\n  epochs: 9\n")
    cfg = load_config(good)
    assert cfg.train.epochs == 9 and cfg.model.backbone == "small"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 9\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(bad)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_live_in_one_place():
    assert Config().train.lr == pytest.approx(2e-4)
    assert Config().loss.set_cost_bbox == 5.0

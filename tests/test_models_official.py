"""The authors' checkpoint layout: key set, round trip, duplicates, leftovers, refusal of unsafe pickles."""
import argparse
import collections
import warnings

import pytest
import torch

from solq.config import load_config
from tiny_overrides import RELEASE_LIKE
from solq.models import build_detector
from solq.models.official import OfficialCheckpointError, load_official_checkpoint, to_official_state_dict

# reference §2.11: keys per top-level module of SOLQ.state_dict() at the release defaults
RELEASE_KEYS = {"transformer": 267, "class_embed": 12, "bbox_embed": 36, "vector_embed": 36, "query_embed": 1,
                "input_proj": 16, "backbone": 265}


@pytest.fixture(scope="module")
def release_r50():
    torch.manual_seed(0)
    m = build_detector(load_config("release-r50", ["model.num_classes=91"])).eval()
    with torch.no_grad():  # move away from the structured init so the round trip compares real weights
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return m


def _image(H=64, W=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, H, W, generator=g), torch.zeros(1, H, W, dtype=torch.bool)


def test_release_key_set(release_r50):
    sd = to_official_state_dict(release_r50)
    assert len(sd) == 633
    assert collections.Counter(k.split(".", 1)[0] for k in sd) == RELEASE_KEYS
    assert sd["query_embed.weight"].shape == (300, 768)
    assert sd["input_proj.3.0.weight"].shape == (384, 2048, 3, 3)
    assert sd["transformer.decoder.layers.0.self_attn.in_proj_weight"].shape == (1152, 384)
    assert sd["vector_embed.5.layers.1.weight"] is sd["vector_embed.0.layers.1.weight"]
    assert torch.equal(sd["transformer.decoder.bbox_embed.3.layers.2.bias"], sd["bbox_embed.3.layers.2.bias"])
    assert "backbone.0.body.bn1.running_var" in sd and not any("num_batches_tracked" in k for k in sd)
    assert not any(".fc." in k for k in sd)


def test_round_trip_gives_identical_outputs(release_r50):
    args = argparse.Namespace(nheads=8, activation="relu", dilation=False, dropout=0.1, gt_mask_len=128)
    ckpt = {"model": to_official_state_dict(release_r50), "args": args, "epoch": 49}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean release checkpoint loads without any warning
        cfg, sd, report = load_official_checkpoint(ckpt, return_report=True)
    for key in ("hidden_dim", "num_queries", "enc_layers", "dec_layers", "num_classes", "num_feature_levels",
                "backbone", "with_box_refine", "two_stage", "vector_hidden_dim", "dim_feedforward", "nheads",
                "enc_n_points", "dec_n_points", "mode"):
        assert getattr(cfg.model, key) == getattr(load_config("release-r50").model, key) or key == "num_classes"
    assert cfg.model.num_classes == 91 and cfg.codec.num_coeffs == 256 and cfg.codec.resolution == 128
    assert report["assumed"] == {} and report["unused"] == [] and report["missing"] == []
    assert len(report["dropped"]) == 36 + 30  # decoder box-head duplicates + vector_embed.1-5
    torch.manual_seed(123)
    other = build_detector(cfg).eval()
    other.load_state_dict(sd, strict=True)
    x, mask = _image()
    with torch.no_grad():
        a, b = release_r50(x, mask), other(x, mask)
    for k in ("pred_logits", "pred_boxes", "pred_vectors"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["aux_outputs"][2]["pred_boxes"], b["aux_outputs"][2]["pred_boxes"])


@pytest.mark.parametrize("variant", [
    {"mode": "det", "with_box_refine": False, "num_feature_levels": 1},
    {"two_stage": True, "num_queries": 12, "num_feature_levels": 3, "backbone": "resnet34"},
])
def test_round_trip_variants(variant, tmp_path):
    over = {"backbone": "resnet18", "hidden_dim": 32, "dim_feedforward": 48, "nheads": 4, "enc_layers": 1,
            "dec_layers": 2, "num_queries": 7, "num_classes": 4, "vector_hidden_dim": 40, "dropout": 0.0}
    over.update(variant)
    cfg = load_config("smoke", RELEASE_LIKE + [f"model.{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    m = build_detector(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = to_official_state_dict(m)
    if cfg.model.two_stage:
        assert "transformer.decoder.class_embed.2.weight" in official and "query_embed.weight" not in official
    if not cfg.model.with_box_refine:
        assert not any(k.startswith("transformer.decoder.bbox_embed") for k in official)
    path = tmp_path / "ckpt.pth"  # a file as the release writes it, args Namespace included
    torch.save({"model": official, "args": argparse.Namespace(nheads=4, dropout=0.0), "epoch": 3}, path)
    with warnings.catch_warnings(record=True):
        cfg2, sd, report = load_official_checkpoint(path, return_report=True)
    for key in over:
        if key == "vector_hidden_dim" and cfg.model.mode == "det":
            continue
        if key != "num_queries" or not cfg.model.two_stage:
            assert getattr(cfg2.model, key) == getattr(cfg.model, key), key
    if cfg.model.two_stage:  # the number of proposals is not in any tensor
        assert "num_queries" in report["assumed"]
        cfg2.model.num_queries = cfg.model.num_queries
    m2 = build_detector(cfg2).eval()
    m2.load_state_dict(sd, strict=True)
    x, mask = _image(96, 96)
    with torch.no_grad():
        a, b = m(x, mask), m2(x, mask)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


def test_standardized_codes_fold_into_the_release_head():
    over = ["model.backbone=resnet18", "model.hidden_dim=32", "model.dim_feedforward=48", "model.nheads=4",
            "model.enc_layers=1", "model.dec_layers=2", "model.num_queries=7", "model.num_classes=4",
            "model.vector_hidden_dim=40", "model.dropout=0.0"]
    cfg = load_config("smoke", RELEASE_LIKE + over + ["model.vector_standardize=true"])
    torch.manual_seed(0)
    m = build_detector(cfg).eval()
    dim = m.vector_std.numel()
    m.set_vector_statistics(torch.linspace(-2, 30, dim), torch.linspace(0.5, 9, dim))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = to_official_state_dict(m)
    assert not any("vector_mean" in k or "vector_std" in k for k in official)
    with warnings.catch_warnings(record=True):
        cfg2, sd = load_official_checkpoint({"model": official, "args": argparse.Namespace(nheads=4, dropout=0.0)})
    assert not cfg2.model.vector_standardize
    m2 = build_detector(cfg2).eval()
    m2.load_state_dict(sd, strict=True)
    x, mask = _image(96, 96)
    with torch.no_grad():
        a, b = m(x, mask), m2(x, mask)
    torch.testing.assert_close(b["pred_vectors"], a["pred_vectors"], rtol=1e-5, atol=1e-4)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_leftovers_dropped_and_problems_reported(release_r50):
    sd = dict(to_official_state_dict(release_r50))
    sd["total_ops"] = torch.zeros(1, dtype=torch.float64)
    sd["backbone.0.body.layer1.0.conv1.total_params"] = torch.zeros(1)
    sd["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    sd["mask_head.lay1.weight"] = torch.zeros(3)  # e.g. an SQR-baseline leftover we do not use
    sd["vector_embed.3.layers.0.bias"] = sd["vector_embed.0.layers.0.bias"] + 1  # untied copy
    with pytest.warns(UserWarning) as rec:
        cfg, state, report = load_official_checkpoint({"model": sd}, return_report=True)
    text = " ".join(str(w.message) for w in rec)
    assert "vector_embed.3.layers.0.bias" in text and "mask_head.lay1.weight" in text
    assert report["unused"] == ["mask_head.lay1.weight"]
    for k in ("total_ops", "backbone.0.body.layer1.0.conv1.total_params", "backbone.0.body.bn1.num_batches_tracked"):
        assert k in report["dropped"] and k not in state
    assert torch.equal(state["vector_embed.layers.0.bias"], sd["vector_embed.0.layers.0.bias"])


class _Arbitrary:
    def __init__(self):
        self.x = 1


def test_refuses_pickles_that_need_arbitrary_objects(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"transformer.level_embed": torch.zeros(4, 8)}, "extra": _Arbitrary()}, path)
    with pytest.raises(OfficialCheckpointError, match="unsafe.pth.*refusing.*_Arbitrary"):
        load_official_checkpoint(path)


def test_rejects_non_detr_state_dict():
    with pytest.raises(OfficialCheckpointError, match="level_embed"):
        load_official_checkpoint({"model": {"conv.weight": torch.zeros(1)}})

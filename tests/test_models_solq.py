"""The SOLQ network: parameter counts vs the release, gradients, initial outputs, padding, shapes."""
import math

import pytest
import torch

from solq.config import ConfigError, TrainConfig, load_config
from tiny_overrides import RELEASE_LIKE
from solq.models import build_detector, build_model
from solq.models.position_encoding import PositionEmbeddingSine
from solq.models.transformer import DeformableEncoder, valid_ratio


def _tiny(**model):
    """A few-hundred-k-parameter config: ResNet-18, width 32, 1+2 layers, 10 queries, 4 levels."""
    base = {"backbone": "resnet18", "hidden_dim": 32, "dim_feedforward": 64, "nheads": 4, "enc_layers": 1,
            "dec_layers": 2, "num_queries": 10, "num_feature_levels": 4, "enc_n_points": 2, "dec_n_points": 2,
            "vector_hidden_dim": 48, "dropout": 0.0, "num_classes": 5}
    base.update(model)
    cfg = load_config("smoke", RELEASE_LIKE + [f"model.{k}={v}" for k, v in base.items()] + ["codec.num_coeffs=20"])
    torch.manual_seed(0)
    return cfg, build_detector(cfg)


def _batch(B=2, H=128, W=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g), torch.zeros(B, H, W, dtype=torch.bool)


@pytest.fixture(scope="module")
def release_r50():
    torch.manual_seed(0)
    return build_detector(load_config("release-r50", ["model.num_classes=91"]))


def test_release_r50_parameter_counts(release_r50):
    m = release_r50
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 53_971_260  # what the release's main.py prints at width 384
    assert sum(p.numel() for p in m.parameters()) == 54_193_660  # incl. frozen stem + layer1
    # the release's optimiser groups (reference §1.3) come out of our parameter names unchanged
    optim = pytest.importorskip("solq.engine.optim")
    t = TrainConfig()
    groups = {g["name"]: g for g in optim.param_groups(m, lr=t.lr, lr_backbone=t.lr_backbone,
                                                        lr_linear_proj_mult=t.lr_linear_proj_mult, weight_decay=0.0)}
    counts = {k: (len(g["params"]), sum(p.numel() for p in g["params"])) for k, g in groups.items()}
    assert counts["default"][0] == 276 and counts["backbone"][0] == 42 and counts["linear_proj"][0] == 26
    assert round(counts["linear_proj"][1] / 1e6, 2) == 1.18 and round(counts["backbone"][1] / 1e6, 2) == 23.23
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5) and groups["backbone"]["lr"] == pytest.approx(2e-5)


def test_width_256_parameter_count():
    torch.manual_seed(0)
    with torch.device("meta"):  # counting needs no storage
        m = build_detector(load_config("paper-r50", ["model.num_classes=91"]))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 42_202_428


def test_initial_outputs_as_reference(release_r50):
    m = release_r50.eval()
    x, mask = _batch(1, 64, 64)
    with torch.no_grad():
        out = m(x, mask, return_attention=True)
    layers = out["aux_outputs"] + [{k: out[k] for k in ("pred_logits", "pred_boxes", "pred_vectors")}]
    assert len(layers) == 6
    want_vec = torch.full((256,), -2.0)
    want_vec[:2] = 0
    for lo in layers:
        assert torch.equal(lo["pred_vectors"], want_vec.expand_as(lo["pred_vectors"]))
    for head in m.class_embed:
        torch.testing.assert_close(head.bias.sigmoid(), torch.full((91,), 0.01))
    # only box head 0 has the -2 size bias; all box heads start at zero output, so every layer's box is
    # (reference centre, sigmoid(-2)) at init
    assert torch.all(m.bbox_embed[0].layers[-1].bias[2:] == -2) and torch.all(m.bbox_embed[1].layers[-1].bias == 0)
    b0 = layers[0]["pred_boxes"]
    torch.testing.assert_close(b0[..., :2], out["init_reference"])
    torch.testing.assert_close(b0[..., 2:], torch.full_like(b0[..., 2:], 1 / (1 + math.e ** 2)))
    torch.testing.assert_close(layers[-1]["pred_boxes"], b0)


@pytest.mark.parametrize("variant", [
    {},  # box refine, 4 levels (one extra from C5)
    {"two_stage": True, "with_box_refine": True},
    {"mode": "det", "with_box_refine": False, "num_feature_levels": 1},
    {"num_feature_levels": 3, "activation": "glu"},
])
def test_every_trainable_parameter_gets_a_gradient(variant):
    cfg, m = _tiny(**variant)
    m.train()
    with torch.no_grad():  # zero-initialised last layers would block gradients to earlier ones
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, mask = _batch(2)
    mask[1, :, 96:] = True
    out = m(x, mask)
    terms = [out]
    terms += out.get("aux_outputs", [])
    terms += [out["enc_outputs"]] if "enc_outputs" in out else []
    loss = sum(t[k].sum() for t in terms for k in ("pred_logits", "pred_boxes", "pred_vectors") if k in t)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.0.body.") and "layer2" not in n for n in frozen)
    assert ("pred_vectors" in out) == (cfg.model.mode == "uqr")


def test_batched_with_padding_equals_one_by_one():
    _, m = _tiny()
    m.eval()
    x, mask = _batch(2)
    mask[1, 80:, :] = True
    mask[1, :, 112:] = True
    x[1][:, mask[1]] = 0
    with torch.no_grad():
        both = m(x, mask)
        one = m(x[1:], mask[1:])
    for k in ("pred_logits", "pred_boxes", "pred_vectors"):
        torch.testing.assert_close(both[k][1:], one[k], rtol=1e-4, atol=1e-5)


def test_intermediates_and_attention_shapes():
    cfg, m = _tiny(num_feature_levels=4)
    m.eval()
    x, mask = _batch(2)
    mask[0, :, 64:] = True
    with torch.no_grad():
        out = m(x, mask, return_intermediates=True, return_attention=True)
    B, Q, d, L = 2, 10, 32, 2
    assert out["pred_logits"].shape == (B, Q, 5) and out["pred_boxes"].shape == (B, Q, 4)
    assert out["pred_vectors"].shape == (B, Q, 20) and len(out["aux_outputs"]) == L - 1
    assert out["hs"].shape == (L, B, Q, d)
    assert [tuple(mm.shape) for mm in out["memory"]] == [(B, d, 16, 16), (B, d, 8, 8), (B, d, 4, 4), (B, d, 2, 2)]
    assert [tuple(mm.shape) for mm in out["memory_masks"]] == [(B, 16, 16), (B, 8, 8), (B, 4, 4), (B, 2, 2)]
    assert torch.equal(out["memory_masks"][0][0], mask[0, ::8, ::8])
    assert [f.shape[1] for f, _ in out["features"]] == [128, 256, 512]  # read from ResNet-18
    assert len(out["dec_attention"]) == L
    att = out["dec_attention"][0]
    assert att["locations"].shape == (B, Q, 4, 4, 2, 2) and att["weights"].shape == (B, Q, 4, 4, 2)
    torch.testing.assert_close(att["weights"].sum((-1, -2)), torch.ones(B, Q, 4))
    assert out["dec_references"].shape == (L, B, Q, 4) and not out["dec_references"].requires_grad
    assert out["pred_boxes"].min() > 0 and out["pred_boxes"].max() < 1


def test_position_encoding_matches_formula():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # last column is padding
    F_ = 6
    pe = PositionEmbeddingSine(F_)(mask)
    assert pe.shape == (1, 2 * F_, 3, 4)
    for i in range(3):
        for j in range(3):
            y = (i + 1 - 0.5) / (3 + 1e-6) * 2 * math.pi
            x = (j + 1 - 0.5) / (3 + 1e-6) * 2 * math.pi
            for c in range(F_):
                t = 10000 ** (2 * (c // 2) / F_)
                fn = math.sin if c % 2 == 0 else math.cos
                assert pe[0, c, i, j].item() == pytest.approx(fn(y / t), abs=1e-5)
                assert pe[0, F_ + c, i, j].item() == pytest.approx(fn(x / t), abs=1e-5)


def test_valid_ratios_and_encoder_reference_points():
    mask = torch.zeros(2, 4, 8, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 6:] = True
    vr = valid_ratio(mask)
    torch.testing.assert_close(vr, torch.tensor([[1.0, 1.0], [0.75, 0.75]]))
    ref = DeformableEncoder.reference_points([(4, 8)], vr[:, None])
    assert ref.shape == (2, 32, 1, 2)
    # pixel (row 1, col 2) of image 1: centre (2.5, 1.5) of the 8x4 padded map
    torch.testing.assert_close(ref[1, 1 * 8 + 2, 0], torch.tensor([2.5 / 8, 1.5 / 4]))


def test_build_model_needs_num_classes():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(load_config("smoke"))


def test_build_model_returns_three_parts():
    cfg = load_config("smoke", ["model.num_classes=3"])
    model, criterion, post = build_model(cfg)
    assert model.vector_embed.layers[-1].out_features == cfg.codec.num_coeffs
    assert callable(criterion) and callable(post)


def test_vector_length_comes_from_the_codec_not_num_coeffs():
    # flatten codes are 28x28 = 784-d whatever codec.num_coeffs says; the head must match the codec
    cfg = load_config("smoke", ["model.num_classes=3", "codec.name=flatten", "codec.num_coeffs=128"])
    assert build_detector(cfg).vector_embed.layers[-1].out_features == 784
    model, criterion, _ = build_model(cfg)
    assert model.vector_embed.layers[-1].out_features == criterion.codec.dim == 784


def test_build_model_uses_the_codec_it_is_given():
    from solq.coding import DCTCodec, FlattenCodec

    cfg = load_config("smoke", ["model.num_classes=3", "codec.num_coeffs=64"])
    codec = DCTCodec(resolution=64, num_coeffs=40)
    model, criterion, post = build_model(cfg, codec=codec)
    assert criterion.codec is codec and post.codec is codec
    assert model.vector_embed.layers[-1].out_features == 40
    with pytest.raises(ConfigError, match="flatten"):
        build_model(cfg, codec=FlattenCodec())


def test_predicts_masks_is_a_property_of_the_model():
    assert build_model(load_config("smoke", ["model.num_classes=3"]))[0].predicts_masks
    assert build_model(load_config("smoke", ["model.num_classes=3", "model.mode=sqr"]))[0].predicts_masks
    assert not build_model(load_config("smoke", ["model.num_classes=3", "model.mode=det"]))[0].predicts_masks


def test_bf16_autocast_keeps_boxes_and_references_in_float32():
    _, m = _tiny()
    m.eval()
    x, mask = _batch(1)
    with torch.no_grad():
        ref = m(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, mask, return_attention=True)
    assert out["pred_boxes"].dtype == torch.float32 and out["dec_references"].dtype == torch.float32
    assert out["dec_attention"][0]["locations"].dtype == torch.float32
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], atol=0.03, rtol=0)


def test_standardized_vector_head_starts_at_the_mean_code_and_scales_by_the_std():
    cfg, plain = _tiny()
    assert "vector_mean" not in plain.state_dict()  # off by default: the release's keys and init
    assert plain.vector_embed.layers[-1].bias[2:].eq(-2).all()
    _, model = _tiny(vector_standardize=True)
    dim = model.vector_embed.layers[-1].out_features
    mean, std = torch.linspace(-3, 30, dim), torch.linspace(0.5, 10, dim)
    model.set_vector_statistics(mean, std)
    assert {"vector_mean", "vector_std"} <= set(model.state_dict())  # saved with the model
    model.eval()
    images, mask = _batch()
    out = model(images, mask, return_intermediates=True)
    torch.testing.assert_close(out["pred_vectors"], mean.expand_as(out["pred_vectors"]))  # zero last layer
    with torch.no_grad():
        model.vector_embed.layers[-1].bias.normal_()
    out = model(images, mask, return_intermediates=True)
    raw = model.vector_embed(out["hs"][-1])
    torch.testing.assert_close(out["pred_vectors"], mean + std * raw)
    with pytest.raises(ValueError, match="std"):
        model.set_vector_statistics(mean, torch.zeros(dim))
    with pytest.raises(ValueError, match="shape"):
        model.set_vector_statistics(mean[:3], std[:3])
    with pytest.raises(ValueError, match="without vector_standardize"):
        plain.set_vector_statistics(mean, std)

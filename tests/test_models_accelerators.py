"""Convergence accelerators: hybrid one-to-many matching (model and loss) and the encoder's one-to-many
assignment. The main query group must not see the extra one; switched off, nothing changes."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from solq.config import load_config
from solq.models import build_detector, build_model
from solq.models.criterion import SetCriterion
from solq.models.matcher import HungarianMatcher

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**model):
    base = {"backbone": "small", "backbone_norm": "batch", "freeze_stages": 0, "hidden_dim": 32,
            "dim_feedforward": 48, "nheads": 4, "enc_layers": 1, "dec_layers": 2, "num_queries": 6,
            "num_feature_levels": 3, "enc_n_points": 2, "dec_n_points": 2, "vector_hidden_dim": 32,
            "dropout": 0.0, "num_classes": 4, "num_queries_one2many": 8}
    base.update(model)
    return load_config("smoke", [f"model.{k}={v}" for k, v in base.items()] + ["codec.num_coeffs=20"])


def _images(B=2, S=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=g), torch.zeros(B, S, S, dtype=torch.bool)


@pytest.mark.parametrize("two_stage", [False, True])
def test_extra_group_shapes_and_dropped_at_inference(two_stage):
    torch.manual_seed(0)
    model = build_detector(_cfg(two_stage=two_stage)).train()
    x, m = _images()
    out = model(x, m)
    assert out["pred_logits"].shape == (2, 6, 4) and out["pred_vectors"].shape == (2, 6, 20)
    extra = out["one2many_outputs"]
    assert extra["pred_logits"].shape == (2, 8, 4) and extra["pred_boxes"].shape == (2, 8, 4)
    assert extra["pred_vectors"].shape == (2, 8, 20) and len(extra["aux_outputs"]) == 1
    model.eval()
    with torch.no_grad():
        out = model(x, m, return_attention=True)
    assert "one2many_outputs" not in out and out["pred_boxes"].shape == (2, 6, 4)
    assert out["dec_attention"][0]["weights"].shape[1] == 6


@pytest.mark.parametrize("two_stage", [False, True])
def test_main_group_does_not_see_the_extra_group(two_stage):
    """Training-mode main outputs equal those of the same weights run without the extra group, and changing
    an extra query changes none of them (the self-attention mask blocks information between the groups)."""
    torch.manual_seed(0)
    model = build_detector(_cfg(two_stage=two_stage)).train()
    x, m = _images()
    with torch.no_grad():
        full = model(x, m)
        if not two_stage:
            model.query_embed.weight[6:].normal_()  # perturb extra queries only (rows >= Q = 6)
            perturbed = model(x, m)
            assert not torch.allclose(perturbed["one2many_outputs"]["pred_logits"], full["one2many_outputs"]["pred_logits"])
            for key in ("pred_logits", "pred_boxes", "pred_vectors"):
                assert torch.equal(perturbed[key], full[key])
        model.num_queries_one2many = 0  # the same network with the switch off
        alone = model(x, m)
    assert "one2many_outputs" not in alone
    for key in ("pred_logits", "pred_boxes", "pred_vectors"):
        torch.testing.assert_close(full[key], alone[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(full["aux_outputs"][0][key], alone["aux_outputs"][0][key], rtol=0, atol=1e-6)


def test_switch_off_builds_the_same_network():
    """The extra group adds rows to query_embed and nothing else (no new parameters)."""
    torch.manual_seed(0)
    a = build_detector(_cfg(num_queries_one2many=0, two_stage=False)).state_dict()
    torch.manual_seed(0)
    b = build_detector(_cfg(num_queries_one2many=8, two_stage=False)).state_dict()
    assert a.keys() == b.keys()
    assert a["query_embed.weight"].shape == (6, 64) and b["query_embed.weight"].shape == (14, 64)


def _targets(gen, sizes=(3, 1)):
    out = []
    for i, n in enumerate(sizes):
        c = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=gen) * 0.2 + 0.1
        boxes = torch.cat([c, wh], 1)
        out.append({"labels": torch.randint(0, 4, (n,), generator=gen), "boxes": boxes, "image_id": torch.tensor(i)})
    return out


def _layer(gen, B, q):
    return {"pred_logits": torch.randn(B, q, 4, generator=gen), "pred_boxes": torch.rand(B, q, 4, generator=gen) * 0.5 + 0.2}


def test_one2many_loss_against_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    k, Q2 = 3, 10
    targets = _targets(gen)
    extra = _layer(gen, 2, Q2)
    outputs = {**_layer(gen, 2, 5), "one2many_outputs": extra}
    matcher = HungarianMatcher()
    crit = SetCriterion(4, matcher, losses=("labels", "boxes"), num_dec_layers=1, one2many=True, one2many_k=k,
                        one2many_weight=0.5)
    losses = crit(outputs, targets)
    assert crit.weight_dict["loss_bbox_one2many"] == pytest.approx(5.0 * 0.5)
    # the reference: repeat each image's boxes k times, solve the assignment with scipy, sum L1 / (k * n)
    l1, total = 0.0, k * sum(len(t["labels"]) for t in targets)
    for b, t in enumerate(targets):
        rep = t["boxes"].repeat(k, 1).double()
        labels = t["labels"].repeat(k)
        prob = extra["pred_logits"][b].double().sigmoid()[:, labels]
        a, g = 0.25, 2.0
        cost_class = a * (1 - prob) ** g * -(prob + 1e-8).log() - (1 - a) * prob ** g * -(1 - prob + 1e-8).log()
        pb = extra["pred_boxes"][b].double()
        cost = 5 * torch.cdist(pb, rep, p=1) + 2 * cost_class - 2 * generalized_box_iou(
            box_convert(pb, "cxcywh", "xyxy"), box_convert(rep, "cxcywh", "xyxy"))
        qi, ti = linear_sum_assignment(cost.numpy())
        assert len(set(qi)) == len(qi) == len(rep)  # every copy has its own query: k queries per object
        l1 += (pb[qi] - rep[ti]).abs().sum().item()
    assert losses["loss_bbox_one2many"].item() == pytest.approx(l1 / total, rel=1e-5)
    assert "class_error_one2many" not in losses and "loss_ce_one2many" in losses


def test_one2many_with_k1_on_the_same_outputs_equals_the_main_loss():
    gen = torch.Generator().manual_seed(2)
    targets = _targets(gen)
    main = _layer(gen, 2, 6)
    outputs = {**main, "one2many_outputs": dict(main)}
    crit = SetCriterion(4, HungarianMatcher(), losses=("labels", "boxes"), num_dec_layers=1, one2many=True,
                        one2many_k=1)
    losses = crit(outputs, targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[key + "_one2many"].item() == pytest.approx(losses[key].item(), rel=1e-6)


def test_encoder_one_to_many_assignment():
    """enc_one2many_k copies of each object, matched to distinct proposals, normalised by the copies."""
    gen = torch.Generator().manual_seed(3)
    targets = _targets(gen)
    enc = _layer(gen, 2, 12)
    enc["pred_logits"] = enc["pred_logits"][..., :1]
    outputs = {**_layer(gen, 2, 5), "enc_outputs": enc}
    one = SetCriterion(4, HungarianMatcher(), losses=("labels", "boxes"), num_dec_layers=1)(outputs, targets)
    crit = SetCriterion(4, HungarianMatcher(), losses=("labels", "boxes"), num_dec_layers=1, enc_one2many_k=3)
    many = crit(outputs, targets)
    assert one["loss_bbox"] == many["loss_bbox"]  # the decoder's terms are unchanged
    reps = [{**t, "labels": torch.zeros(3 * len(t["labels"]), dtype=torch.int64), "boxes": t["boxes"].repeat(3, 1)}
            for t in targets]
    idx = HungarianMatcher()(enc, reps)
    want = sum((enc["pred_boxes"][b, q] - reps[b]["boxes"][j]).abs().sum() for b, (q, j) in enumerate(idx)) / 12
    assert many["loss_bbox_enc"].item() == pytest.approx(want.item(), rel=1e-5)
    assert all(len(q) == 3 * len(t["labels"]) for (q, _), t in zip(idx, targets))


def test_hybrid_and_denoising_training_step_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    cfg = _cfg(two_stage=True, dn_groups=2)
    model, criterion, _ = build_model(cfg)
    model.train()
    x, m = _images(S=96)
    gen = torch.Generator().manual_seed(0)
    targets = []
    for i in range(2):
        masks = torch.zeros(2, 96, 96, dtype=torch.bool)
        masks[0, 10:40, 20:60] = True
        masks[1, 50:90, 30:70] = True
        xyxy = torch.tensor([[20., 10, 60, 40], [30, 50, 70, 90]])
        boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / 96
        targets.append({"labels": torch.randint(0, 4, (2,), generator=gen), "boxes": boxes, "boxes_xyxy": xyxy,
                        "masks": masks, "image_id": torch.tensor(i)})
    losses = criterion(model(x, m, targets=targets), targets)
    assert "loss_vector_one2many" in losses and "loss_vector_0_one2many" in losses and "loss_vector_dn" in losses
    sum(v * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_quality_focal_loss_against_a_direct_computation():
    gen = torch.Generator().manual_seed(4)
    targets = _targets(gen)
    outputs = _layer(gen, 2, 6)
    crit = SetCriterion(4, HungarianMatcher(), losses=("labels",), num_dec_layers=1, cls_loss="quality_focal")
    loss = crit(outputs, targets)["loss_ce"]
    indices = HungarianMatcher()(outputs, targets)
    want = torch.zeros(2, 6, 4, dtype=torch.float64)
    for b, (q, j) in enumerate(indices):
        for qi, ji in zip(q.tolist(), j.tolist()):
            p, g = outputs["pred_boxes"][b, qi].double(), targets[b]["boxes"][ji].double()
            a = torch.cat([p[:2] - p[2:] / 2, p[:2] + p[2:] / 2])
            c = torch.cat([g[:2] - g[2:] / 2, g[:2] + g[2:] / 2])
            wh = (torch.minimum(a[2:], c[2:]) - torch.maximum(a[:2], c[:2])).clamp(min=0)
            inter = wh[0] * wh[1]
            iou = inter / (p[2] * p[3] + g[2] * g[3] - inter)
            want[b, qi, targets[b]["labels"][ji]] = max(float(iou), 0.01)
    x = outputs["pred_logits"].double()
    s = x.sigmoid()
    ref = -(want * s.log() + (1 - want) * (1 - s).log()) * (want - s).abs() ** 2
    assert loss.item() == pytest.approx(ref.sum().item() / 4, rel=1e-5)  # 4 boxes in the batch


def _dn_targets(gen, sizes=(3, 1)):
    return [{**t, "boxes_xyxy": torch.zeros(len(t["labels"]), 4)} for t in _targets(gen, sizes)]


def test_denoising_queries_shapes_and_no_leak_into_the_main_group():
    """Denoising queries come back under dn_outputs (groups x n_max); the main queries' outputs are those of the
    same network run without them, and changing the ground truth (hence the dn queries) changes none of them."""
    torch.manual_seed(0)
    model = build_detector(_cfg(two_stage=True, num_queries_one2many=0, dn_groups=3)).train()
    x, m = _images()
    gen = torch.Generator().manual_seed(5)
    targets = _dn_targets(gen)
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(x, m, targets=targets)
        dn = out["dn_outputs"]
        assert dn["pred_logits"].shape == (2, 3 * 3, 4) and dn["pred_vectors"].shape == (2, 9, 20)
        assert dn["dn_pad"] == 3 and len(dn["aux_outputs"]) == 1 and out["pred_logits"].shape == (2, 6, 4)
        alone = model(x, m)  # no targets: no denoising queries
        other = model(x, m, targets=_dn_targets(torch.Generator().manual_seed(6)))
    assert "dn_outputs" not in alone
    for key in ("pred_logits", "pred_boxes", "pred_vectors"):
        torch.testing.assert_close(out[key], alone[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[key], other[key], rtol=0, atol=1e-6)
    assert not torch.allclose(other["dn_outputs"]["pred_boxes"], dn["pred_boxes"])
    model.eval()
    with torch.no_grad():
        assert "dn_outputs" not in model(x, m, targets=targets)  # dropped at inference


def test_denoising_loss_uses_the_fixed_matching():
    gen = torch.Generator().manual_seed(7)
    targets = _targets(gen)  # 3 and 1 objects: n_max = 3
    G, n_max = 2, 3
    dn = _layer(gen, 2, G * n_max)
    outputs = {**_layer(gen, 2, 5), "dn_outputs": {**dn, "dn_pad": n_max}}
    crit = SetCriterion(4, HungarianMatcher(), losses=("labels", "boxes"), num_dec_layers=1, denoising=True)
    losses = crit(outputs, targets)
    assert crit.weight_dict["loss_bbox_dn"] == crit.weight_dict["loss_bbox"]
    l1 = 0.0
    for b, t in enumerate(targets):
        for g in range(G):
            for j in range(len(t["labels"])):
                l1 += (dn["pred_boxes"][b, g * n_max + j] - t["boxes"][j]).abs().sum().item()
    assert losses["loss_bbox_dn"].item() == pytest.approx(l1 / (G * 4), rel=1e-5)  # 4 objects, 2 copies each


def test_denoising_needs_two_stage():
    from solq.config import ConfigError

    with pytest.raises(ConfigError, match="two_stage"):
        _cfg(two_stage=False, dn_groups=2)

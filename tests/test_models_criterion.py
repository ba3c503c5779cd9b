"""SetCriterion: each term against a direct float64 computation, aux/enc keys, stages, normalisation."""
import pytest
import torch
import torch.nn.functional as F

from solq.coding import DCTCodec, FlattenCodec, crop_to_box
from solq.config import load_config
from solq.models.criterion import SetCriterion, build_criterion
from solq.models.matcher import HungarianMatcher

C, Q, L = 5, 6, 3


def _l1_codec():
    return DCTCodec(resolution=16, num_coeffs=12)


def _targets(sizes, hw, gen):
    out = []
    for i, (n, (H, W)) in enumerate(zip(sizes, hw)):
        masks = torch.zeros(n, H, W, dtype=torch.bool)
        xyxy = torch.zeros(n, 4)
        for k in range(n):
            rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
            x0, y0 = rand(0, W // 2), rand(0, H // 2)
            x1, y1 = x0 + rand(4, W // 2), y0 + rand(4, H // 2)
            yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            # an ellipse inscribed in the box
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            masks[k] = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
            xyxy[k] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        scale = torch.tensor([W, H, W, H], dtype=torch.float32)
        n_xyxy = xyxy / scale
        boxes = torch.cat([(n_xyxy[:, :2] + n_xyxy[:, 2:]) / 2, n_xyxy[:, 2:] - n_xyxy[:, :2]], 1)
        out.append({"labels": torch.randint(0, C, (n,), generator=gen), "boxes": boxes, "boxes_xyxy": xyxy,
                    "masks": masks, "image_id": torch.tensor(i), "size": torch.tensor([H, W])})
    return out


def _layer(B, dim, gen, masks_hw=None):
    d = {"pred_logits": torch.randn(B, Q, C, generator=gen).requires_grad_(),
         "pred_boxes": torch.randn(B, Q, 4, generator=gen).sigmoid().requires_grad_(),
         "pred_vectors": torch.randn(B, Q, dim, generator=gen).requires_grad_()}
    if masks_hw:
        d["pred_masks"] = torch.randn(B, Q, *masks_hw, generator=gen).requires_grad_()
    return d


def _outputs(B, dim, gen, masks_hw=None, enc=False):
    out = _layer(B, dim, gen, masks_hw)
    out["aux_outputs"] = [_layer(B, dim, gen) for _ in range(L - 1)]
    if enc:
        out["enc_outputs"] = {k: v for k, v in _layer(B, dim, gen).items() if k in ("pred_logits", "pred_boxes")}
    return out


def _giou64(a, b):
    def xyxy(t):
        return torch.cat([t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2], 1)
    a, b = xyxy(a), xyxy(b)
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = area(a) + area(b) - inter
    enc = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(1)
    return inter / union - (enc - union) / enc


def _direct_terms(layer, targets, indices, num_boxes):
    """float64 focal / L1 / GIoU for one layer given its matching."""
    logits = layer["pred_logits"].detach().double()
    t = torch.zeros_like(logits)
    src, tgt = [], []
    for b, (qi, ti) in enumerate(indices):
        for q, j in zip(qi.tolist(), ti.tolist()):
            t[b, q, targets[b]["labels"][j]] = 1
            src.append(layer["pred_boxes"][b, q].detach().double())
            tgt.append(targets[b]["boxes"][j].double())
    p = logits.sigmoid()
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).sum() / num_boxes
    src, tgt = torch.stack(src), torch.stack(tgt)
    l1 = (src - tgt).abs().sum() / num_boxes
    giou = (1 - _giou64(src, tgt)).sum() / num_boxes
    return focal, l1, giou


def test_terms_against_float64_and_keys():
    gen = torch.Generator().manual_seed(0)
    codec = _l1_codec()
    targets = _targets([2, 0, 3], [(40, 48), (20, 20), (32, 36)], gen)
    outputs = _outputs(3, codec.dim, gen)
    crit = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L)
    losses = crit(outputs, targets)

    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_vector") for s in ("", "_0", "_1")}
    assert set(losses) == expected | {"class_error"}
    assert set(crit.weight_dict) >= expected and "class_error" not in crit.weight_dict
    assert crit.weight_dict["loss_ce_1"] == 2 and crit.weight_dict["loss_bbox_0"] == 5
    assert crit.weight_dict["loss_giou"] == 2 and crit.weight_dict["loss_vector_0"] == 1
    assert 0 <= losses["class_error"].item() <= 100

    for layer, suffix in [(outputs, "")] + [(a, f"_{i}") for i, a in enumerate(outputs["aux_outputs"])]:
        indices = HungarianMatcher()(layer, targets)
        focal, l1, giou = _direct_terms(layer, targets, indices, num_boxes=5.0)
        assert losses["loss_ce" + suffix].item() == pytest.approx(float(focal), rel=1e-5)
        assert losses["loss_bbox" + suffix].item() == pytest.approx(float(l1), rel=1e-5)
        assert losses["loss_giou" + suffix].item() == pytest.approx(float(giou), rel=1e-5)
        # vector: coef x mean |pred - encode(crop(gt mask, gt box))|, pair by pair, one mask at a time
        diffs = []
        for b, (qi, ti) in enumerate(indices):
            for q, j in zip(qi.tolist(), ti.tolist()):
                t = targets[b]
                crop = crop_to_box(t["masks"][j:j + 1], t["boxes_xyxy"][j:j + 1], codec.resolution)
                v = codec.encode(crop.float()).double()[0]
                diffs.append((layer["pred_vectors"][b, q].detach().double() - v).abs())
        ref = 3.0 * torch.stack(diffs).mean()
        assert losses["loss_vector" + suffix].item() == pytest.approx(float(ref), rel=1e-5)


def test_vector_norm_num_boxes_and_stages():
    gen = torch.Generator().manual_seed(1)
    codec = _l1_codec()
    targets = _targets([2, 3], [(40, 48), (32, 36)], gen)
    outputs = _outputs(2, codec.dim, gen)
    mean = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L)(outputs, targets)
    nb = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L,
                      vector_loss_norm="num_boxes")(outputs, targets)
    # sum over 5 pairs x dim / 5 boxes = dim x mean
    assert nb["loss_vector"].item() == pytest.approx(mean["loss_vector"].item() * codec.dim, rel=1e-5)

    for stages, kept in ((1, {"loss_vector"}), (2, {"loss_vector", "loss_vector_1"}),
                         (0, {"loss_vector", "loss_vector_0", "loss_vector_1"})):
        crit = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L, vector_loss_stages=stages)
        keys = {k for k in crit(outputs, targets) if k.startswith("loss_vector")}
        assert keys == kept
        assert {k for k in crit.weight_dict if k.startswith("loss_vector")} == kept


def test_gt_vectors_encoded_once_per_call():
    gen = torch.Generator().manual_seed(2)
    codec = _l1_codec()
    calls = []
    encode = codec.encode
    codec.encode = lambda m: (calls.append(len(m)), encode(m))[1]
    targets = _targets([2, 3], [(40, 48), (32, 36)], gen)
    SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L)(_outputs(2, codec.dim, gen), targets)
    assert calls == [5]  # all 5 GT masks of the batch in one call, shared by the 3 decoder layers


def test_zero_targets_finite_with_gradients():
    gen = torch.Generator().manual_seed(3)
    codec = _l1_codec()
    targets = _targets([0, 0], [(20, 24), (16, 16)], gen)
    outputs = _outputs(2, codec.dim, gen, enc=True)
    crit = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L)
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    total = sum(losses[k] * w for k, w in crit.weight_dict.items() if k in losses)
    total.backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0  # all-negative focal loss still trains
    for key in ("pred_boxes", "pred_vectors"):
        assert outputs[key].grad is not None  # graph kept through 0 * sum(pred)


def test_num_boxes_all_reduce_and_clamp(monkeypatch):
    import torch.distributed as dist

    targets = _targets([2, 1], [(20, 24), (16, 16)], torch.Generator().manual_seed(4))
    assert SetCriterion.num_boxes(targets, "cpu") == 3.0
    assert SetCriterion.num_boxes(_targets([0], [(8, 8)], torch.Generator()), "cpu") == 1.0
    # a fake 2-process group where the other process holds 7 boxes
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(7.0))
    assert SetCriterion.num_boxes(targets, "cpu") == 5.0


def test_encoder_losses_are_class_agnostic_without_vectors():
    gen = torch.Generator().manual_seed(5)
    codec = _l1_codec()
    targets = _targets([2, 1], [(40, 48), (32, 36)], gen)
    outputs = _outputs(2, codec.dim, gen, enc=True)
    crit = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L)
    losses = crit(outputs, targets)
    assert {k for k in losses if k.endswith("_enc")} == {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    indices = HungarianMatcher()(outputs["enc_outputs"], enc_targets)
    focal, l1, _ = _direct_terms(outputs["enc_outputs"], enc_targets, indices, num_boxes=3.0)
    assert losses["loss_ce_enc"].item() == pytest.approx(float(focal), rel=1e-5)
    assert losses["loss_bbox_enc"].item() == pytest.approx(float(l1), rel=1e-5)


def test_mse_dice_codec_loss():
    gen = torch.Generator().manual_seed(6)
    codec = FlattenCodec(resolution=8)
    targets = _targets([2, 1], [(40, 48), (32, 36)], gen)
    outputs = _outputs(2, codec.dim, gen)
    with torch.no_grad():
        outputs["pred_vectors"].uniform_(-0.2, 1.2)
    crit = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L, vector_loss_coef=2.0)
    got = crit(outputs, targets)["loss_vector"].item()
    mse, dice = 0.0, 0.0
    for b, (qi, ti) in enumerate(HungarianMatcher()(outputs, targets)):
        for q, j in zip(qi.tolist(), ti.tolist()):
            t = targets[b]
            crop = crop_to_box(t["masks"][j:j + 1], t["boxes_xyxy"][j:j + 1], 8).double().flatten()
            v = outputs["pred_vectors"][b, q].detach().double()
            mse += float(((v - crop) ** 2).sum()) / 3 / 64
            p = v.clamp(0, 1)
            dice += (1 - float(2 * (p * crop).sum() / ((p ** 2).sum() + (crop ** 2).sum() + 1e-5))) / 3
    assert got == pytest.approx(2.0 * (mse + dice), rel=1e-5)


def test_vector_dice_term_against_direct_computation_and_off_by_default():
    gen = torch.Generator().manual_seed(9)
    codec = _l1_codec()
    targets = _targets([2, 3], [(40, 48), (32, 36)], gen)
    outputs = _outputs(2, codec.dim, gen)
    plain = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L)
    crit = SetCriterion(C, HungarianMatcher(), codec=codec, num_dec_layers=L, vector_dice_coef=2.5)
    base, got = plain(outputs, targets), crit(outputs, targets)
    assert not any("vector_dice" in k for k in list(base) + list(plain.weight_dict))  # off: today's terms
    assert {k for k in got if "vector_dice" in k} == {"loss_vector_dice", "loss_vector_dice_0", "loss_vector_dice_1"}
    assert crit.weight_dict["loss_vector_dice_0"] == 2.5
    for k in base:  # the other terms are unchanged
        assert got[k].item() == pytest.approx(base[k].item(), rel=1e-6)
    # squared-denominator dice of the decoded vector against the GT crop, summed over pairs / 5 boxes
    dice = 0.0
    for b, (qi, ti) in enumerate(HungarianMatcher()(outputs, targets)):
        for q, j in zip(qi.tolist(), ti.tolist()):
            t = targets[b]
            crop = crop_to_box(t["masks"][j:j + 1], t["boxes_xyxy"][j:j + 1], 16).double().flatten()
            p = codec.decode(outputs["pred_vectors"][b, q].detach()[None]).double().flatten()
            dice += (1 - float(2 * (p * crop).sum() / ((p ** 2).sum() + (crop ** 2).sum() + 1e-5))) / 5
    assert got["loss_vector_dice"].item() == pytest.approx(dice, rel=1e-4)
    got["loss_vector_dice"].backward()
    assert outputs["pred_vectors"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="l1 codecs"):
        SetCriterion(C, HungarianMatcher(), codec=FlattenCodec(resolution=8), num_dec_layers=L, vector_dice_coef=1)
    smoke = load_config("smoke", overrides=["loss.vector_dice_coef=1.5"])
    assert build_criterion(smoke, codec, C).weight_dict["loss_vector_dice"] == 1.5
    smoke_sqr = load_config("smoke", overrides=["loss.vector_dice_coef=1.5", "model.mode=sqr"])
    assert "loss_vector_dice" not in build_criterion(smoke_sqr, None, C).weight_dict


def test_sqr_mask_losses_against_direct_computation():
    gen = torch.Generator().manual_seed(7)
    targets = _targets([2, 1], [(40, 48), (32, 36)], gen)
    outputs = _outputs(2, 4, gen, masks_hw=(5, 6))
    crit = SetCriterion(C, HungarianMatcher(), losses=("labels", "boxes", "masks"), num_dec_layers=L)
    losses = crit(outputs, targets)
    assert "loss_mask" in losses and "loss_dice" in losses and "loss_mask_0" not in losses
    assert "loss_mask_0" not in crit.weight_dict and crit.weight_dict["loss_dice"] == 1
    focal_sum, dice_sum = 0.0, 0.0
    for b, (qi, ti) in enumerate(HungarianMatcher()(outputs, targets)):
        for q, j in zip(qi.tolist(), ti.tolist()):
            gt = torch.zeros(40, 48, dtype=torch.float64)
            m = targets[b]["masks"][j]
            gt[: m.shape[0], : m.shape[1]] = m.double()
            x = F.interpolate(outputs["pred_masks"][b, q][None, None].detach().double(), size=(40, 48),
                              mode="bilinear", align_corners=False)[0, 0]
            p = x.sigmoid()
            ce = -(gt * torch.log(p) + (1 - gt) * torch.log(1 - p))
            p_t = p * gt + (1 - p) * (1 - gt)
            focal_sum += float((ce * (1 - p_t) ** 2 * (0.25 * gt + 0.75 * (1 - gt))).mean())
            dice_sum += 1 - float((2 * (p * gt).sum() + 1) / (p.sum() + gt.sum() + 1))
    assert losses["loss_mask"].item() == pytest.approx(focal_sum / 3, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice_sum / 3, rel=1e-5)


def test_build_criterion_losses_by_mode():
    for mode, has in (("uqr", "loss_vector"), ("det", None), ("sqr", "loss_mask")):
        cfg = load_config("smoke", overrides=[f"model.mode={mode}"])
        crit = build_criterion(cfg, _l1_codec(), 7)
        keys = set(crit.weight_dict)
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= keys
        assert ("loss_vector" in keys) == (has == "loss_vector")
        assert ("loss_mask" in keys) == (has == "loss_mask")
        assert crit.weight_dict["loss_bbox"] == cfg.loss.bbox_loss_coef
    with pytest.raises(ValueError, match="codec"):
        SetCriterion(C, HungarianMatcher(), codec=None)


@pytest.mark.parametrize("standardize", [False, True])
def test_integration_smoke_model_initial_vector_loss(standardize):
    from solq.models import build_model

    cfg = load_config("smoke", overrides=["model.num_classes=7", f"model.vector_standardize={standardize}"])
    torch.manual_seed(0)
    model, crit, _ = build_model(cfg)
    if standardize:
        g = torch.Generator().manual_seed(3)
        dim = crit.codec.dim
        model.set_vector_statistics(torch.randn(dim, generator=g) * 10, torch.rand(dim, generator=g) + 0.5)
    targets = _targets([2, 3], [(128, 96), (96, 96)], torch.Generator().manual_seed(8))
    images = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    mask[1, 96:] = True
    outputs = model(images, mask)
    losses = crit(outputs, targets)
    assert set(crit.weight_dict) <= set(losses) | {k for k in crit.weight_dict if k.endswith("_enc")}
    assert all(torch.isfinite(v) for v in losses.values())
    # at init every query predicts [0, 0, -2, ...] (the release), or the mean code (standardised): the vector
    # loss depends on the GT masks only
    codec = crit.codec
    v0 = torch.full((codec.dim,), -2.0, dtype=torch.float64)
    v0[:2] = 0
    if standardize:
        v0 = model.vector_mean.double()
    gt = torch.cat([codec.encode(crop_to_box(t["masks"], t["boxes_xyxy"], codec.resolution)) for t in targets])
    ref = 3.0 * (gt.double() - v0).abs().mean()
    for key in ("loss_vector", "loss_vector_0"):
        assert losses[key].item() == pytest.approx(float(ref), rel=1e-4)
    sum(losses[k] * w for k, w in crit.weight_dict.items() if k in losses).backward()
    assert all(p.grad is not None for p in model.vector_embed.parameters())

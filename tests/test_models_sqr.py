"""SQR baseline: attention map, mask head shapes and input, frozen detector, tiny overfit, the release's size."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from solq.models.criterion import SetCriterion
from solq.models.matcher import HungarianMatcher
from solq.models.sqr import AttentionMap, MaskHead, SQRModel


class TinyDetector(nn.Module):
    """Stand-in detector with the agreed intermediates: C3..C5 at strides 8/16/32, memory with an
    extra stride-64 level, L=2 decoder layers."""

    def __init__(self, d=32, Q=4, C=3, chans=(16, 24, 40)):
        super().__init__()
        self.hidden_dim = d  # what SQRModel reads from a detector: its width and its backbone's channels
        self.backbone = SimpleNamespace(num_channels=list(chans))
        self.c3 = nn.Conv2d(3, chans[0], 8, stride=8)
        self.c4 = nn.Conv2d(chans[0], chans[1], 3, stride=2, padding=1)
        self.c5 = nn.Conv2d(chans[1], chans[2], 3, stride=2, padding=1)
        self.proj = nn.ModuleList([nn.Conv2d(c, d, 1) for c in chans] + [nn.Conv2d(chans[2], d, 3, 2, 1)])
        self.query = nn.Embedding(Q, d)
        self.cls = nn.Linear(d, C)
        self.box = nn.Linear(d, 4)

    def forward(self, images, mask, *, return_intermediates=False, return_attention=False):
        c3 = self.c3(images)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        maps = [c3, c4, c5]
        srcs = [p(c) for p, c in zip(self.proj, maps)] + [self.proj[-1](c5)]
        memory = [torch.tanh(s) + 0.5 for s in srcs]  # a stand-in "encoder": differs from its input
        masks = [F.interpolate(mask[:, None].float(), size=m.shape[-2:])[:, 0].bool() for m in memory]
        pooled = memory[-1].mean((2, 3))
        h0 = self.query.weight[None] + pooled[:, None]
        hs = torch.stack([h0, torch.tanh(h0)])
        layers = [{"pred_logits": self.cls(h), "pred_boxes": self.box(h).sigmoid()} for h in hs]
        out = {**layers[-1], "aux_outputs": layers[:-1]}
        if return_intermediates:
            out.update(hs=hs, memory=memory, srcs=srcs, memory_masks=masks, features=list(zip(maps, masks[:3])))
        return out


def _batch():
    images = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    mask[1, 96:] = True  # image 1 is 96x96
    images[1, :, 96:] = 0
    return images, mask


def test_attention_map_normalised_per_head_and_ignores_padding():
    attn = AttentionMap(16, 4)
    mem = torch.randn(2, 16, 3, 5)
    pad = torch.zeros(2, 3, 5, dtype=torch.bool)
    pad[1, :, 3:] = True
    a = attn(torch.randn(2, 6, 16), mem, pad)
    assert a.shape == (2, 6, 4, 3, 5)
    torch.testing.assert_close(a.sum((-1, -2)), torch.ones(2, 6, 4))
    assert a[1, ..., 3:].abs().max() == 0


def test_mask_head_small_widths_groupnorm():
    # width 64 with 4 heads: 68 input channels (GroupNorm groups = gcd(68, 8) = 4)
    head = MaskHead(68, 64, [256, 128, 64])
    out = head(torch.randn(1, 64, 2, 2), torch.rand(1, 3, 4, 2, 2),
               [torch.randn(1, 256, 2, 2), torch.randn(1, 128, 4, 4), torch.randn(1, 64, 8, 8)])
    assert out.shape == (1, 3, 8, 8)


def test_shapes_and_detector_width():
    torch.manual_seed(0)
    model = SQRModel(TinyDetector(), nheads=4)  # width and channels read from the detector
    assert [m.out_channels for m in model.seg_input_proj] == [20, 12, 8]  # C5, C4, C3 halved
    images, mask = _batch()
    out = model(images, mask)
    assert out["pred_masks"].shape == (2, 4, 8, 6)  # stride 16
    assert out["pred_logits"].shape == (2, 4, 3) and "hs" not in out and len(out["aux_outputs"]) == 1
    inter = model(images, mask, return_intermediates=True)
    assert inter["mask_attention"].shape == (2, 4, 4, 2, 2) and "features" in inter


@pytest.mark.parametrize("choice", ["input_proj", "encoder"])
def test_mask_head_input_is_the_chosen_level_and_attention_reads_the_encoder(choice):
    torch.manual_seed(0)
    model = SQRModel(TinyDetector(), nheads=4, mask_features=choice).eval()
    images, mask = _batch()
    with torch.no_grad():
        out = model(images, mask, return_intermediates=True)
        assert "srcs" in out and not torch.equal(out["srcs"][-1], out["memory"][-1])
        # the attention map reads the encoder's output (as the release's bbox_attention on seg_memory) ...
        attention = model.attention(out["hs"][-1], out["memory"][-1], out["memory_masks"][-1])
        torch.testing.assert_close(out["mask_attention"], attention)
        # ... and the head starts from srcs[-1] (the release) or from the encoder's output
        level = out["srcs" if choice == "input_proj" else "memory"][-1]
        feats = [f for f, _ in out["features"]][::-1]
        fpn = [proj(f) for proj, f in zip(model.seg_input_proj, feats)]
        torch.testing.assert_close(out["pred_masks"], model.mask_head(level, attention, fpn))
    assert "srcs" not in model(images, mask)


def test_mask_features_default_and_choices():
    from solq.config import ConfigError, load_config

    assert SQRModel(TinyDetector(), nheads=4).mask_features == "input_proj"  # the release
    assert load_config("paper-r50").model.sqr_mask_features == "input_proj"
    assert load_config("smoke", ["model.sqr_mask_features=encoder"]).model.sqr_mask_features == "encoder"
    with pytest.raises(ConfigError, match="sqr_mask_features"):
        load_config("smoke", ["model.sqr_mask_features=memory"])
    with pytest.raises(ValueError, match="mask_features"):
        SQRModel(TinyDetector(), nheads=4, mask_features="memory")


@pytest.mark.parametrize("preset, expected", [
    # the release's SQR baseline logs report n_parameters = 66,735,317: meta_arch deformable_detr + masks + box
    # refine at width 256 (solq-reference.md section 1.2), i.e. paper-r50; at the release script's width 384:
    ("paper-r50", 66_735_317), ("release-r50", 79_874_037)])
def test_parameter_count_matches_the_release(preset, expected):
    from solq.config import load_config
    from solq.models import build_model

    cfg = load_config(preset, ["model.mode=sqr", "model.num_classes=91"])  # COCO's 91 outputs, as the release
    model, _, _ = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"SQR {preset}: {trainable:,} trainable parameters")
    assert trainable == expected


def _targets():
    gen = torch.Generator().manual_seed(1)
    out = []
    for H, W in ((128, 96), (96, 96)):
        m = torch.zeros(2, H, W, dtype=torch.bool)
        m[0, 10:60, 20:70] = True
        m[1, 40:90, 5:50] = True
        xyxy = torch.tensor([[20, 10, 70, 60], [5, 40, 50, 90]], dtype=torch.float32)
        n = xyxy / torch.tensor([W, H, W, H])
        boxes = torch.cat([(n[:, :2] + n[:, 2:]) / 2, n[:, 2:] - n[:, :2]], 1)
        out.append({"labels": torch.randint(0, 3, (2,), generator=gen), "boxes": boxes, "masks": m,
                    "boxes_xyxy": xyxy})
    return out


def test_frozen_detector_gets_no_gradients_and_loss_decreases():
    torch.manual_seed(0)
    model = SQRModel(TinyDetector(), freeze_detector=True, nheads=4)
    model.train()
    assert not model.detector.training and model.mask_head.training
    crit = SetCriterion(3, HungarianMatcher(), losses=("labels", "boxes", "masks"), num_dec_layers=2)
    images, mask = _batch()
    targets = _targets()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in model.detector.parameters())
    opt = torch.optim.Adam(trainable, lr=3e-3)
    history = []
    for _ in range(25):
        losses = crit(model(images, mask), targets)
        total = losses["loss_mask"] * 20 + losses["loss_dice"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert all(p.grad is None for p in model.detector.parameters())
    assert all(p.grad is not None for p in trainable)
    assert history[-1] < 0.7 * history[0], history


def test_joint_training_reaches_the_detector():
    torch.manual_seed(0)
    model = SQRModel(TinyDetector(), nheads=4)
    crit = SetCriterion(3, HungarianMatcher(), losses=("labels", "boxes", "masks"), num_dec_layers=2)
    images, mask = _batch()
    losses = crit(model(images, mask), _targets())
    sum(losses[k] * w for k, w in crit.weight_dict.items() if k in losses).backward()
    assert model.detector.c3.weight.grad is not None and model.detector.c3.weight.grad.abs().sum() > 0
    branch = [p for n, p in model.named_parameters() if not n.startswith("detector.")]
    assert all(p.grad is not None for p in branch)


@pytest.mark.parametrize("frozen", [False, True])
def test_integration_smoke_sqr(frozen):
    from solq.config import load_config
    from solq.models import build_model

    cfg = load_config("smoke", overrides=["model.num_classes=7", "model.mode=sqr",
                                          f"model.sqr_frozen_detector={frozen}"])
    torch.manual_seed(0)
    model, crit, post = build_model(cfg)
    assert isinstance(model, SQRModel)
    images, mask = _batch()
    out = model(images, mask)
    assert out["pred_masks"].shape[:2] == (2, cfg.model.num_queries) and "pred_vectors" not in out
    losses = crit(out, _targets())
    assert {"loss_mask", "loss_dice"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses[k] * w for k, w in crit.weight_dict.items() if k in losses).backward()
    detector_grads = [p.grad is not None for p in model.detector.parameters() if p.requires_grad]
    assert (not detector_grads) if frozen else any(detector_grads)
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("detector."))
    res = post(out, torch.tensor([[256, 192], [192, 192]]), input_sizes=torch.tensor([[128, 96], [96, 96]]))
    assert res[1]["masks"].shape == (cfg.eval.topk, 192, 192)


def _empty_targets():
    return [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, H, 96, dtype=torch.bool), "boxes_xyxy": torch.zeros(0, 4)} for H in (128, 96)]


@pytest.mark.parametrize("targets", [_targets, _empty_targets])
def test_matched_masks_only_gives_the_full_forwards_loss_and_gradients(targets):
    """Training runs the mask head on the matched queries alone: the same losses and parameter gradients as the
    release's head over all B x Q queries (to float rounding); every mask-branch parameter still gets a gradient,
    with no object in the batch too."""
    from solq.config import load_config
    from solq.models import build_model

    cfg = load_config("smoke", overrides=["model.num_classes=7", "model.mode=sqr", "model.hidden_dim=32",
                                          "model.nheads=2", "model.num_queries=6", "model.dropout=0.0"])
    torch.manual_seed(0)
    model, crit, _ = build_model(cfg)
    assert model.matched_masks_only  # the default
    images, mask = _batch()
    model.train()
    results = []
    for lazy in (False, True):
        model.matched_masks_only = lazy
        model.zero_grad()
        torch.manual_seed(1)
        out = model(images, mask, targets=targets())
        assert ("pred_masks_for" in out) == lazy and ("pred_masks" in out) == (not lazy)
        losses = crit(out, targets())
        sum(losses[k] * w for k, w in crit.weight_dict.items() if k in losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (full, g_full), (lazy, g_lazy) = results
    for k in ("loss_mask", "loss_dice", "loss_ce", "loss_bbox"):
        torch.testing.assert_close(lazy[k], full[k], rtol=1e-5, atol=1e-6)
    assert g_lazy.keys() == g_full.keys()
    assert all(n in g_lazy for n, _ in model.named_parameters() if n.startswith("mask_head."))
    for n in g_full:
        torch.testing.assert_close(g_lazy[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()
    with torch.no_grad():
        assert "pred_masks" in model(images, mask, targets=targets())  # inference always runs the whole head


def test_matched_masks_only_under_bf16_autocast():
    """The loss calls the mask head after the forward's autocast block has closed: it runs under the forward's
    autocast dtype (as the full head would), so an AMP training step works."""
    from solq.config import load_config
    from solq.models import build_model

    cfg = load_config("smoke", overrides=["model.num_classes=7", "model.mode=sqr", "model.hidden_dim=32",
                                          "model.nheads=2", "model.num_queries=6"])
    torch.manual_seed(0)
    model, crit, _ = build_model(cfg)
    model.train()
    images, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask, targets=_targets())
    masks = out["pred_masks_for"](torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert masks.dtype == torch.bfloat16 and masks.shape[0] == 2
    losses = crit(out, _targets())
    assert torch.isfinite(losses["loss_mask"]) and torch.isfinite(losses["loss_dice"])
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert model.mask_head.out.weight.grad is not None

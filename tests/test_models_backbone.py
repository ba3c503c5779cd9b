"""Backbones: norms (frozen / batch / group), frozen stages, the small CPU network, the release's default."""
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from solq.config import ConfigError, load_config
from solq.models.backbone import Backbone, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _stage_trainable(bb: Backbone) -> dict:
    """{stage: any parameter trainable} for the stem (conv1/bn1) and layer1..4."""
    out = {}
    for name, p in bb.body.named_parameters():
        stage = "stem" if name.split(".")[0] in ("conv1", "bn1") else name.split(".")[0]
        out[stage] = out.get(stage, False) or p.requires_grad
    return out


def test_release_default_is_frozen_bn_with_stem_and_layer1_frozen():
    bb = Backbone("resnet18")
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert _stage_trainable(bb) == {"stem": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}


@pytest.mark.parametrize("norm, cls", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm)])
def test_trainable_norms_from_scratch(norm, cls):
    bb = Backbone("resnet18", norm=norm, freeze_stages=0)
    norms = [m for m in bb.modules() if isinstance(m, cls)]
    assert norms and all(p.requires_grad for m in norms for p in m.parameters())
    assert all(_stage_trainable(bb).values())
    x = torch.randn(2, 3, 64, 64)
    feats = bb(x, torch.zeros(2, 64, 64, dtype=torch.bool))
    sum(f.sum() for f, _ in feats).backward()
    assert all(p.grad is not None for p in bb.parameters())


def test_frozen_stages_keep_their_batchnorm_statistics():
    bb = Backbone("small", norm="batch", freeze_stages=2).train()
    stem_bn, l3_bn = bb.body.bn1, bb.body.layer3[1]
    before_stem, before_l3 = stem_bn.running_mean.clone(), l3_bn.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64) * 3 + 1, torch.zeros(2, 64, 64, dtype=torch.bool))
    assert torch.equal(stem_bn.running_mean, before_stem) and not stem_bn.training
    assert not torch.equal(l3_bn.running_mean, before_l3) and l3_bn.training
    assert _stage_trainable(bb) == {"stem": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}


def test_small_cnn_strides_and_channels():
    bb = Backbone("small", norm="group", freeze_stages=0)
    feats = bb(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
    assert [tuple(f.shape[-2:]) for f, _ in feats] == [(12, 16), (6, 8), (3, 4)]
    assert [f.shape[1] for f, _ in feats] == bb.num_channels == [64, 128, 192]
    assert bb.strides == [8, 16, 32]
    assert sum(p.numel() for p in SmallCNN().parameters()) < 1_000_000  # small enough for a CPU


def test_config_checks():
    with pytest.raises(ConfigError, match="backbone=small"):
        load_config("smoke", ["model.backbone=small", "model.backbone_norm=frozen"])
    with pytest.raises(ConfigError, match="freeze_stages"):
        load_config("smoke", ["model.freeze_stages=6"])
    with pytest.raises(ConfigError, match="backbone_norm"):
        load_config("smoke", ["model.backbone_norm=layer"])


# ------------------------------------------------------------------------------------------------- Swin (timm)
def test_swin_t_padded_batch_strides_channels_and_masks():
    from solq.models.backbone import resize_mask
    from solq.models.swin import SwinBackbone

    torch.manual_seed(0)
    bb = SwinBackbone("swin_t").eval()
    assert bb.num_channels == [192, 384, 768] and bb.strides == [8, 16, 32]
    H, W = 70, 93  # neither a multiple of the patch (4) nor of the window (7) at any stage
    images = torch.randn(2, 3, H, W)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[1, 50:] = True  # image 1 is 50 x 93, zero-padded below
    images[1, :, 50:] = 0
    with torch.no_grad():
        feats = bb(images, mask)
        cnn = Backbone("resnet18")(images, mask)
    padded = torch.nn.functional.pad(mask, (0, 3, 0, 2), value=True)  # to 72 x 96: the patch padding is padding
    for (f, m), (g, _), c, s in zip(feats, cnn, bb.num_channels, bb.strides):
        size = (-(-H // s), -(-W // s))
        assert f.shape == (2, c, *size) and f.is_contiguous() and torch.isfinite(f).all()
        assert f.shape[-2:] == g.shape[-2:]  # the same map sizes as a ResNet, so the detector sees no difference
        assert torch.equal(m, resize_mask(padded, size))
    assert feats[0][1][1, -1].all() and not feats[0][1][0].any()


def test_swin_t_detector_forward_and_gradients():
    from solq.models import build_model
    from solq.models.swin import SwinBackbone

    cfg = load_config("smoke", ["model.backbone=swin_t", "model.backbone_weights=", "model.num_classes=5"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    assert isinstance(model.backbone[0], SwinBackbone)
    assert [p[0].in_channels for p in model.input_proj] == [192, 384, 768]  # Swin-T's stages 1..3 (3 levels)
    images, mask = torch.randn(1, 3, 64, 84), torch.zeros(1, 64, 84, dtype=torch.bool)
    out = model(images, mask)
    assert out["pred_logits"].shape == (1, cfg.model.num_queries, 5)
    out["pred_logits"].sum().backward()
    body = [p for n, p in model.named_parameters() if n.startswith("backbone.0.body.layers_3")]
    assert body and all(p.requires_grad for p in model.backbone.parameters())  # a Swin trains every stage
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body)


def test_swin_l_builds_at_the_paper_size():
    """Swin-L as the paper's (the release's swin_l_p4w7): embedding 192, depths 2-2-18-2, window 7, stages 1..3 of
    384/768/1536 channels with one LayerNorm each; its trunk is timm's swin_large_patch4_window7_224 without the
    classifier and the final norm."""
    import timm

    from solq.models.swin import SwinBackbone

    bb = SwinBackbone("swin_l")
    assert bb.num_channels == [384, 768, 1536] and bb.strides == [8, 16, 32]
    assert bb.body.patch_embed.proj.out_channels == 192 and bb.body.patch_embed.proj.stride == (4, 4)
    assert [len(getattr(bb.body, f"layers_{i}").blocks) for i in range(4)] == [2, 2, 18, 2]
    block = bb.body.layers_3.blocks[1]
    assert block.window_size == (7, 7) and block.shift_size == (3, 3)  # shifted even on a map of one window
    assert bb.body.layers_3.blocks[1].drop_path1.drop_prob == pytest.approx(0.3)  # the last block's rate
    reference = timm.create_model("swin_large_patch4_window7_224", device="meta")  # shapes only, no memory
    trunk_reference = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith(("head.", "norm.")))
    trunk = sum(p.numel() for p in bb.body.parameters())
    total = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    print(f"Swin-L backbone: trunk {trunk:,} (timm swin_large without head and final norm: {trunk_reference:,}), "
          f"with the output norms {total:,} trainable")
    assert trunk == trunk_reference == 194_992_404
    assert total == trunk + 2 * (384 + 768 + 1536) == 194_997_780


def test_swin_options_and_missing_timm(monkeypatch):
    import solq.models.swin as swin

    with pytest.raises(ConfigError, match="dilation"):
        load_config("paper-r50", ["model.backbone=swin_l", "model.dilation=true"])
    calls = []

    def fake_create_model(name, **kwargs):  # records what would be built; never downloads
        calls.append((name, kwargs))
        raise RuntimeError("recorded")

    monkeypatch.setattr(swin.timm, "create_model", fake_create_model)
    for pretrained in (False, True):
        with pytest.raises(RuntimeError, match="recorded"):
            swin.SwinBackbone("swin_l", pretrained=pretrained)
    assert [(n, k["pretrained"]) for n, k in calls] == [
        ("swin_large_patch4_window7_224", False), ("swin_large_patch4_window7_224.ms_in22k_ft_in1k", True)]
    assert calls[0][1]["features_only"] and calls[0][1]["out_indices"] == (1, 2, 3)
    monkeypatch.setattr(swin, "timm", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[swin\]'"):
        swin.SwinBackbone("swin_t")

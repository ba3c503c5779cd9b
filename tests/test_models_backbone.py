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

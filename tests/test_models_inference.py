"""solq.models.inference: folding BatchNorm into convolutions and channels_last keep the outputs and leave the
original model untouched."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from solq.config import load_config
from solq.models import build_model
from solq.models.backbone import Backbone
from solq.models.inference import fold_batchnorm, optimize_for_inference


def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine parameters in every norm (fresh ones are the identity map)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g) * 0.2 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _features(backbone, x):
    mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    return [f for f, _ in backbone(x, mask)]


@pytest.mark.parametrize("name,norm,count", [("resnet18", "frozen", 20), ("small", "batch", 9)])
def test_folding_keeps_the_features(name, norm, count):
    torch.manual_seed(0)
    backbone = Backbone(name, norm=norm, freeze_stages=0).eval()
    _randomise_norms(backbone)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        want = _features(backbone, x)
        folded = copy.deepcopy(backbone)
        assert fold_batchnorm(folded) == count  # every norm of these networks follows a convolution
        assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
        got = _features(folded, x)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_folding_refuses_batchnorm_in_training_mode():
    backbone = Backbone("small", norm="batch", freeze_stages=0).train()
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(backbone)


def test_norms_after_other_layers_are_left_alone():
    net = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(net) == 1
    assert isinstance(net[1], nn.BatchNorm2d) and isinstance(net[3], nn.Identity)
    assert net[2].bias is not None


@pytest.mark.parametrize("mode", ["uqr", "sqr"])
def test_optimised_model_matches_and_original_is_untouched(mode):
    cfg = load_config("smoke", [f"model.mode={mode}", "model.num_classes=5", "model.hidden_dim=32", "model.nheads=2",
                                "model.num_queries=8", "model.backbone_weights="])
    torch.manual_seed(0)
    model = build_model(cfg)[0].eval()
    _randomise_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, mask = torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        want = model(images, mask)
        fast = optimize_for_inference(model)
        got = fast(images, mask)
    for key in ("pred_logits", "pred_boxes") + (("pred_vectors",) if mode == "uqr" else ("pred_masks",)):
        assert (got[key] - want[key]).abs().max() <= 1e-4 * want[key].abs().max(), key
    backbone = (fast.detector if mode == "sqr" else fast).backbone[0]
    assert backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

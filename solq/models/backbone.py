"""ResNet backbone with frozen batch norm returning C3-C5 and their padding masks (reference §2.2).

State-dict names follow the release: the detector's ``backbone`` is a :class:`Joiner` whose item 0 is
:class:`Backbone` (torchvision ResNet under ``body``, no ``fc``) and item 1 the stateless position
encoding, so keys read ``backbone.0.body.layer2.0.conv1.weight`` etc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import PositionEmbeddingSine

__all__ = ["Backbone", "Joiner", "resize_mask"]

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-resize a padding mask. mask: bool [B,H,W] -> bool [B,h,w] (True = padding)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a ResNet stage: those of the last conv of its last block."""
    convs = [m for m in layer[-1].modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class Backbone(nn.Module):
    """torchvision ResNet-18/34/50/101 with FrozenBatchNorm2d returning layer2..layer4 (C3, C4, C5).

    The stem and layer1 are always frozen; layer2-4 are trainable iff ``train_backbone``. With
    ``dilation`` the last stage is dilated (stride 16 instead of 32). ``pretrained`` loads torchvision's
    ImageNet weights (IMAGENET1K_V1, as the release's ``pretrained=True``); this needs the network or
    the torch hub cache, so it is never used in tests.

    Attributes: ``num_channels`` [C3, C4, C5] channel counts read from the network; ``strides``.
    """

    def __init__(self, name: str = "resnet50", *, train_backbone: bool = True, dilation: bool = False,
                 pretrained: bool = False):
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"model.backbone: unknown backbone {name!r}; choose one of {list(_RESNETS)}")
        weights = None
        if pretrained:
            weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
        kwargs = {}
        if dilation:
            if name in ("resnet18", "resnet34"):
                raise ValueError(f"model.dilation is not supported by {name} (BasicBlock has no dilation)")
            kwargs["replace_stride_with_dilation"] = [False, False, True]
        net = getattr(torchvision.models, name)(weights=weights, norm_layer=FrozenBatchNorm2d, **kwargs)
        for pname, p in net.named_parameters():
            trainable = train_backbone and any(s in pname for s in ("layer2", "layer3", "layer4"))
            p.requires_grad_(trainable)
        self.num_channels = [_out_channels(getattr(net, f"layer{i}")) for i in (2, 3, 4)]
        self.strides = [8, 16, 16 if dilation else 32]
        self.body = IntermediateLayerGetter(net, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images: [B,3,H,W]; mask: bool [B,H,W] True on padding.

        Returns [(C3 [B,C_3,H/8,W/8], mask [B,H/8,W/8]), (C4, mask), (C5, mask)] with nearest-resized masks.
        """
        out = []
        for feat in self.body(images).values():
            out.append((feat, resize_mask(mask, feat.shape[-2:])))
        return out


class Joiner(nn.Sequential):
    """``[0]`` the :class:`Backbone`, ``[1]`` the position encoding (release layout ``backbone.{0,1}``)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Same as :meth:`Backbone.forward`."""
        return self[0](images, mask)

    def position(self, mask: torch.Tensor) -> torch.Tensor:
        """Position encoding of one level: mask bool [B,h,w] -> float32 [B,d,h,w]."""
        return self[1](mask)

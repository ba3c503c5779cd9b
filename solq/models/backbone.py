"""CNN backbones returning C3-C5 and their padding masks: torchvision ResNets (as in the authors' release) and a small
plain CNN for CPU-scale runs.

State-dict names follow the release: the detector's ``backbone`` is a :class:`Joiner` whose item 0 is
:class:`Backbone` (the network under ``body``, no ``fc``) and item 1 the stateless position encoding, so keys
read ``backbone.0.body.layer2.0.conv1.weight`` etc. The small CNN uses the same stage names (``conv1``,
``bn1``, ``layer1..4``), so freezing by stage and the optimiser's backbone group work alike for both.

Normalisation (``norm``): ``frozen`` is the release's FrozenBatchNorm2d, right for ImageNet weights and the
authors' checkpoints; with random weights it normalises nothing (it is a fixed affine map), so training from
scratch needs ``batch`` (trainable BatchNorm2d) or ``group`` (GroupNorm, batch-size independent).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import PositionEmbeddingSine

__all__ = ["Backbone", "Joiner", "SmallCNN", "resize_mask", "norm_layer", "load_backbone_weights", "BACKBONES",
           "NORMS", "STAGES"]

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = _RESNETS + ("small",)
NORMS = ("frozen", "batch", "group")
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # the stem, then the four stages (C2..C5)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-resize a padding mask. mask: bool [B,H,W] -> bool [B,h,w] (True = padding)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as GroupNorm's paper where channels allow, else groups of 4-8 channels
    return nn.GroupNorm(32 if channels % 32 == 0 and channels >= 64 else max(1, channels // 8), channels)


def norm_layer(kind: str):
    """The normalisation constructor (channels -> module) for ``kind`` in :data:`NORMS`."""
    if kind not in NORMS:
        raise ValueError(f"model.backbone_norm: {kind!r} is not one of {list(NORMS)}")
    return {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d, "group": _group_norm}[kind]


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a stage: those of the last conv in it."""
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class SmallCNN(nn.Module):
    """A plain conv-norm-ReLU network with ResNet's stage layout and strides, for CPU-scale training.

    ``conv1``/``bn1``/``relu``: 3x3 stride-2 stem (``widths[0]`` channels); ``layer1..4``: each a 3x3 stride-2
    conv then ``depth - 1`` 3x3 convs (widths[1..4] channels), so layer2..4 have strides 8, 16, 32.
    forward: [B,3,H,W] -> [B,widths[4],H/32,W/32] (used through IntermediateLayerGetter).
    """

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 128, 192), depth: int = 2, norm=nn.BatchNorm2d):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"SmallCNN: widths needs 5 entries (stem, layer1..4), got {widths}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for i in range(1, 5):
            convs = []
            for j in range(depth):
                cin = widths[i - 1] if j == 0 else widths[i]
                convs += [nn.Conv2d(cin, widths[i], 3, stride=2 if j == 0 else 1, padding=1, bias=False),
                          norm(widths[i]), nn.ReLU(inplace=True)]
            setattr(self, f"layer{i}", nn.Sequential(*convs))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


class Backbone(nn.Module):
    """A ResNet-18/34/50/101 (torchvision) or :class:`SmallCNN` returning layer2..layer4 (C3, C4, C5).

    Args:
        name: one of :data:`BACKBONES`.
        train_backbone: False freezes the whole network.
        freeze_stages: the first this many of :data:`STAGES` (stem, layer1, ...) are frozen (the release: 2,
            stem and layer1, meant for ImageNet weights); 0 trains everything.
        norm: "frozen" | "batch" | "group" (see the module docstring).
        dilation: the last ResNet stage dilated (stride 16 instead of 32).
        pretrained: torchvision's ImageNet weights (IMAGENET1K_V1, as the release's ``pretrained=True``);
            needs the network or the torch hub cache, so never used in tests.

    Attributes: ``num_channels`` [C3, C4, C5] channel counts read from the network; ``strides``.
    """

    def __init__(self, name: str = "resnet50", *, train_backbone: bool = True, dilation: bool = False,
                 pretrained: bool = False, norm: str = "frozen", freeze_stages: int = 2):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"model.backbone: unknown backbone {name!r}; choose one of {list(BACKBONES)}")
        if not 0 <= freeze_stages <= len(STAGES):
            raise ValueError(f"model.freeze_stages must be in 0..{len(STAGES)}, got {freeze_stages}")
        if name == "small":
            if pretrained or dilation:
                raise ValueError("model.backbone=small has no pretrained weights and no dilation")
            net = SmallCNN(norm=norm_layer(norm))
        else:
            weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"] if pretrained else None
            kwargs = {}
            if dilation:
                if name in ("resnet18", "resnet34"):
                    raise ValueError(f"model.dilation is not supported by {name} (BasicBlock has no dilation)")
                kwargs["replace_stride_with_dilation"] = [False, False, True]
            net = getattr(torchvision.models, name)(weights=weights, norm_layer=norm_layer(norm), **kwargs)
        frozen = STAGES[:freeze_stages]
        for pname, p in net.named_parameters():
            stage = "conv1" if pname.split(".")[0] in ("conv1", "bn1") else pname.split(".")[0]
            p.requires_grad_(train_backbone and stage not in frozen and stage in STAGES)
        # BatchNorm of a frozen stage keeps its running statistics too (see train())
        self._frozen_norms = [m for st in frozen for m in ([net.bn1] if st == "conv1" else getattr(net, st).modules())
                              if isinstance(m, nn.BatchNorm2d)] if train_backbone else \
            [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        self.num_channels = [_out_channels(getattr(net, f"layer{i}")) for i in (2, 3, 4)]
        self.strides = [8, 16, 16 if dilation else 32]
        self.body = IntermediateLayerGetter(net, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images: [B,3,H,W]; mask: bool [B,H,W] True on padding.

        Returns [(C3 [B,C_3,H/8,W/8], mask [B,H/8,W/8]), (C4, mask), (C5, mask)] with nearest-resized masks.
        """
        out = []
        for feat in self.body(images).values():
            out.append((feat, resize_mask(mask, feat.shape[-2:])))
        return out


def load_backbone_weights(backbone: Backbone, file: str | Path, *, arch: str) -> dict:
    """Load a file written by ``solq pretrain-backbone`` into ``backbone.body``; returns its metadata.

    The file must be {"format": "solq-backbone-1", "arch", "norm", "state_dict", "meta"} with ``arch`` and the
    norm of ``backbone`` matching; raises ValueError naming the file and the mismatch otherwise."""
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "solq-backbone-1":
        raise ValueError(f"{file}: not a solq backbone file (expected format 'solq-backbone-1')")
    norms = {type(m) for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d))}
    want = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm, "frozen": FrozenBatchNorm2d}.get(state.get("norm"))
    if state.get("arch") != arch or (want is not None and norms and want not in norms):
        raise ValueError(f"{file}: weights of backbone {state.get('arch')!r} with norm {state.get('norm')!r}, but "
                         f"model.backbone={arch!r} with {sorted(t.__name__ for t in norms)}; set "
                         f"model.backbone_weights to matching weights, or to '' to start from random weights")
    missing, unexpected = backbone.body.load_state_dict(state["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{file}: backbone keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return dict(state.get("meta", {}))


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

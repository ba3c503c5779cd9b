"""Swin Transformer backbones (Swin-T/S/B/L, patch 4, window 7) from timm, as the release's ``swin_{t,s,b,l}_p4w7``.

The release's detection Swin (its ``models/swin_transformer.py``) returns stages 1..3 (strides 8, 16, 32; channels
2C, 4C, 8C for embedding width C), each through a LayerNorm of its own (``norm1..3``), with stochastic depth rising
linearly over the blocks to 0.2 (T, S) or 0.3 (B, L). Here timm's ``features_only`` model gives the same stages and
sizes; :class:`SwinBackbone` adds the three output norms and turns timm's channels-last maps into [B,C,h,w].

Input sizes: any. The image is padded bottom/right to a multiple of the patch size (4), with the padding marked in
the mask, as the release's patch embedding pads; stages then pad to even sizes before each patch merging and to the
window inside attention (timm's ``strict_img_size=False``), so a stage's map is ceil(H/stride) x ceil(W/stride), the
same sizes as a ResNet's. ``always_partition`` keeps the shifted windows on maps no larger than a window, as the
release does (timm would otherwise drop the shift on a 7x7 map).

timm is the optional extra ``swin``: ``pip install -e '.[swin]'`` (also in ``dev``). Without it, building a Swin
backbone raises ModuleNotFoundError saying so; everything else works.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import resize_mask

try:
    import timm
except ModuleNotFoundError:  # the optional extra "swin"
    timm = None

__all__ = ["SwinBackbone", "SwinSpec", "SWIN", "PATCH_SIZE"]

PATCH_SIZE = 4


class SwinSpec(NamedTuple):
    """timm's model name, the release's stochastic-depth rate, and the pretrained weights' timm tag."""

    timm_name: str
    drop_path_rate: float
    weights: str


SWIN = {
    "swin_t": SwinSpec("swin_tiny_patch4_window7_224", 0.2, "ms_in1k"),
    "swin_s": SwinSpec("swin_small_patch4_window7_224", 0.2, "ms_in1k"),
    "swin_b": SwinSpec("swin_base_patch4_window7_224", 0.3, "ms_in1k"),
    # the paper's Swin-L: ImageNet-22k weights fine-tuned on 1k at 224 px, window 7 (the authors' issue #19)
    "swin_l": SwinSpec("swin_large_patch4_window7_224", 0.3, "ms_in22k_ft_in1k"),
}


class SwinBackbone(nn.Module):
    """A Swin Transformer returning stages 1..3 (C3, C4, C5) with their padding masks.

    Args:
        name: one of :data:`SWIN` (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l``).
        train_backbone: False freezes the whole network (the release trains every stage of a Swin).
        pretrained: timm's ImageNet weights (:attr:`SwinSpec.weights`); needs the network or the Hugging Face
            cache, so never used in tests. The output norms start at identity either way (not in those weights).
        drop_path_rate: stochastic depth at the last block; None = the release's rate for ``name``.

    Attributes: ``num_channels`` [C3, C4, C5] (e.g. Swin-L: 384, 768, 1536); ``strides`` [8, 16, 32]; ``body``
    the timm network; ``norms`` one LayerNorm per returned stage.
    """

    def __init__(self, name: str = "swin_t", *, train_backbone: bool = True, pretrained: bool = False,
                 drop_path_rate: float | None = None):
        super().__init__()
        if name not in SWIN:
            raise ValueError(f"model.backbone: unknown Swin backbone {name!r}; choose one of {list(SWIN)}")
        if timm is None:
            raise ModuleNotFoundError(f"model.backbone={name} needs timm, the optional extra 'swin': "
                                      f"pip install -e '.[swin]'")
        spec = SWIN[name]
        self.body = timm.create_model(
            f"{spec.timm_name}.{spec.weights}" if pretrained else spec.timm_name, pretrained=pretrained,
            features_only=True, out_indices=(1, 2, 3), strict_img_size=False, always_partition=True,
            drop_path_rate=spec.drop_path_rate if drop_path_rate is None else drop_path_rate)
        self.num_channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.num_channels)
        self.requires_grad_(train_backbone)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images: [B,3,H,W]; mask: bool [B,H,W] True on padding.

        Returns [(C3 [B,C_3,ceil(H/8),ceil(W/8)], mask [B,ceil(H/8),ceil(W/8)]), (C4, mask), (C5, mask)] with
        nearest-resized masks (the patch padding counted as padding)."""
        H, W = images.shape[-2:]
        pad_h, pad_w = -H % PATCH_SIZE, -W % PATCH_SIZE
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        out = []
        for feat, norm, channels, stride in zip(self.body(images), self.norms, self.num_channels, self.strides):
            size = (-(-images.shape[-2] // stride), -(-images.shape[-1] // stride))
            feat = _channels_last(feat, channels, size)
            feat = norm(feat).permute(0, 3, 1, 2).contiguous()
            out.append((feat, resize_mask(mask, size)))
        return out


def _channels_last(feat: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A stage map as [B,h,w,C] whether timm gave it channels-last (its Swin does) or [B,C,h,w]; raises
    RuntimeError when it is neither shape (a timm change this code does not know)."""
    if feat.dim() == 4 and tuple(feat.shape[1:]) == (*size, channels):
        return feat
    if feat.dim() == 4 and tuple(feat.shape[1:]) == (channels, *size):
        return feat.permute(0, 2, 3, 1)
    raise RuntimeError(f"Swin stage of shape {tuple(feat.shape)}: expected [B,{size[0]},{size[1]},{channels}] "
                       f"or [B,{channels},{size[0]},{size[1]}]")

"""Sine position encoding of a padded feature map (the authors' release, the Deformable-DETR variant)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of pixel positions, counted over the non-padded area only.

    With m the non-padding indicator, y = cumsum of m down the rows and x = cumsum along the columns;
    when ``normalize``, each is mapped to ``(p - 0.5) / (p_last + 1e-6) * scale`` so the valid area spans
    (0, scale]. Channel i of an axis uses the frequency ``temperature ** (2 * (i // 2) / F)``, sine on even
    channels and cosine on odd ones. The output is concat(pos_y, pos_x) with 2F channels.
    The module has no state (the release's ``backbone.1``).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: bool [B,H,W], True on padding. Returns float32 [B, 2*num_pos_feats, H, W]."""
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
            x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        f = self.num_pos_feats
        i = torch.arange(f, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / f)
        even = (torch.arange(f, device=mask.device) % 2) == 0

        def encode(p: torch.Tensor) -> torch.Tensor:  # [B,H,W] -> [B,F,H,W]
            a = p[..., None] / dim_t
            return torch.where(even, a.sin(), a.cos()).permute(0, 3, 1, 2)

        return torch.cat([encode(y), encode(x)], dim=1)

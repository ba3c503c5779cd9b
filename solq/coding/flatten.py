"""Flatten coding, the paper's Table 3a baseline: the 28x28 box crop itself as a 784-d vector.

The codec's resolution is 28 whatever the other codecs use: callers crop directly at
``codec.resolution`` (``crop_to_box(masks, boxes, 28)``) and ``paste_in_image`` takes any map size.
``encode`` also accepts square crops of another size and resizes them to 28x28 first (area averaging
when shrinking, bilinear when enlarging), so a 128x128 crop gives a soft 28x28 target.
Trained with MSE + dice on the decoded map (``loss_type = "mse_dice"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Codec, register_codec

__all__ = ["FlattenCodec"]


@register_codec
class FlattenCodec(Codec):
    """``encode`` [K,S,S] -> [K,r²] (r = resolution, 28 by default); ``decode`` [K,r²] -> [K,r,r] clamped to [0,1]."""

    name = "flatten"
    loss_type = "mse_dice"

    @classmethod
    def config_params(cls, c) -> dict:
        """always 28x28 = 784-d (paper Table 3a): the config's resolution and num_coeffs do not apply."""
        return {}

    def __init__(self, resolution: int = 28, threshold: str = "0.5"):
        super().__init__(resolution, int(resolution) ** 2, threshold)

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, threshold={self.threshold!r}"

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [K,S,S] (any S; resized to r x r when S != r) -> [K,r²]."""
        if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[1] != masks.shape[2]:
            raise ValueError(f"flatten codec: encode expects square masks [K,S,S], got "
                             f"{tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__}")
        m = masks if masks.is_floating_point() else masks.float()
        r = self.resolution
        if m.shape[1] != r and m.shape[0] > 0:
            mode = "area" if m.shape[1] > r else "bilinear"
            kwargs = {} if mode == "area" else {"align_corners": False}
            m = F.interpolate(m[:, None], size=(r, r), mode=mode, **kwargs)[:, 0]
        return m.reshape(m.shape[0], r * r)

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [K,r²] -> map [K,r,r] in [0,1] (clamped; differentiable inside the range)."""
        v = self._check_vectors(vectors)
        return v.clamp(0, 1).reshape(v.shape[0], self.resolution, self.resolution)

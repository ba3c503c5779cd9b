"""Multi-scale deformable attention (Deformable DETR's ``MSDeformAttn``) with swappable sampling backends.

A backend is a function ``(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights) -> output`` with the shapes of :func:`ms_deform_attn_reference`; it is chosen by name
from :data:`BACKENDS`: ``reference`` (one ``grid_sample`` per level, the definition), ``fused`` (one weighted
``embedding_bag`` over precomputed bilinear taps, ``msda_fused.py``), ``triton`` (GPU kernel, ``msda_triton.py``)
and ``auto`` (Triton on CUDA when available, else fused). The module itself computes the
sampling locations and the softmaxed weights in float32 and keeps parameter names of the release
(``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .heads import upcast
from .msda_fused import ms_deform_attn_fused
from .msda_reference import ms_deform_attn_reference
from .msda_triton import ms_deform_attn_auto, ms_deform_attn_triton

__all__ = ["MSDeformAttn", "ms_deform_attn_reference", "BACKENDS", "get_backend"]


# name -> sampling function. "auto" chooses per call: the Triton kernel for CUDA tensors when Triton works
# (checked once), else the fused path; "reference" is the definition the others are tested against.
BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": ms_deform_attn_reference,
    "fused": ms_deform_attn_fused,
    "triton": ms_deform_attn_triton,
    "auto": ms_deform_attn_auto,
}


def get_backend(name: str) -> Callable[..., torch.Tensor]:
    """Resolve a backend name (a key of :data:`BACKENDS`) to its sampling function."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend: {name!r} is not available; registered: {sorted(BACKENDS)}")
    return BACKENDS[name]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with M heads, L levels and P points per head and level.

    Args: d_model, n_levels, n_heads, n_points, backend (name in :data:`BACKENDS` or "auto").
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self._sample = get_backend(backend)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: offsets start on M evenly spread directions at distances 1..P (in pixels of
        each level), uniform attention (zero weight and bias), xavier projections with zero bias."""
        M, L, P = self.n_heads, self.n_levels, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # [M,2], max-abs = 1
        scale = torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
        bias = direction.view(M, 1, 1, 2) * scale  # [M,1,P,2]
        self.sampling_offsets.bias.copy_(bias.expand(M, L, P, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None, return_attention: bool = False):
        """query: [B,Q,d]; reference_points: [B,Q,L,2] points (x, y) or [B,Q,L,4] boxes (cx, cy, w, h),
        normalised to each level's padded map; value: [B,S,d]; spatial_shapes: int64 [L,2] (H, W);
        level_start_index: int64 [L]; padding_mask: bool [B,S] True on padding (values there are zeroed).

        Returns out [B,Q,d]; with ``return_attention`` also (locations [B,Q,M,L,P,2] (x, y),
        weights [B,Q,M,L,P]), both float32 (or float64 for float64 inputs).
        """
        B, Q, _ = query.shape
        S = value.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if spatial_shapes.shape[0] != L:
            raise ValueError(f"MSDeformAttn built for {L} levels got {spatial_shapes.shape[0]}")
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        logits = self.attention_weights(query).view(B, Q, M, L * P)
        # Locations and bilinear sampling lose too much in half precision: run them in float32.
        with torch.autocast(device_type=query.device.type, enabled=False):
            value, offsets, logits = upcast(value), upcast(offsets), upcast(logits)
            ref = upcast(reference_points).to(offsets.dtype)
            weights = logits.softmax(-1).view(B, Q, M, L, P)
            if ref.shape[-1] == 2:
                # ref + offsets / (W, H) of each level, with the level, point and x/y axes as one contiguous
                # last axis of L*P*2: the [B,Q,M,L,P,2] broadcast of the plain form ran at about a tenth of
                # the speed (10 ms against 1 per encoder layer at the Table 5 shape); same values
                normalizer = spatial_shapes.flip(-1).to(offsets.dtype)[:, None, :].expand(L, P, 2).reshape(-1)
                ref_lp = ref[:, :, None, :, None, :].expand(B, Q, 1, L, P, 2).reshape(B, Q, 1, L * P * 2)
                locations = (offsets.reshape(B, Q, M, L * P * 2) / normalizer).add_(ref_lp).view(B, Q, M, L, P, 2)
            elif ref.shape[-1] == 4:
                locations = (ref[:, :, None, :, None, :2]
                             + offsets / P * ref[:, :, None, :, None, 2:] * 0.5)
            else:
                raise ValueError(f"reference_points must end in 2 or 4, got shape {tuple(ref.shape)}")
            out = self._sample(value, spatial_shapes, level_start_index, locations, weights)
        out = self.output_proj(out.to(query.dtype))
        if return_attention:
            return out, (locations, weights)
        return out

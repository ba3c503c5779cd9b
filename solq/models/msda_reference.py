"""The definition of multi-scale deformable sampling, in plain PyTorch: every backend is tested against it.

Its own module, below the backends (``msda_fused``, ``msda_triton``) and ``deformable_attention``, which all
need it, so none of them imports another in a circle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch sampling: bilinear, zeros outside, align_corners=False (pixel centres at (i+0.5)/W).

    value: [B,S,M,Dh] with S = sum_l H_l*W_l (levels concatenated in order);
    spatial_shapes: int64 [L,2] (H_l, W_l); level_start_index: int64 [L] (each level's offset in S, used only
    while tracing for ONNX export); sampling_locations: [B,Q,M,L,P,2] normalised (x, y) in [0,1];
    attention_weights: [B,Q,M,L,P]. Returns [B,Q,M*Dh] (head m in channels m*Dh:(m+1)*Dh).
    """
    B, S, M, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if torch.jit.is_tracing():
        # ONNX export (TorchScript tracer): Python ints from .tolist() would be recorded as constants and fix the
        # input size; 0-dim tensors indexed out of spatial_shapes / level_start_index keep the sizes symbolic.
        # The number of levels is fixed by the model, so the loop itself may unroll.
        shapes = [(spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]) for lvl in range(len(spatial_shapes))]
        starts = [level_start_index[lvl] for lvl in range(len(shapes))]
        values = [value[:, start:start + h * w] for start, (h, w) in zip(starts, shapes)]
    else:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].permute(0, 2, 3, 1).reshape(B * M, Dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [BM,Dh,Q,P]
        a = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 1)
        # weighted sum over points as a batched mat-vec: [BM,Q,Dh,P] @ [BM,Q,P,1] -> [BM,Q,Dh,1]
        part = torch.matmul(sampled.transpose(1, 2), a)
        out = part if out is None else out + part
    return out.view(B, M, Q, Dh).transpose(1, 2).reshape(B, Q, M * Dh)

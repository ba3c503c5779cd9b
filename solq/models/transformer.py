"""Deformable transformer: encoder, decoder with iterative box refinement, two-stage queries (as the authors'
release).

Module names follow the release's state dict (``encoder.layers.{j}.self_attn.*``, ``decoder.layers.{k}.
cross_attn.*``, ``norm1/2/3``, ``linear1/2``, ``level_embed``, ``reference_points``, ``enc_output``,
``pos_trans`` ...). Unlike the release, the decoder does not own the detector's box heads: they are
passed to :meth:`DeformableTransformer.forward`, so the state dict has no duplicated keys.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .deformable_attention import MSDeformAttn
from .dropout import dropout, relu_dropout
from .heads import refine_boxes, upcast

__all__ = ["DeformableTransformer", "DeformableEncoderLayer", "DeformableDecoderLayer", "valid_ratio"]


def _ffn(d_model: int, d_ffn: int, activation: str) -> tuple[nn.Linear, nn.Linear, Callable]:
    """linear1, linear2 and the activation; "glu" halves its input, so linear1 doubles its output."""
    acts = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "glu": F.glu}
    if activation not in acts:
        raise ValueError(f"model.activation: {activation!r} is not one of {sorted(acts)}")
    expand = 2 if activation == "glu" else 1
    return nn.Linear(d_model, d_ffn * expand), nn.Linear(d_ffn, d_model), acts[activation]


def _activation_dropout(x: torch.Tensor, activation: Callable, module: nn.Dropout) -> torch.Tensor:
    """dropout(activation(x)); for ReLU the fused form that keeps one tensor for the backward (bit-identical,
    ``dropout.py``). x is linear1's fresh output, so where the plain composition runs (eval, p = 0, no grad)
    the ReLU runs in place on it (addmm's backward does not need its output): no second [tokens, d_ffn] tensor."""
    if activation is F.relu:
        return relu_dropout(x, module.p, module.training, inplace=True)
    return _dropout(activation(x), module)


def _dropout(x: torch.Tensor, module: nn.Dropout) -> torch.Tensor:
    """module(x) keeping a bool mask for the backward (bit-identical, ``dropout.py``); the nn.Dropout modules
    stay for their p and train/eval state, as in the release."""
    return dropout(x, module.p, module.training)


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of a padded map that is valid. mask: bool [B,H,W] True on padding -> float32 [B,2] (w, h),
    counted along the first row and the first column."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H
    valid_w = (~mask[:, 0, :]).sum(1).float() / W
    return torch.stack([valid_w, valid_h], -1)


def _spatial_shapes(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Per-level sizes as the attention wants them: shapes, L pairs (H_l, W_l) -> int64 [L,2] on ``device``.

    While tracing (ONNX export) the sizes read from ``x.shape`` are 0-dim tensors recorded from the input's
    shape; stacking them keeps them symbolic, where ``torch.as_tensor`` would record their values as constants
    and fix the exported input size."""
    if torch.jit.is_tracing():
        return torch.stack([torch.stack([h, w]) for h, w in shapes]).to(device=device, dtype=torch.long)
    return torch.as_tensor(shapes, dtype=torch.long, device=device)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: src = LN(src + MSDA(src + pos)); src = LN(src + FFN(src))."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4, backend="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.linear2, self.activation = _ffn(d_model, d_ffn, activation)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: [B,S,d]; reference_points: [B,S,L,2]; padding_mask: bool [B,S]. Returns [B,S,d]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + _dropout(attn, self.dropout1))
        ffn = self.linear2(_activation_dropout(self.linear1(src), self.activation, self.dropout2))
        return self.norm2(src + _dropout(ffn, self.dropout3))


class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention (norm2), deformable cross-attention to the memory (norm1), FFN (norm3)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4, backend="auto"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1, self.linear2, self.activation = _ffn(d_model, d_ffn, activation)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, return_attention=False, self_attn_mask=None):
        """tgt, query_pos: [B,Q,d]; reference_points: [B,Q,L,2|4]; memory: [B,S,d]; memory_padding_mask:
        bool [B,S]; self_attn_mask: None or bool [Q,Q], True where query i may not attend to query j
        (separates query groups). Returns (tgt [B,Q,d], (locations, weights) or None)."""
        q = tgt + query_pos
        attn_out = self.self_attn(q, q, tgt, need_weights=False, attn_mask=self_attn_mask)[0]
        tgt = self.norm2(tgt + _dropout(attn_out, self.dropout2))
        out = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                              memory_padding_mask, return_attention=return_attention)
        out, attn = out if return_attention else (out, None)
        tgt = self.norm1(tgt + _dropout(out, self.dropout1))
        ffn = self.linear2(_activation_dropout(self.linear1(tgt), self.activation, self.dropout3))
        return self.norm3(tgt + _dropout(ffn, self.dropout4)), attn


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by each level's valid size, then expressed in every
        level's padded frame. shapes: (H_l, W_l) per level (ints; 0-dim tensors while tracing);
        valid_ratios: [B,L,2] -> [B,S,L,2] (x, y)."""
        refs = []
        dev, dt = valid_ratios.device, valid_ratios.dtype
        for lvl, (h, w) in enumerate(shapes):
            ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dt, device=dev),
                                    torch.linspace(0.5, w - 0.5, w, dtype=dt, device=dev), indexing="ij")
            ry = ry.reshape(1, -1) / (valid_ratios[:, lvl, 1:2] * h)
            rx = rx.reshape(1, -1) / (valid_ratios[:, lvl, 0:1] * w)
            refs.append(torch.stack([rx, ry], -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, shapes, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask):
        ref = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, tgt, reference, memory, spatial_shapes, level_start_index, valid_ratios, query_pos,
                memory_padding_mask, bbox_embed: Optional[nn.ModuleList] = None, return_attention=False,
                self_attn_mask=None):
        """tgt, query_pos: [B,Q,d]; reference: [B,Q,2|4] normalised to the valid area; bbox_embed: per-layer
        box heads for iterative refinement (None: the reference stays fixed); self_attn_mask: bool [Q,Q] or
        None (see :class:`DeformableDecoderLayer`).

        Returns hs [L,B,Q,d], references after each layer [L,B,Q,2|4] (detached), attention list (or [])."""
        hs, refs, attention = [], [], []
        for k, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:
                ref_in = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_in = reference[:, :, None] * valid_ratios[:, None]
            tgt, attn = layer(tgt, query_pos, ref_in, memory, spatial_shapes, level_start_index,
                              memory_padding_mask, return_attention, self_attn_mask)
            if bbox_embed is not None:
                # Each layer refines the previous box; gradients do not flow through the reference.
                reference = refine_boxes(bbox_embed[k](tgt), reference).detach()
            hs.append(tgt)
            refs.append(reference)
            if return_attention:
                attention.append({"locations": attn[0], "weights": attn[1]})
        return torch.stack(hs), torch.stack(refs), attention


class DeformableTransformer(nn.Module):
    """Flattens the levels, runs the encoder, initialises queries and runs the decoder.

    Args mirror the release: d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
    dropout, activation, num_feature_levels, enc_n_points, dec_n_points, two_stage,
    two_stage_num_proposals, attention_backend.
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, activation="relu", num_feature_levels=4, enc_n_points=4, dec_n_points=4,
                 two_stage=False, two_stage_num_proposals=300, attention_backend="auto"):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        common = dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, activation=activation,
                      n_levels=num_feature_levels, n_heads=nhead, backend=attention_backend)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **common)
        self.decoder = DeformableDecoder(num_decoder_layers, n_points=dec_n_points, **common)
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference order: xavier on every matrix, re-init each MSDA, reference_points xavier / zero bias,
        level embeddings N(0, 1)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def _proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of unnormalised boxes [B,Q,4] -> [B,Q,2d] (d/2 frequencies per coordinate)."""
        f = self.d_model // 2
        i = torch.arange(f, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / f)
        a = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t  # [B,Q,4,f]
        even = (torch.arange(f, device=proposals.device) % 2) == 0
        return torch.where(even, a.sin(), a.cos()).flatten(2)

    @staticmethod
    def _encoder_proposals(memory, padding_mask, shapes):
        """Per-token proposal boxes (centre (j+0.5)/valid size, side 0.05*2^level) as logits [B,S,4];
        padded or near-border tokens get +inf and a zeroed memory. Returns (memory [B,S,d], proposals)."""
        B = memory.shape[0]
        props, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = padding_mask[:, start:start + h * w].view(B, h, w)
            scale = torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1).to(memory.dtype)
            gy, gx = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                    torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
            grid = (torch.stack([gx, gy], -1)[None] + 0.5) / scale[:, None, None, :]
            wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
            props.append(torch.cat([grid, wh], -1).view(B, -1, 4))
            start += h * w
        props = torch.cat(props, 1)
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        invalid = padding_mask[..., None] | ~valid
        props = props.masked_fill(invalid, float("inf"))
        return memory.masked_fill(invalid, 0.0), props

    def box_query_pos(self, coords: torch.Tensor) -> torch.Tensor:
        """Two-stage query positions of boxes given as logits [B,Q,4] -> [B,Q,d] (the first half of pos_trans)."""
        return self.pos_trans_norm(self.pos_trans(self._proposal_pos_embed(coords)))[..., :self.d_model]

    def forward(self, srcs, masks, pos_embeds, query_embed=None, *, bbox_embed=None, enc_class_embed=None,
                enc_bbox_embed=None, return_attention=False, num_extra_proposals=0, self_attn_mask=None,
                extra_queries=None) -> dict:
        """srcs, pos_embeds: per level [B,d,H_l,W_l]; masks: per level bool [B,H_l,W_l]; query_embed: [Q,2d]
        (query_pos | tgt; single-stage); bbox_embed: per-decoder-layer box heads for refinement or None;
        enc_class_embed / enc_bbox_embed: heads scoring encoder tokens (two-stage); num_extra_proposals
        (two-stage): a second query group from the top that many proposals, appended after the
        ``two_stage_num_proposals`` main ones (hybrid matching); self_attn_mask: bool [Q,Q] for the decoder;
        extra_queries (two-stage): (query_pos [B,E,d], tgt [B,E,d], reference boxes [B,E,4]) appended after all
        the others (denoising queries).

        Returns a dict: hs [L,B,Q,d]; init_reference [B,Q,2] (two-stage: [B,Q,4]); references
        [L,B,Q,2|4] after each decoder layer; memory [B,S,d]; shapes list of (H_l, W_l); padding_mask
        [B,S]; valid_ratios [B,L,2]; attention (list per decoder layer, if asked); two-stage also
        enc_logits [B,S,C] and enc_boxes [B,S,4].
        """
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                         for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes = _spatial_shapes(shapes, src.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        memory = self.encoder(src, shapes, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask)

        B, S, d = memory.shape
        out = {}
        if self.two_stage:
            if enc_class_embed is None or enc_bbox_embed is None:
                raise ValueError("two-stage needs enc_class_embed and enc_bbox_embed")
            q = self.two_stage_num_proposals
            if S < max(q, num_extra_proposals):
                raise ValueError(f"two-stage: {S} encoder tokens are fewer than the {max(q, num_extra_proposals)} "
                                 f"queries; use larger images")
            enc_mem, props = self._encoder_proposals(memory, padding_mask, shapes)
            enc_mem = self.enc_output_norm(self.enc_output(enc_mem))
            enc_logits = enc_class_embed(enc_mem)
            enc_coord = enc_bbox_embed(enc_mem) + props
            top = torch.topk(enc_logits[..., 0], max(q, num_extra_proposals), dim=1).indices
            if num_extra_proposals:  # the extra group takes the best proposals too, independently of the main one
                top = torch.cat([top[:, :q], top[:, :num_extra_proposals]], 1)
            else:
                top = top[:, :q]
            coords = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4)).detach()
            reference = coords.sigmoid()
            query_pos, tgt = self.pos_trans_norm(self.pos_trans(self._proposal_pos_embed(coords))).split(d, -1)
            if extra_queries is not None:
                query_pos, tgt, reference = (torch.cat([a, b.to(a.dtype)], 1) for a, b in
                                             zip((query_pos, tgt, reference), extra_queries))
            out.update(enc_logits=enc_logits, enc_boxes=enc_coord.sigmoid())
        else:
            if query_embed is None:
                raise ValueError("single-stage needs query_embed [Q, 2d]")
            query_pos, tgt = query_embed.split(d, -1)
            query_pos = query_pos[None].expand(B, -1, -1)
            tgt = tgt[None].expand(B, -1, -1)
            reference = upcast(self.reference_points(query_pos)).sigmoid()
        hs, refs, attention = self.decoder(tgt, reference, memory, spatial_shapes, level_start_index, valid_ratios,
                                           query_pos, padding_mask, bbox_embed, return_attention, self_attn_mask)
        out.update(hs=hs, init_reference=reference, references=refs, memory=memory, shapes=shapes,
                   padding_mask=padding_mask, valid_ratios=valid_ratios)
        if return_attention:
            out["attention"] = attention
        return out

"""The SQR baseline: Deformable DETR plus a separate mask branch (paper Fig. 1a, the authors' release).

The detector (mode ``det``) runs unchanged; a mask branch turns its last-layer query embeddings into mask
logits:

1. ``AttentionMap``: a multi-head attention map between the queries [B,Q,d] and the coarsest encoder
   memory level (stride 64 with the extra level): per head, softmax over the spatial positions -> [B,Q,M,h,w].
2. ``MaskHead``: an FPN of 3x3 convs on [coarsest level, attention map] (expanded per query), adding the
   backbone maps C5, C4, C3 on the way. The coarsest level is, as in the release (``DeformableDETRsegm.forward``
   feeds the head ``srcs[-1]``), the input-projected level *before* the encoder (``mask_features="input_proj"``);
   ``"encoder"`` feeds it the encoder's output at that level instead (what solq did before; the shipped
   ``smoke-sqr`` model was trained so). Both are [B,d,h,w], so the parameters are the same. Each backbone map is first reduced by ``seg_input_proj``, a 3x3 stride-2
   conv halving its channels (R50: 2048->1024, 1024->512, 512->256), so C3 ends at stride 16 and so do
   the mask logits [B,Q,H/16,W/16].

Losses (sigmoid focal + dice, last layer) live in ``SetCriterion.loss_masks``; post-processing in
``PostProcess``. Note: DETR's attention-map module normalises jointly over heads x space; here, as the
paper describes a per-head attention map, each head is normalised over space separately.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionMap", "MaskHead", "SQRModel", "build_sqr", "MASK_FEATURES"]

_INTERMEDIATE_KEYS = ("hs", "memory", "srcs", "memory_masks", "features")
# what the mask head reads at the coarsest level: the detector's output key for each choice
MASK_FEATURES = {"input_proj": "srcs", "encoder": "memory"}


def _norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    # gcd keeps the group count a divisor of any width (e.g. 68 = 64 + 4 heads at the smoke width -> 4 groups)
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.ReLU(inplace=True))


class AttentionMap(nn.Module):
    """Attention weights (no values) of queries over a feature map, one map per head.

    Args: dim: d, the query and memory width; nheads: M.
    """

    def __init__(self, dim: int, nheads: int):
        super().__init__()
        if dim % nheads:
            raise ValueError(f"AttentionMap: dim {dim} is not divisible by nheads {nheads}")
        self.nheads = nheads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)  # applied as a 1x1 conv on the map
        for lin in (self.q_proj, self.k_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.scale = (dim / nheads) ** -0.5

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """queries [B,Q,d], memory [B,d,h,w], mask bool [B,h,w] (True = padding) -> [B,Q,M,h,w],
        summing to 1 over (h, w) for each query and head."""
        B, Q, d = queries.shape
        h, w = memory.shape[-2:]
        M = self.nheads
        q = self.q_proj(queries).view(B, Q, M, d // M) * self.scale
        k = F.conv2d(memory, self.k_proj.weight[..., None, None], self.k_proj.bias).view(B, M, d // M, h, w)
        logits = torch.einsum("bqmc,bmchw->bqmhw", q, k)
        if mask is not None:
            # finite fill: an all-padding map (impossible for real batches) would give a uniform map, not NaN
            logits = logits.masked_fill(mask[:, None, None], torch.finfo(logits.dtype).min)
        return logits.flatten(3).softmax(-1).view(B, Q, M, h, w)


class MaskHead(nn.Module):
    """FPN-style conv head producing one mask logit map per query.

    Args:
        in_dim: channels of [memory, attention map] = d + M.
        context_dim: d; the FPN widths are d/2, d/4, ... (at least 1).
        fpn_dims: channels of the (already reduced) backbone maps, coarsest first.
    """

    def __init__(self, in_dim: int, context_dim: int, fpn_dims: list[int]):
        super().__init__()
        widths = [max(context_dim // 2 ** (i + 1), 1) for i in range(len(fpn_dims) + 1)]
        self.stem = nn.Sequential(_conv_block(in_dim, in_dim), _conv_block(in_dim, widths[0]))
        self.adapters = nn.ModuleList(nn.Conv2d(c, widths[i], 1) for i, c in enumerate(fpn_dims))
        self.blocks = nn.ModuleList(_conv_block(widths[i], widths[i + 1]) for i in range(len(fpn_dims)))
        self.out = nn.Conv2d(widths[-1], 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, memory: torch.Tensor, attention: torch.Tensor, fpn: list[torch.Tensor]) -> torch.Tensor:
        """memory [B,d,h,w], attention [B,Q,M,h,w], fpn: list of [B,C_i,H_i,W_i] coarsest first
        -> mask logits [B,Q,H_last,W_last]."""
        B, Q = attention.shape[:2]
        x = torch.cat([memory[:, None].expand(-1, Q, -1, -1, -1), attention], dim=2).flatten(0, 1)
        x = self.stem(x)  # [B*Q, w0, h, w]
        for adapter, block, feat in zip(self.adapters, self.blocks, fpn):
            lateral = adapter(feat)  # [B, c, H, W], shared by the image's queries
            up = F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = (up.view(B, Q, *up.shape[1:]) + lateral[:, None]).flatten(0, 1)
            x = block(x)
        x = self.out(x)
        return x.view(B, Q, *x.shape[-2:])


class SQRModel(nn.Module):
    """A detector plus the separate-query mask branch.

    Args:
        detector: a mode-``det`` model accepting ``(images, mask, return_intermediates=True)`` and
            returning ``hs``, ``memory``, ``srcs``, ``memory_masks`` and ``features`` (see solq.models).
        freeze_detector: the paper's two-stage protocol: detector weights get ``requires_grad=False``,
            it runs under ``no_grad`` and stays in eval mode; only the mask branch trains.
        nheads: M of the attention map. The width d (``detector.hidden_dim``) and the channels of the backbone
            maps the detector returns (``detector.backbone.num_channels``, finest first) are read from the
            detector.
        mask_features: what the mask head starts from at the coarsest level: ``"input_proj"`` (the release:
            the input-projected level before the encoder, ``srcs[-1]``) or ``"encoder"`` (the encoder's output
            there). The attention map reads the encoder's output either way, as the release.
        matched_masks_only: in training with targets, skip the mask head in the forward and return
            ``pred_masks_for`` instead: a function (batch_idx [k], query_idx [k]) -> mask logits [k,h,w] that runs
            the head on those queries alone. The loss reads only the matched queries' masks, so this gives the
            same loss (every layer of the head works per query) for a fraction of the work: k matched objects
            instead of B x Q queries. The release runs the head on every query.
    """

    predicts_masks = True

    def __init__(self, detector: nn.Module, *, freeze_detector: bool = False, nheads: int = 8,
                 mask_features: str = "input_proj", matched_masks_only: bool = False):
        super().__init__()
        self.matched_masks_only = matched_masks_only
        if mask_features not in MASK_FEATURES:
            raise ValueError(f"SQRModel: mask_features {mask_features!r} is not one of {list(MASK_FEATURES)}")
        self.mask_features = mask_features
        self.detector = detector
        self.freeze_detector = freeze_detector
        hidden_dim = detector.hidden_dim
        feature_channels = list(detector.backbone.num_channels)[-3:]  # C3..C5 (fewer for single-level models)
        coarse_first = feature_channels[::-1]
        # stride-2 3x3 reductions halving the channels (the release's SQR mask branch)
        self.seg_input_proj = nn.ModuleList(nn.Conv2d(c, c // 2, 3, stride=2, padding=1) for c in coarse_first)
        self.attention = AttentionMap(hidden_dim, nheads)
        self.mask_head = MaskHead(hidden_dim + nheads, hidden_dim, [c // 2 for c in coarse_first])
        if freeze_detector:
            self.detector.requires_grad_(False)
            self.detector.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_detector:
            self.detector.eval()  # frozen: no dropout in the detector
        return self

    def forward(self, images: torch.Tensor, mask: torch.Tensor, *, return_intermediates: bool = False,
                return_attention: bool = False, targets=None) -> dict:
        """images [B,3,H,W], mask bool [B,H,W] (True = padding) -> the detector's outputs dict plus
        ``pred_masks`` [B,Q,h,w] mask logits (stride 16 of the padded input with C3 and the stride-64
        level) and, with return_intermediates, ``hs``/``memory``/``srcs``/``memory_masks``/``features`` and
        ``mask_attention`` [B,Q,M,h64,w64]. In training with ``targets`` and ``matched_masks_only``,
        ``pred_masks_for`` (see the class) replaces ``pred_masks``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_detector):
            extra = {"targets": targets} if targets is not None else {}  # denoising queries, when the detector has them
            out = self.detector(images, mask, return_intermediates=True, return_attention=return_attention, **extra)
        attention = self.attention(out["hs"][-1], out["memory"][-1], out["memory_masks"][-1])
        feats = [f for f, _ in out["features"]][-len(self.seg_input_proj):][::-1]  # C5, C4, C3
        fpn = [proj(f) for proj, f in zip(self.seg_input_proj, feats)]
        level = out[MASK_FEATURES[self.mask_features]][-1]
        if self.matched_masks_only and self.training and targets is not None:
            device = level.device.type  # the loss calls it after the forward's autocast block: keep its dtype
            amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            out["pred_masks_for"] = partial(self._masks_for, level, attention, fpn, amp)
        else:
            out["pred_masks"] = self.mask_head(level, attention, fpn)
        if return_intermediates:
            out["mask_attention"] = attention
        else:
            for key in _INTERMEDIATE_KEYS:
                out.pop(key, None)
        return out

    def _masks_for(self, level: torch.Tensor, attention: torch.Tensor, fpn: list[torch.Tensor],
                   amp: torch.dtype | None, batch_idx: torch.Tensor, query_idx: torch.Tensor) -> torch.Tensor:
        """Mask logits [k,h,w] of the queries (batch_idx [k], query_idx [k]): each one as an image of its own with
        one query, so the head sees exactly the inputs the full forward gives that query; under the forward's
        autocast dtype ``amp`` (None: none)."""
        att = attention[batch_idx, query_idx][:, None]  # [k,1,M,h,w]
        with torch.autocast(level.device.type, dtype=amp, enabled=amp is not None):
            return self.mask_head(level[batch_idx], att, [f[batch_idx] for f in fpn])[:, 0]


def build_sqr(cfg, detector: nn.Module) -> SQRModel:
    """SQRModel around a mode-``det`` detector; ``cfg.model.sqr_frozen_detector`` selects the two-stage
    protocol, ``cfg.model.sqr_mask_features`` the mask head's input; the attention map's heads are
    ``cfg.model.nheads``; ``cfg.model.sqr_matched_masks_only`` runs the mask head on the matched queries alone in
    training."""
    return SQRModel(detector, freeze_detector=cfg.model.sqr_frozen_detector, nheads=cfg.model.nheads,
                    mask_features=cfg.model.sqr_mask_features,
                    matched_masks_only=cfg.model.sqr_matched_masks_only)

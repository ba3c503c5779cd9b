"""The SOLQ detector: Deformable DETR whose queries also predict a mask vector (as in the authors' release).

Mode ``uqr`` (SOLQ, unified query representation) adds one vector MLP shared by all decoder layers;
mode ``det`` is plain Deformable DETR (no mask branch; the SQR baseline wraps it).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .backbone import Joiner, resize_mask
from .heads import MLP, class_prior_bias, inverse_sigmoid, refine_boxes
from .transformer import DeformableTransformer

__all__ = ["SOLQ"]


class SOLQ(nn.Module):
    """Backbone + input projections + deformable transformer + per-layer heads.

    Args:
        backbone: a :class:`~solq.models.backbone.Joiner` (``backbone.0.body`` = ResNet, ``backbone.1`` =
            position encoding).
        transformer: a :class:`~solq.models.transformer.DeformableTransformer`.
        num_classes: C, classifier outputs (category ids index them directly; 91 for COCO).
        num_queries: Q. num_feature_levels: levels fed to the transformer: the last min(n, 3) of C3..C5
            (n=1: C5; n=2: C4, C5), plus n-3 stride-2 levels, the first from raw C5, the next ones from
            the previous projected level.
        mode: "uqr" (vector head) or "det" (none). vector_dim: n_k, the codec's vector length (uqr).
        vector_hidden_dim: hidden width of the vector MLP (1024 in the release).
        aux_loss: also return per-layer outputs. with_box_refine: per-layer (unshared) class/box heads
            that also refine the decoder's references. two_stage: queries from top encoder proposals.
        num_queries_one2many: Q2, an extra query group for hybrid matching (H-DETR, Jia et al., CVPR 2023):
            run only in training, after the Q main queries, with the decoder's self-attention masked between
            the two groups (the main group's outputs do not depend on the extra one); its outputs come back
            under ``one2many_outputs`` for a one-to-many loss. 0 = off.
        dn_groups: denoising queries (DN-DETR, Li et al., CVPR 2022; two-stage only): in training, with the
            targets given to forward, this many groups of noised copies of every ground-truth box (centre moved and
            size scaled by up to ``dn_box_noise`` of its size) and label (replaced by a random class with
            probability ``dn_label_noise``) become extra decoder queries (reference = the noised box, content = a
            label embedding), behind the self-attention mask (each group sees only itself; no other query sees
            them); their outputs come back under ``dn_outputs`` to reconstruct label, box and mask vector. 0 = off.
        vector_standardize: the vector MLP predicts standardised codes, ``v = vector_mean + vector_std * mlp(q)``
            with per-coefficient buffers [n_k] (the training codes' statistics, set by
            :meth:`set_vector_statistics`; saved with the model), and its last layer starts at zero, so every
            query starts at the mean code. False (the release): raw codes, starting at [0, 0, -2, ..., -2]. With
            DCT codes the coefficients differ in scale by 50x (the DC term is about 34 +- 10 on 64x64 crops, the
            last kept ones about 0 +- 0.7): one learning rate then moves them alike.

    Head layout as the release: ``class_embed`` and ``bbox_embed`` are ModuleLists with one entry per
    decoder layer (+1 for two-stage encoder scoring); without box refinement all entries are the same
    module. ``vector_embed`` is a single MLP applied to every decoder layer.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, *, num_classes: int,
                 num_queries: int = 300, num_feature_levels: int = 4, mode: str = "uqr",
                 vector_dim: Optional[int] = 256, vector_hidden_dim: int = 1024, aux_loss: bool = True,
                 with_box_refine: bool = True, two_stage: bool = False, num_queries_one2many: int = 0,
                 dn_groups: int = 0, dn_box_noise: float = 0.4, dn_label_noise: float = 0.2,
                 vector_standardize: bool = False):
        super().__init__()
        if mode not in ("uqr", "det"):
            raise ValueError(f"SOLQ mode must be 'uqr' or 'det', got {mode!r} (sqr wraps a 'det' detector)")
        if mode == "uqr" and not vector_dim:
            raise ValueError("mode 'uqr' needs vector_dim (the codec's dim)")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        d = transformer.d_model
        self.mode, self.num_classes, self.num_queries = mode, num_classes, num_queries
        self.num_queries_one2many = num_queries_one2many
        if dn_groups and not two_stage:
            raise ValueError("denoising queries (dn_groups > 0) need two_stage=True (4-d box references)")
        self.dn_groups, self.dn_box_noise, self.dn_label_noise = dn_groups, dn_box_noise, dn_label_noise
        self.num_feature_levels, self.aux_loss = num_feature_levels, aux_loss
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        self.hidden_dim = d
        self.backbone = backbone
        self.transformer = transformer
        self.num_backbone_levels = min(num_feature_levels, len(backbone.num_channels))
        in_channels = backbone.num_channels[-self.num_backbone_levels:]

        proj = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels]
        c = backbone.num_channels[-1]
        for _ in range(num_feature_levels - self.num_backbone_levels):
            proj.append(nn.Sequential(nn.Conv2d(c, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            c = d
        self.input_proj = nn.ModuleList(proj)
        for seq in self.input_proj:
            nn.init.xavier_uniform_(seq[0].weight, gain=1)
            nn.init.zeros_(seq[0].bias)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries + num_queries_one2many, 2 * d)

        class_embed = nn.Linear(d, num_classes)
        bbox_embed = MLP(d, d, 4, 3)
        with torch.no_grad():
            class_embed.bias.fill_(class_prior_bias(0.01))
            bbox_embed.layers[-1].weight.zero_()
            bbox_embed.layers[-1].bias.zero_()
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
        else:
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        with torch.no_grad():  # first layer's boxes start small: w = h = sigmoid(-2)
            self.bbox_embed[0].layers[-1].bias[2:] = -2.0
            if two_stage:
                for m in self.bbox_embed:
                    m.layers[-1].bias[2:] = 0.0

        self.label_enc = nn.Embedding(num_classes, d) if dn_groups else None

        self.vector_standardize = mode == "uqr" and vector_standardize
        if mode == "uqr":
            self.vector_embed = MLP(d, vector_hidden_dim, vector_dim, 3)
            with torch.no_grad():  # every query starts at [0, 0, -2, ..., -2] as in the release (standardised: 0)
                self.vector_embed.layers[-1].weight.zero_()
                self.vector_embed.layers[-1].bias.zero_()
                if not self.vector_standardize:
                    self.vector_embed.layers[-1].bias[2:] = -2.0
        else:
            self.vector_embed = None
        if self.vector_standardize:
            self.register_buffer("vector_mean", torch.zeros(vector_dim))
            self.register_buffer("vector_std", torch.ones(vector_dim))

    @torch.no_grad()
    def set_vector_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-coefficient mean and std [n_k] of the training codes, for ``vector_standardize``."""
        if not self.vector_standardize:
            raise ValueError("set_vector_statistics: the model was built without vector_standardize")
        if mean.shape != self.vector_mean.shape or std.shape != self.vector_std.shape:
            raise ValueError(f"set_vector_statistics: expected mean and std of shape {tuple(self.vector_mean.shape)}, "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("set_vector_statistics: mean must be finite and std finite and > 0")
        self.vector_mean.copy_(mean)
        self.vector_std.copy_(std)

    def _vectors(self, hs: torch.Tensor) -> Optional[torch.Tensor]:
        """Mask vectors [L,B,Q,n_k] of the decoder states hs [L,B,Q,d] (one shared MLP); None in mode det."""
        if self.vector_embed is None:
            return None
        raw = self.vector_embed(hs)
        return torch.addcmul(self.vector_mean, self.vector_std, raw) if self.vector_standardize else raw

    def _levels(self, images, mask):
        """Backbone maps and the transformer's inputs: (features, srcs, masks, pos) per level."""
        features = self.backbone(images, mask)
        srcs, masks, pos = [], [], []
        for lvl, (feat, m) in enumerate(features[-self.num_backbone_levels:]):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(m)
        x = features[-1][0]  # raw C5 feeds the first extra level
        for lvl in range(self.num_backbone_levels, self.num_feature_levels):
            x = self.input_proj[lvl](x)
            srcs.append(x)
            masks.append(resize_mask(mask, x.shape[-2:]))
        for src, m in zip(srcs, masks):
            pos.append(self.backbone.position(m).to(src.dtype))
        return features, srcs, masks, pos

    def _denoising_queries(self, targets: list[dict]):
        """Noised ground truth as decoder queries: (query_pos [B,E,d], tgt [B,E,d], reference [B,E,4], n_max) with
        E = dn_groups x n_max (image b's copies at g*n_max + j, j < n_b; the rest pad), or None without objects."""
        n = [len(t["labels"]) for t in targets]
        n_max, G = max(n, default=0), self.dn_groups
        if n_max == 0:
            return None
        device = self.label_enc.weight.device
        boxes = torch.zeros(len(targets), n_max, 4, device=device)
        boxes[..., 2:] = 0.05  # pads: small boxes, never looked at by the loss
        labels = torch.zeros(len(targets), n_max, dtype=torch.int64, device=device)
        for b, t in enumerate(targets):
            boxes[b, :n[b]] = t["boxes"].to(device).float()
            labels[b, :n[b]] = t["labels"].to(device)
        boxes, labels = boxes.repeat(1, G, 1), labels.repeat(1, G)
        wh = boxes[..., 2:]
        jitter = (torch.rand_like(boxes) * 2 - 1) * self.dn_box_noise
        noised = torch.cat([boxes[..., :2] + jitter[..., :2] * wh / 2, wh * (1 + jitter[..., 2:])], -1)
        noised = noised.clamp(1e-3, 1 - 1e-3)
        flip = torch.rand(labels.shape, device=device) < self.dn_label_noise
        labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        query_pos = self.transformer.box_query_pos(inverse_sigmoid(noised))
        return query_pos, self.label_enc(labels), noised, n_max

    @property
    def predicts_masks(self) -> bool:
        """Whether the outputs carry masks (mask vectors, mode uqr); a det model predicts boxes only."""
        return self.mode == "uqr"

    def forward(self, images: torch.Tensor, mask: torch.Tensor, *, return_intermediates: bool = False,
                return_attention: bool = False, targets: Optional[list] = None) -> dict:
        """images: float [B,3,H,W] (zero-padded batch); mask: bool [B,H,W], True on padding; targets: the batch's
        targets (``labels``, ``boxes``), used only for denoising queries in training.

        Returns a dict (L = decoder layers, C = num_classes, n_k = vector_dim):
          - ``pred_logits`` [B,Q,C]: raw class logits (sigmoid scores);
          - ``pred_boxes`` [B,Q,4]: sigmoid (cx, cy, w, h) normalised to the unpadded image;
          - ``pred_vectors`` [B,Q,n_k]: raw mask-code vectors (mode uqr only);
          - ``aux_outputs`` (if aux_loss): list of L-1 dicts with the keys above for layers 0..L-2;
          - ``enc_outputs`` (two-stage): {``pred_logits`` [B,S,C], ``pred_boxes`` [B,S,4]} per encoder token;
          - ``dn_outputs`` (training with ``dn_groups`` > 0 and targets): the denoising queries' ``pred_logits``
            [B,E,C], ``pred_boxes``, ``pred_vectors``, ``aux_outputs`` and ``dn_pad`` (n_max: copy j of image b in
            group g is query g*n_max + j);
          - ``one2many_outputs`` (training with ``num_queries_one2many`` > 0): the extra group's
            ``pred_logits`` [B,Q2,C], ``pred_boxes``, ``pred_vectors`` and ``aux_outputs``; the other keys
            then describe the Q main queries only (``hs``, ``dec_attention``, references included);
          - with ``return_intermediates``: ``hs`` [L,B,Q,d]; ``memory`` list of [B,d,H_l,W_l] (the encoder's
            output per level); ``srcs`` list of [B,d,H_l,W_l] (the input-projected levels, before the encoder);
            ``memory_masks`` list of bool [B,H_l,W_l]; ``features`` list of (backbone map [B,C_l,h,w],
            mask bool [B,h,w]) for C3, C4, C5 (always all three);
          - with ``return_attention``: ``dec_attention`` list (per decoder layer) of {``locations``
            [B,Q,M,L_f,P,2] (x, y) in the padded level frame, ``weights`` [B,Q,M,L_f,P]};
            ``init_reference`` [B,Q,2|4] (the reference of decoder layer 0) and ``dec_references``
            [L,B,Q,2|4] (the reference after each layer; layer l+1 attends around dec_references[l]).
        """
        features, srcs, masks, pos = self._levels(images, mask)
        refine = self.with_box_refine
        Q, Q2 = self.num_queries, (self.num_queries_one2many if self.training else 0)
        dn = self._denoising_queries(targets) if self.training and self.dn_groups and targets is not None else None
        attn_mask = None
        if Q2 or dn is not None:  # True = blocked: a query sees only its own group (main, hybrid, each dn group)
            group = (torch.arange(Q + Q2, device=images.device) >= Q).long()
            if dn is not None:
                group = torch.cat([group, 2 + torch.arange(self.dn_groups, device=images.device).repeat_interleave(dn[3])])
            attn_mask = group[:, None] != group[None, :]
        t = self.transformer(
            srcs, masks, pos, None if self.two_stage else self.query_embed.weight[:Q + Q2],
            bbox_embed=self.bbox_embed if refine else None,
            enc_class_embed=self.class_embed[-1] if self.two_stage else None,
            enc_bbox_embed=self.bbox_embed[-1] if self.two_stage else None,
            return_attention=return_attention, num_extra_proposals=Q2 if self.two_stage else 0,
            self_attn_mask=attn_mask, extra_queries=dn[:3] if dn is not None else None)
        hs, refs = t["hs"], t["references"]
        num_layers = hs.shape[0]
        vectors = self._vectors(hs)
        layers = []
        for lvl in range(num_layers):
            reference = t["init_reference"] if lvl == 0 else refs[lvl - 1]
            out = {"pred_logits": self.class_embed[lvl](hs[lvl]),
                   "pred_boxes": refine_boxes(self.bbox_embed[lvl](hs[lvl]), reference)}
            if vectors is not None:
                out["pred_vectors"] = vectors[lvl]
            layers.append(out)
        if dn is not None:
            denoise = [{k: v[:, Q + Q2:] for k, v in out.items()} for out in layers]
        if Q2 or dn is not None:  # split the groups; everything below describes the main one
            extra = [{k: v[:, Q:Q + Q2] for k, v in out.items()} for out in layers]
            layers = [{k: v[:, :Q] for k, v in out.items()} for out in layers]
            hs, refs = hs[:, :, :Q], refs[:, :, :Q]
            t["init_reference"] = t["init_reference"][:, :Q]
            if return_attention:
                t["attention"] = [{k: v[:, :Q] for k, v in a.items()} for a in t["attention"]]
        result = dict(layers[-1])
        if self.aux_loss:
            result["aux_outputs"] = layers[:-1]
        if Q2:
            result["one2many_outputs"] = {**extra[-1], **({"aux_outputs": extra[:-1]} if self.aux_loss else {})}
        if dn is not None:
            result["dn_outputs"] = {**denoise[-1], **({"aux_outputs": denoise[:-1]} if self.aux_loss else {}),
                                    "dn_pad": dn[3]}
        if self.two_stage:
            result["enc_outputs"] = {"pred_logits": t["enc_logits"], "pred_boxes": t["enc_boxes"]}
        if return_intermediates:
            memory = t["memory"]
            B, _, d = memory.shape
            sizes = [h * w for h, w in t["shapes"]]
            result["hs"] = hs
            result["memory"] = [m.transpose(1, 2).reshape(B, d, h, w)
                                for m, (h, w) in zip(memory.split(sizes, 1), t["shapes"])]
            result["srcs"] = srcs
            result["memory_masks"] = masks
            result["features"] = features
        if return_attention:
            result["dec_attention"] = t["attention"]
            result["init_reference"] = t["init_reference"]
            result["dec_references"] = refs
        return result

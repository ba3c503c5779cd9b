"""solq.models: the SOLQ network, the SQR baseline, matching, losses, post-processing.

``build_model(cfg) -> (model, criterion, postprocessor)`` is the entry point; ``build_detector(cfg)``
builds only the network (backbone + transformer + heads).
"""
from __future__ import annotations

from typing import Optional

from solq.coding import Codec, build_codec_from_config
from solq.config import ConfigError

from . import pretrained
from .backbone import Backbone, Joiner, load_backbone_weights
from .criterion import build_criterion
from .deformable_attention import BACKENDS, MSDeformAttn, get_backend, ms_deform_attn_reference
from .heads import MLP, inverse_sigmoid
from .position_encoding import PositionEmbeddingSine
from .postprocess import build_postprocessor
from .solq import SOLQ
from .sqr import build_sqr
from .swin import SWIN, SwinBackbone
from .transformer import DeformableTransformer

__all__ = [
    "build_model", "build_detector", "SOLQ", "Backbone", "SwinBackbone", "Joiner", "PositionEmbeddingSine",
    "DeformableTransformer", "MSDeformAttn", "ms_deform_attn_reference", "BACKENDS", "get_backend", "MLP",
    "inverse_sigmoid",
]


def build_detector(cfg, vector_dim: Optional[int] = None, *, initial_weights: bool = True) -> SOLQ:
    """The network described by ``cfg.model`` (mode uqr or det; mode sqr builds its det detector).

    ``vector_dim`` is the codec's vector length n_k (mode uqr); None takes the dimension of the codec that
    ``cfg.codec`` describes (n_k = num_coeffs; 784 for flatten).
    ``initial_weights`` False skips ``model.pretrained_backbone`` / ``model.backbone_weights`` (for callers that
    load a whole state dict next, e.g. from a checkpoint).
    """
    m = cfg.model
    if m.num_classes < 1:
        raise ConfigError("model.num_classes is 0: set it (max category id + 1) or let the engine take it "
                          "from the dataset before building the model")
    if m.backbone in SWIN:  # Swin-T/S/B/L (timm): every stage trains, as the release; no norm/freeze options
        body = SwinBackbone(m.backbone, train_backbone=m.train_backbone,
                            pretrained=m.pretrained_backbone and initial_weights)
    else:
        body = Backbone(m.backbone, train_backbone=m.train_backbone, dilation=m.dilation,
                        pretrained=m.pretrained_backbone and initial_weights, norm=m.backbone_norm,
                        freeze_stages=m.freeze_stages)
    if m.backbone_weights and initial_weights:
        load_backbone_weights(body, pretrained.path(m.backbone_weights), arch=m.backbone)
    backbone = Joiner(body, PositionEmbeddingSine(m.hidden_dim // 2, normalize=True))
    transformer = DeformableTransformer(
        d_model=m.hidden_dim, nhead=m.nheads, num_encoder_layers=m.enc_layers, num_decoder_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward, dropout=m.dropout, activation=m.activation,
        num_feature_levels=m.num_feature_levels, enc_n_points=m.enc_n_points, dec_n_points=m.dec_n_points,
        two_stage=m.two_stage, two_stage_num_proposals=m.num_queries, attention_backend=m.attention_backend)
    mode = "uqr" if m.mode == "uqr" else "det"
    if mode == "uqr" and vector_dim is None:
        vector_dim = build_codec_from_config(cfg.codec).dim
    return SOLQ(backbone, transformer, num_classes=m.num_classes, num_queries=m.num_queries,
                num_feature_levels=m.num_feature_levels, mode=mode,
                vector_dim=vector_dim if mode == "uqr" else None,
                vector_hidden_dim=m.vector_hidden_dim, aux_loss=m.aux_loss, with_box_refine=m.with_box_refine,
                two_stage=m.two_stage, num_queries_one2many=m.num_queries_one2many,
                dn_groups=m.dn_groups, dn_box_noise=m.dn_box_noise, dn_label_noise=m.dn_label_noise,
                vector_standardize=m.vector_standardize)


def build_model(cfg, *, codec: Optional[Codec] = None, initial_weights: bool = True):
    """Returns (model, criterion, postprocessor) for ``cfg`` (a solq.config.Config).

    ``codec``: the mask codec, ready to use (the engine fits pca/sparse first: ``solq.engine.builders.fit_codec``);
    None builds the one ``cfg.codec`` describes. Its ``dim`` sets the vector length. ``initial_weights`` as in
    :func:`build_detector`. Mode sqr wraps a det detector in the SQR mask branch.
    Raises ConfigError when ``cfg.model.num_classes`` is 0 (the engine takes it from the data) or when the
    codec is not the kind ``cfg.codec.name`` names.
    """
    if cfg.model.num_classes < 1:
        raise ConfigError("model.num_classes is 0: set it (max category id + 1) or let the engine take it "
                          "from the dataset before building the model")
    codec = build_codec_from_config(cfg.codec) if codec is None else codec
    if codec.name != cfg.codec.name:
        raise ConfigError(f"build_model: a {codec.name!r} codec was given but codec.name is {cfg.codec.name!r}")
    detector = build_detector(cfg, vector_dim=codec.dim, initial_weights=initial_weights)
    model = build_sqr(cfg, detector) if cfg.model.mode == "sqr" else detector
    criterion = build_criterion(cfg, codec, cfg.model.num_classes)
    postprocessor = build_postprocessor(cfg, codec)
    return model, criterion, postprocessor

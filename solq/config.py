"""One typed configuration for everything: data, model, codec, loss, train, eval, runtime.

Defaults live here and nowhere else. A config is built from a preset name or a YAML file, then
``"a.b=c"`` overrides are applied with type checking::

    cfg = load_config("smoke", overrides=["train.epochs=3", "model.num_queries=20"])
    cfg.to_yaml("run/config.yaml")

Presets:

- ``paper-r50``: the paper's Table 5 sizes (transformer width 256, FFN 1024, 300 queries, 6+6 layers).
- ``release-r50``: the authors' script defaults (width 384, FFN 1024)
- ``release-swin-l``: ``release-r50`` with the Swin-L backbone and the paper's Swin-L input sizes (Table 1)
- ``smoke``: the CPU recipe: a small CNN pretrained on synthetic scenes, width 96, 2+3 layers, two-stage with 30
  queries, 160-px inputs, batch 8; trains on a CPU in minutes.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from solq.config_values import ConfigError, coerce, from_mapping, read_yaml_mapping
from solq.files import write_text_atomic

__all__ = [
    "Config", "DataConfig", "ModelConfig", "CodecConfig", "LossConfig", "TrainConfig", "EvalConfig",
    "RuntimeConfig", "ConfigError", "PRESETS", "DEMO_STEPS", "load_config", "apply_overrides", "read_yaml_mapping",
]


def _scales(lo: int, hi: int, step: int = 32) -> list[int]:
    return list(range(lo, hi + 1, step))


@dataclass
class DataConfig:
    """Where the data is and how it is augmented (as in the authors' release)."""

    # "synthetic" generates procedural scenes into ``root`` when missing; "coco" reads the paths below.
    dataset: str = "synthetic"
    root: str = "data/synthetic"
    train_images: str = ""  # defaults for "synthetic"/"coco" are derived from root when empty
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    # synthetic generation (used when dataset == "synthetic")
    synth_num_train: int = 200
    synth_num_val: int = 50
    synth_image_size: int = 256
    synth_seed: int = 0
    synth_val_seed: int = -1  # -1 = synth_seed (the val scenes differ from the train scenes either way)
    # augmentation (as in the authors' release); all sizes parameterised for the smoke scale
    train_scales: list[int] = field(default_factory=lambda: _scales(480, 800))
    max_size: int = 1333
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    crop_prob: float = 0.5  # chance of the resize-crop-resize branch (the release: 0.5; 0 = multi-scale only)
    eval_size: int = 800
    hflip: bool = True
    num_workers: int = 2
    strict: bool = False  # turn skipped bad annotations into errors
    check_images: str = "exists"  # none | exists (stat each file) | header (open each file header)
    max_images: int = 0  # 0 = all; >0 keeps the first n images (smoke runs)


@dataclass
class CodecConfig:
    """Mask compression coding (paper §3.2, Table 3a/3d/3e)."""

    name: str = "dct"  # dct | pca | sparse | flatten
    resolution: int = 128  # N: side of the mask crop
    num_coeffs: int = 256  # n_k: vector length
    threshold: str = "midrange"  # dct binarisation: midrange (as in the authors' release) or 0.5
    file: str = ""  # fitted pca/sparse codec (.pt); fitted on the train set when empty
    whiten: bool = True  # pca
    jitter: bool = False  # pca: logit-jittered targets (as the authors' release)
    sparse_alpha: float = 0.1  # sparse: Lasso penalty
    # pca/sparse fitting, one sampler for training and the coding study (solq.coding.study.collect_crops):
    # this many non-crowd training masks drawn at random with fit_seed; 0 = all of them (the release)
    fit_max_masks: int = 20000
    fit_seed: int = 0


@dataclass
class ModelConfig:
    """Network shape (as in the authors' release). ``mode``: uqr (SOLQ), sqr (D-DETR + mask branch), det (D-DETR)."""

    mode: str = "uqr"
    # resnet18/34/50/101 | small (CPU runs) | swin_t/s/b/l (timm, the optional extra "swin"; as the release's
    # swin_*_p4w7; backbone_norm, freeze_stages and dilation are for the CNNs: a Swin trains every stage)
    backbone: str = "resnet50"
    pretrained_backbone: bool = False  # ImageNet weights (torchvision / timm) need a network; never in tests
    # backbone weights from `solq pretrain-backbone`: a file or a shipped name (solq.models.pretrained)
    backbone_weights: str = ""
    train_backbone: bool = True  # false freezes the whole backbone
    # frozen = the release's FrozenBatchNorm (for ImageNet weights and the authors' checkpoints); batch | group
    # are trainable norms for training from scratch (frozen BN with random weights normalises nothing)
    backbone_norm: str = "frozen"
    freeze_stages: int = 2  # the first n of (stem, layer1, layer2, layer3, layer4) frozen; the release: 2
    dilation: bool = False
    hidden_dim: int = 256
    dim_feedforward: int = 1024
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    num_queries: int = 300
    # hybrid matching (H-DETR): an extra group of queries, matched one-to-many in training (loss.one2many_k),
    # masked from the main group in the decoder's self-attention and dropped at inference; 0 = off
    num_queries_one2many: int = 0
    # denoising queries (DN-DETR; two-stage only): groups of noised ground-truth boxes and labels as extra decoder
    # queries in training, reconstructing label, box and mask vector; 0 = off
    dn_groups: int = 0
    dn_box_noise: float = 0.4
    dn_label_noise: float = 0.2
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_feature_levels: int = 4
    dropout: float = 0.1
    activation: str = "relu"
    with_box_refine: bool = True
    two_stage: bool = False
    vector_hidden_dim: int = 1024
    # uqr: predict standardised codes (mean + std * mlp, the training codes' per-coefficient statistics, kept in
    # the model); false = the release's raw codes
    vector_standardize: bool = False
    num_classes: int = 0  # 0 = taken from the data (max category id + 1)
    attention_backend: str = "auto"  # auto | reference | fused | triton
    aux_loss: bool = True
    sqr_frozen_detector: bool = False  # sqr: train only the mask branch (paper's two-stage protocol)
    # sqr: the mask head's coarsest input: input_proj = the projected level before the encoder (the release's
    # srcs[-1]) | encoder = the encoder's output there. Checkpoints whose config predates this key ran "encoder"
    # (solq.engine.checkpoint.config_for_checkpoint)
    sqr_mask_features: str = "input_proj"
    # sqr training: run the mask head only on the queries the matcher pairs with an object (the loss reads no
    # other; the same loss within float rounding, tested) instead of on all B x Q (the release)
    sqr_matched_masks_only: bool = True


@dataclass
class LossConfig:
    """Matcher costs and loss weights (as in the authors' release)."""

    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    vector_loss_coef: float = 3.0
    vector_loss_norm: str = "mean"  # mean (release solq.py) | num_boxes
    vector_loss_stages: int = 0  # number of final decoder layers with the vector loss; 0 = all (Table 3c)
    # pixel-space dice between the decoded vector and the GT crop, beside the L1 on coefficients (dct/sparse;
    # not in the release): 0 = off
    vector_dice_coef: float = 0.0
    focal_alpha: float = 0.25
    cls_loss: str = "focal"  # focal (the release) | quality_focal (IoU-valued targets: scores rank by box quality)
    one2many_k: int = 6  # hybrid matching: each ground-truth object repeated k times for the extra group
    one2many_weight: float = 1.0  # weight of the extra group's losses
    enc_one2many_k: int = 1  # two-stage: encoder proposals matched to each object k times (1 = one-to-one)
    mask_loss_coef: float = 1.0  # sqr focal
    dice_loss_coef: float = 1.0  # sqr dice / flatten dice


@dataclass
class TrainConfig:
    """Optimisation recipe (as in the authors' release)."""

    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    epochs: int = 50
    lr_drop: int = 40
    lr_schedule: str = "step"  # step (x0.1 at epoch lr_drop, the release) | cosine (per step, to min_lr_ratio)
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimiser steps (both schedules)
    min_lr_ratio: float = 0.01  # cosine: final lr / initial lr
    clip_max_norm: float = 0.1
    batch_size: int = 4  # per process
    accumulate: int = 1  # gradient accumulation steps
    max_steps: int = 0  # 0 = no limit; >0 stops after this many optimiser steps (smoke runs)
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 42
    eval_every: int = 1  # epochs
    save_every: int = 10  # epochs; the last checkpoint is always kept
    save_every_steps: int = 0  # >0 also checkpoints mid-epoch every this many optimiser steps
    log_every: int = 10  # steps
    # seconds from a stop signal (SIGTERM/SIGUSR1) until the process exits even without its checkpoint; 0 = no
    # limit. 90 s fits within the 120 s warning of scripts/slurm_train.sh (--signal=B:USR1@120)
    stop_grace_s: float = 90.0


@dataclass
class EvalConfig:
    """Inference and evaluation (as in the authors' release)."""

    topk: int = 100
    mask_threshold: float = 0.5
    iou_types: list[str] = field(default_factory=lambda: ["bbox", "segm"])
    boundary: bool = False  # also compute Boundary AP
    batch_size: int = 2
    # solq eval / solq predict run a copy with the backbone's norms folded into its convolutions and the
    # backbone in channels_last (solq.models.inference): same outputs within 1e-4, about 8% faster on the CPU
    inference_opt: bool = True


@dataclass
class RuntimeConfig:
    """Where and how a run executes."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "outputs/run"
    num_threads: int = 0  # 0 = torch default
    dist_backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | nccl | gloo
    deterministic: bool = False
    resume: str = ""  # "" | auto | path
    # keep freed CPU memory in the process (glibc mallopt) instead of page-faulting it in again for every
    # large tensor: 15-25% faster CPU forward passes; the resident set then stays at its peak
    keep_freed_memory: bool = True
    # torch.compile the model's forward in place with this backend ("" = off; "inductor" is torch.compile's
    # default, "eager" only traces: a cheap check of the wiring) in train, eval, predict and bench; the first
    # call of every new input size compiles (minutes on a CPU); README "torch.compile" has the measured effect
    compile: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise; write to ``path`` when given. Returns the YAML text."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            write_text_atomic(path, text, what="config file")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return from_mapping(cls, d, "")


# optimiser steps of each model `solq demo` trains (smoke preset, SQR and UQR side by side), within 15 min
DEMO_STEPS = 2200

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper-r50": {},
    "release-r50": {"model": {"hidden_dim": 384}},
    # the paper's Swin-L (Table 1; the authors' issue #19: backbone swin_l_p4w7, hidden_dim 384, 22k->1k weights with
    # model.pretrained_backbone=true): training short side in [400, 1200], long side <= 1536; the test short side is
    # not stated: 1088, the release's commented-out Swin-L value
    "release-swin-l": {"model": {"hidden_dim": 384, "backbone": "swin_l"},
                       "data": {"train_scales": _scales(400, 1200), "max_size": 1536, "eval_size": 1088}},
    "smoke": {
        # the CPU recipe (measured in the README): the small backbone pretrained on synthetic scenes (the smoke
        # analogue of ImageNet weights) at the transformer's lr, two-stage queries from 3 levels, IoU-aware
        # classification, standardised mask codes, warm-up + cosine, batch 8 of 160-px inputs, thousands of scenes
        "data": {
            "train_scales": [160], "max_size": 192, "crop_resize_scales": [128, 160], "crop_min": 96,
            "crop_max": 160, "crop_prob": 0.0, "eval_size": 160, "num_workers": 0,
            "synth_num_train": 2000, "synth_num_val": 100, "synth_val_seed": 1,
        },
        "model": {
            "backbone": "small", "backbone_norm": "batch", "freeze_stages": 0, "backbone_weights": "synthetic-small",
            "hidden_dim": 96, "dim_feedforward": 192, "nheads": 4, "enc_layers": 2, "dec_layers": 3,
            "num_queries": 30, "num_feature_levels": 3, "enc_n_points": 2, "dec_n_points": 2,
            "vector_hidden_dim": 256, "dropout": 0.0, "two_stage": True, "vector_standardize": True,
        },
        "codec": {"resolution": 64, "num_coeffs": 128},
        "loss": {"cls_loss": "quality_focal"},
        "train": {"epochs": 6, "max_steps": 1500, "lr_drop": 100, "batch_size": 8, "lr": 1e-3, "lr_backbone": 1e-3,
                  "lr_schedule": "cosine", "warmup_steps": 50},
        "eval": {"batch_size": 8},
        "runtime": {"device": "cpu"},
    },
}


_CHOICES = {
    "data.dataset": ("synthetic", "coco"),
    "data.check_images": ("none", "exists", "header"),
    "codec.name": ("dct", "pca", "sparse", "flatten"),
    "codec.threshold": ("midrange", "0.5"),
    "model.mode": ("uqr", "sqr", "det"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101", "small", "swin_t", "swin_s", "swin_b",
                       "swin_l"),
    "model.backbone_norm": ("frozen", "batch", "group"),
    "model.sqr_mask_features": ("input_proj", "encoder"),
    "train.lr_schedule": ("step", "cosine"),
    "model.activation": ("relu", "gelu", "glu", "silu"),
    "model.attention_backend": ("auto", "reference", "fused", "triton"),
    "loss.vector_loss_norm": ("mean", "num_boxes"),
    "loss.cls_loss": ("focal", "quality_focal"),
    "train.amp": ("none", "bf16", "fp16"),
    "runtime.dist_backend": ("auto", "nccl", "gloo"),
    "runtime.compile": ("", "inductor", "eager", "aot_eager", "cudagraphs"),
}


def validate(cfg: Config) -> Config:
    """Check choices and cross-field constraints; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    m = cfg.model
    if m.hidden_dim % m.nheads:
        raise ConfigError(f"model.hidden_dim ({m.hidden_dim}) must be divisible by model.nheads ({m.nheads})")
    if m.hidden_dim % 32 and m.hidden_dim >= 32:
        raise ConfigError(f"model.hidden_dim ({m.hidden_dim}) must be a multiple of 32 (GroupNorm(32, d))")
    for key in ("enc_layers", "dec_layers", "num_queries", "num_feature_levels", "nheads"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(m, key)}")
    if cfg.codec.num_coeffs < 1 or cfg.codec.resolution < 2:
        raise ConfigError("codec.num_coeffs must be >= 1 and codec.resolution >= 2")
    if cfg.codec.name == "dct" and cfg.codec.num_coeffs > cfg.codec.resolution ** 2:
        raise ConfigError(f"codec.num_coeffs ({cfg.codec.num_coeffs}) exceeds resolution^2 "
                          f"({cfg.codec.resolution ** 2})")
    if cfg.loss.vector_loss_stages < 0 or cfg.loss.vector_loss_stages > m.dec_layers:
        raise ConfigError(f"loss.vector_loss_stages must be in 0..model.dec_layers ({m.dec_layers})")
    if not 0 <= m.freeze_stages <= 5:
        raise ConfigError(f"model.freeze_stages must be in 0..5 (stem, layer1..4), got {m.freeze_stages}")
    if m.num_queries_one2many < 0 or cfg.loss.one2many_k < 1 or cfg.loss.enc_one2many_k < 1:
        raise ConfigError("model.num_queries_one2many must be >= 0, loss.one2many_k and loss.enc_one2many_k >= 1")
    if m.dn_groups < 0 or (m.dn_groups and not m.two_stage):
        raise ConfigError("model.dn_groups must be >= 0, and denoising queries need model.two_stage=true")
    if m.backbone == "small" and (m.pretrained_backbone or m.dilation or m.backbone_norm == "frozen"):
        raise ConfigError("model.backbone=small trains from scratch: no pretrained_backbone, no dilation, and "
                          "model.backbone_norm must be batch or group")
    if m.backbone.startswith("swin_") and m.dilation:
        raise ConfigError(f"model.dilation is for the ResNets; model.backbone={m.backbone} has none")
    if cfg.train.accumulate < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.accumulate and train.batch_size must be >= 1")
    if not cfg.train.stop_grace_s >= 0:
        raise ConfigError(f"train.stop_grace_s must be >= 0 (0 = no limit), got {cfg.train.stop_grace_s}")
    return cfg


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``"section.key=value"`` strings in order (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: key must be section.key, e.g. train.epochs=3")
        section, name = parts
        if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
            raise ConfigError(f"override {item!r}: unknown section {section!r}; "
                              f"sections: {[f.name for f in dataclasses.fields(cfg)]}")
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; "
                              f"keys of {section}: {sorted(hints)}")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw
        if hints[name] is str and parsed is not None and not isinstance(parsed, str):
            parsed = raw  # keep e.g. "0.5" as written for string fields
        setattr(sub, name, coerce(parsed, hints[name], key))
    return cfg


def _merge(cfg: Config, tree: dict) -> Config:
    base = cfg.to_dict()
    for section, values in tree.items():
        if section not in base:
            raise ConfigError(f"unknown config section {section!r}; sections: {sorted(base)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r}: expected a mapping")
        base[section].update(values)
    return Config.from_dict(base)


def load_config(path_or_preset: str | Path | None = "smoke", overrides: Iterable[str] = ()) -> Config:
    """Build a config from a preset name or a YAML file, then apply overrides.

    A YAML file may name a base preset with a top-level ``preset:`` key; its sections override it.
    Raises ConfigError with the offending key on unknown keys, bad types or invalid values.
    """
    cfg = Config()
    if path_or_preset is not None:
        name = str(path_or_preset)
        if name in PRESETS:
            cfg = _merge(cfg, PRESETS[name])
        else:
            p = Path(name)
            if not p.is_file():
                raise ConfigError(f"{name!r} is neither a preset ({sorted(PRESETS)}) nor a YAML file")
            tree = read_yaml_mapping(p, ConfigError, "a mapping of sections")
            preset = tree.pop("preset", None)
            if preset is not None:
                if preset not in PRESETS:
                    raise ConfigError(f"{p}: unknown preset {preset!r}; presets: {sorted(PRESETS)}")
                cfg = _merge(cfg, PRESETS[preset])
            try:
                cfg = _merge(cfg, tree)
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from None
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg)

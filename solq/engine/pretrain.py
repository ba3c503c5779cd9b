"""Backbone pretraining on synthetic scenes: the smoke scale's analogue of the paper's ImageNet initialisation.

The paper starts every detector from an ImageNet-pretrained ResNet; a CPU-scale run has neither the weights (no
network) nor the time to learn features from a random start inside the detector. So the small backbone is first
trained on dense tasks of the synthetic scenes through a light head (1x1 projections of C3-C5, upsampled to C3
and summed): per-pixel semantic segmentation (background + the 8 shape categories, cross-entropy at the input
size) and, at stride 8, where instances are (a Gaussian heatmap at each box centre, binary cross-entropy) and
how large they are (the box's width and height / the image's, L1 on the instance's pixels). Every pixel is
supervised, so the features that tell shapes apart, where they are and how far they extend are learned in
minutes; the head is thrown away and the backbone's weights are saved as a plain state dict with their
provenance, which ``model.backbone_weights`` loads (``torch.load(weights_only=True)``).

``solq pretrain-backbone --out FILE`` runs :func:`pretrain_backbone`; the shipped file (``synthetic-small``) was
made with its defaults (see the README for the command and its measured accuracy).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from solq.config import load_config
from solq.data import collate
from solq.engine.builders import EpochSampler, SeededDataset, build_dataset
from solq.engine.logger import progress
from solq.engine.optim import lr_factor
from solq.engine.runtime import seed_everything
from solq.models.backbone import Backbone

__all__ = ["SegmentationHead", "semantic_targets", "instance_targets", "pretrain_backbone", "segmentation_scores"]

IGNORE = -1  # padding pixels


class SegmentationHead(nn.Module):
    """Dense outputs from C3-C5: 1x1 projections to ``num_classes`` (+ 3 with ``instances``) channels, upsampled
    to C3 and summed.

    forward(features list of [B,C_l,h_l,w_l], size (H, W)) -> (class logits [B,K,H,W] bilinearly upsampled to
    ``size``, centre-heatmap logits [B,h_3,w_3] and box size [B,2,h_3,w_3] (width, height / the image's), both
    None without ``instances``).
    """

    def __init__(self, in_channels: list[int], num_classes: int, *, instances: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.proj = nn.ModuleList(nn.Conv2d(c, num_classes + (3 if instances else 0), 1) for c in in_channels)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]):
        base = features[0].shape[-2:]
        out = sum(F.interpolate(p(f), size=base, mode="bilinear", align_corners=False) if f.shape[-2:] != base
                  else p(f) for p, f in zip(self.proj, features))
        K = self.num_classes
        logits = F.interpolate(out[:, :K], size=size, mode="bilinear", align_corners=False)
        if out.shape[1] == K:
            return logits, None, None
        return logits, out[:, K], out[:, K + 1:]


def semantic_targets(targets: list[dict], shape: tuple[int, int], device) -> torch.Tensor:
    """int64 [B,H,W] per-pixel category id (0 = background, IGNORE on padding) of a padded batch whose
    targets hold ``masks`` bool [n,h,w] (the unpadded image size) and ``labels`` [n]. Where masks overlap,
    the larger category id wins (the synthetic scenes' visible masks are disjoint)."""
    H, W = shape
    out = torch.full((len(targets), H, W), IGNORE, dtype=torch.int64, device=device)
    for b, t in enumerate(targets):  # one vectorised reduction per image
        masks, labels = t["masks"].to(device), t["labels"].to(device)
        h, w = masks.shape[-2:]
        sem = (masks.long() * labels[:, None, None]).amax(0) if len(labels) else torch.zeros(h, w, dtype=torch.int64,
                                                                                               device=device)
        out[b, :h, :w] = sem
    return out


@torch.no_grad()
def instance_targets(targets: list[dict], shape: tuple[int, int], stride: int, device) -> tuple[torch.Tensor, ...]:
    """Stride-``stride`` targets of a padded batch of padded size ``shape``: (heatmap [B,h,w] in [0,1], the max over
    instances of a Gaussian at each box centre with sigma = max(0.5, side / 6) in cells; size [B,2,h,w] the
    box's (width, height) / the image's on the instance's pixels; size_mask bool [B,h,w] where size applies).
    Targets hold ``masks`` bool [n,h_i,w_i] and ``boxes_xyxy`` [n,4] in pixels of the unpadded image."""
    H, W = shape
    h, w = -(-H // stride), -(-W // stride)
    heat = torch.zeros(len(targets), h, w, device=device)
    size = torch.zeros(len(targets), 2, h, w, device=device)
    has = torch.zeros(len(targets), h, w, dtype=torch.bool, device=device)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    for b, t in enumerate(targets):  # vectorised over the image's instances
        boxes = t["boxes_xyxy"].to(device).float()
        if not len(boxes):
            continue
        ih, iw = t["masks"].shape[-2:]
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        sigma = (torch.minimum(bw, bh) / 6).clamp(min=0.5 * stride)
        g = torch.exp(-((xs[None, None] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2)
                      / (2 * sigma[:, None, None] ** 2))  # [n,h,w]
        heat[b] = g.amax(0)
        cells = F.adaptive_max_pool2d(t["masks"].to(device)[None].float(), (-(-ih // stride), -(-iw // stride)))[0]
        cells = F.pad(cells, (0, w - cells.shape[-1], 0, h - cells.shape[-2])) > 0  # [n,h,w]
        owner = (cells.float() / (bw * bh + 1)[:, None, None]).argmax(0)  # the smallest instance wins
        any_cell = cells.any(0)
        rel = torch.stack([bw / iw, bh / ih], 1)  # [n,2]
        size[b] = rel[owner].permute(2, 0, 1) * any_cell
        has[b] = any_cell
    return heat, size, has


@torch.no_grad()
def segmentation_scores(backbone: Backbone, head: SegmentationHead, loader, num_classes: int,
                        device: torch.device) -> dict:
    """Pixel accuracy and mean IoU over classes (background included) on ``loader``; fractions in [0,1]."""
    backbone.eval()
    head.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64)  # [target * K + prediction]
    for batch in loader:
        batch = batch.to(device)
        feats = [f for f, _ in backbone(batch.images, batch.mask)]
        pred = head(feats, batch.images.shape[-2:])[0].argmax(1)
        tgt = semantic_targets(batch.targets, batch.images.shape[-2:], device)
        valid = tgt != IGNORE
        confusion += torch.bincount(tgt[valid] * num_classes + pred[valid], minlength=num_classes ** 2).cpu()
    confusion = confusion.view(num_classes, num_classes)
    inter = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - inter
    seen = union > 0
    return {"pixel_accuracy": float(inter.sum() / confusion.sum().clamp(min=1)),
            "mean_iou": float((inter[seen] / union[seen]).mean()), "num_images": len(loader.dataset)}


def pretrain_backbone(out_file: str | Path, *, data_root: str = "data/pretrain_synthetic", num_train: int = 4000,
                      num_val: int = 100, image_size: int = 256, train_size: int = 160, steps: int = 8000,
                      batch_size: int = 16, lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0,
                      norm: str = "batch", instance_weight: float = 0.0, num_threads: int = 0,
                      progress_bar: bool = True) -> dict:
    """Train the small backbone on per-pixel segmentation of synthetic scenes and save it.

    Scenes: ``num_train`` training and ``num_val`` validation images of ``image_size`` px generated (once, cached)
    into ``data_root`` with ``seed``; trained at ``train_size`` px (flips, scales 0.8-1x of it), AdamW, lr warm-up
    over 5% of the ``steps`` then cosine to 1%; ``instance_weight`` weighs the centre-heatmap and box-size terms
    against the segmentation (0, the default and the shipped file's: segmentation only; with 1 the detector
    scored lower, see the README). Writes ``out_file``: {"format": "solq-backbone-1", "arch",
    "norm", "state_dict" (the network's ``body.*`` tensors), "meta" (recipe and val scores)}.
    Returns the meta dict (with ``pixel_accuracy`` / ``mean_iou`` on the val scenes, ``seconds``).
    """
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    start = time.perf_counter()
    scales = sorted({int(train_size * f) // 8 * 8 for f in (0.8, 0.9, 1.0)})
    cfg = load_config("smoke", [f"data.root={data_root}", f"data.synth_num_train={num_train}",
                                f"data.synth_num_val={num_val}", f"data.synth_image_size={image_size}",
                                f"data.synth_seed={seed}", f"data.train_scales={scales}", f"data.max_size={train_size}",
                                "data.crop_prob=0", f"data.eval_size={train_size}", "model.backbone=small",
                                f"model.backbone_norm={norm}", "model.freeze_stages=0"])
    train_ds, val_ds = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    num_classes = int(train_ds.num_classes)
    seed_everything(seed)
    device = torch.device("cpu")
    backbone = Backbone("small", norm=norm, freeze_stages=0)
    head = SegmentationHead(backbone.num_channels, num_classes, instances=instance_weight > 0)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # the engine's warm-up + cosine; total_steps = steps + 1 puts the cosine's end one step after the last update,
    # as the recipe that made the shipped file did
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, schedule="cosine", total_steps=steps + 1, warmup_steps=max(1, steps // 20), min_lr_ratio=0.01))
    sampler = EpochSampler(len(train_ds), shuffle=True, seed=seed)
    loader = DataLoader(SeededDataset(train_ds, seed), batch_size=batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate)
    bar = progress(None, total=steps, desc="pretrain backbone", enabled=progress_bar)
    step, epoch, loss_ema = 0, 0, None
    while step < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            backbone.train()
            head.train()
            logits, heat_logits, size_pred = head([f for f, _ in backbone(batch.images, batch.mask)],
                                                  batch.images.shape[-2:])
            loss = F.cross_entropy(logits, semantic_targets(batch.targets, batch.images.shape[-2:], device),
                                   ignore_index=IGNORE)
            if instance_weight > 0:
                heat, size, has = instance_targets(batch.targets, batch.images.shape[-2:], 8, device)
                valid = ~F.interpolate(batch.mask[None].float(), size=heat.shape[-2:])[0].bool()
                heat_loss = F.binary_cross_entropy_with_logits(heat_logits, heat, reduction="none")[valid].mean()
                size_loss = (size_pred - size).abs().sum(1)[has].mean() if has.any() else 0.0 * size_pred.sum()
                loss = loss + instance_weight * (heat_loss + size_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = float(loss.detach())
            loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
            if step >= steps:
                break
        epoch += 1
    bar.close()
    val_loader = DataLoader(SeededDataset(val_ds, seed), batch_size=batch_size, collate_fn=collate,
                            sampler=EpochSampler(len(val_ds), shuffle=False, pad=False))
    scores = segmentation_scores(backbone, head, val_loader, num_classes, device)
    meta = {"task": "semantic segmentation of synthetic scenes (background + 8 shapes)"
                    + (" + instance centres and sizes" if instance_weight > 0 else ""),
            "instance_weight": instance_weight, "steps": steps,
            "batch_size": batch_size, "lr": lr, "train_size": train_size, "num_train": num_train,
            "image_size": image_size, "seed": seed, "final_loss_ema": loss_ema, **scores,
            "seconds": round(time.perf_counter() - start, 1), "torch": str(torch.__version__)}
    state = {k: v.detach().clone() for k, v in backbone.body.state_dict().items()}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "solq-backbone-1", "arch": "small", "norm": norm, "state_dict": state, "meta": meta},
               out_file)
    return meta

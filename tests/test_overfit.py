"""Overfitting: the smoke SOLQ model memorises a few synthetic scenes (box and mask AP >= 0.8 on them).

An end-to-end check that the pieces fit together: data targets (normalised boxes, ``boxes_xyxy`` crops),
model, Hungarian matcher, the real criterion with auxiliary losses, the real post-processor (vectors decoded
and pasted into the *predicted* boxes at the original size) and COCO evaluation. A sign error in a matcher
cost, a label offset, a box normalisation or a crop/paste mismatch keeps AP far below the bar.

It is a pure memorisation test: eval transforms (no augmentation) for training and evaluation, the whole
set as one batch (one optimiser step = one epoch), deterministic seeding. It uses a plain loop (only the
optimiser and schedule come from ``solq.engine.optim``), so a failure points at the model, the codecs, the
data or the evaluation rather than at the training engine.
Measured on 2 shared CPU cores: 250 steps take about 65 s of CPU time (75-140 s wall, depending on the
load), box AP 1.0, mask AP 0.90-0.99 (seeds 0-2; the codec alone, on GT boxes, reaches 0.97-1.0).
"""
import math
import time

import pytest
import torch

from solq.config import load_config
from solq.data import CocoInstances, build_transforms, collate
from solq.data.synthetic import generate
from solq.engine.optim import build_optimizer, build_scheduler
from solq.evaluation import evaluate_coco
from solq.models import build_model
from tiny_overrides import RELEASE_LIKE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NUM_IMAGES = 4
IMAGE_SIZE = 128  # eval_size = max_size = IMAGE_SIZE: the eval resize keeps the original size
MAX_OBJECTS = 3
STEPS = 250  # = train.epochs: the whole set is one batch
LR_DROP = 200  # x0.1 afterwards, as the recipe's step schedule; it settles the boxes to the last pixel
SEED = 0
AP_MIN = 0.8



def _evaluate(model, postprocessor, batch, coco) -> dict:
    """Box and mask COCO metrics of the model on ``batch`` (the real post-processor, original size)."""
    model.eval()
    with torch.no_grad():
        outputs = model(batch.images, batch.mask)
        results = postprocessor(outputs, torch.stack([t["orig_size"] for t in batch.targets]))
    model.train()
    predictions = [{"image_id": int(t["image_id"]), **r} for t, r in zip(batch.targets, results)]
    return evaluate_coco(coco, predictions)


def test_smoke_model_memorises_a_few_scenes(tmp_path):
    paths = generate(tmp_path / "synthetic", NUM_IMAGES, 0, IMAGE_SIZE, SEED, max_objects=MAX_OBJECTS,
                     progress=False)
    cfg = load_config("smoke", overrides=RELEASE_LIKE + [  # the release's model and recipe at the smoke size
        f"data.eval_size={IMAGE_SIZE}", f"data.max_size={IMAGE_SIZE}",
        "model.num_queries=10",  # <= 3 objects per image: 10 queries are plenty and converge faster
        "train.lr=1e-3", "train.lr_backbone=1e-4",  # higher than the recipe: a few hundred steps only
        f"train.epochs={STEPS}", f"train.lr_drop={LR_DROP}", f"train.seed={SEED}",
        "codec.resolution=64", "codec.num_coeffs=128",  # the smoke preset's codec, stated explicitly
    ])
    dataset = CocoInstances(paths["train_images"], paths["train_annotations"], build_transforms(False, cfg.data))
    cfg.model.num_classes = dataset.num_classes
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert all(t["size"].tolist() == t["orig_size"].tolist() for t in batch.targets)
    num_objects = sum(len(t["labels"]) for t in batch.targets)
    assert num_objects >= NUM_IMAGES + 2  # a few objects, several images with more than one

    torch.manual_seed(cfg.train.seed)
    model, criterion, postprocessor = build_model(cfg)
    model.train()
    before = _evaluate(model, postprocessor, batch, dataset.coco)
    # the bar means something: an untrained model scores (near) nothing on the same evaluation
    assert before["bbox"]["AP"] < 0.2 and before["segm"]["AP"] < 0.2

    optimizer = build_optimizer(cfg, model)  # the recipe's three AdamW groups (reference §1.3)
    scheduler = build_scheduler(cfg, optimizer)  # stepped per step here: one step is one epoch of 4 images
    weights = criterion.weight_dict
    totals, vector_losses = [], []
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        outputs = model(batch.images, batch.mask)
        losses = criterion(outputs, batch.targets)
        assert "loss_vector_0" in losses and "loss_giou_0" in losses  # aux losses of decoder layer 0 are in
        total = sum(losses[k] * weights[k] for k in weights if k in losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
        optimizer.step()
        scheduler.step()
        totals.append(total.item())
        vector_losses.append(losses["loss_vector"].item())
    seconds = time.perf_counter() - start

    after = _evaluate(model, postprocessor, batch, dataset.coco)
    box_ap, mask_ap = after["bbox"]["AP"], after["segm"]["AP"]
    print(f"\noverfit: {len(dataset)} images, {num_objects} objects, {cfg.train.epochs} steps in {seconds:.1f} s; "
          f"total loss {totals[0]:.3f} -> {totals[-1]:.3f}, loss_vector {vector_losses[0]:.3f} -> "
          f"{vector_losses[-1]:.3f}; box AP {box_ap:.3f}, mask AP {mask_ap:.3f}")
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.05 * totals[0], f"total loss only went {totals[0]:.3f} -> {totals[-1]:.3f}"
    assert box_ap >= AP_MIN, f"box AP {box_ap:.3f} < {AP_MIN} after {cfg.train.epochs} steps"
    assert mask_ap >= AP_MIN, f"mask AP {mask_ap:.3f} < {AP_MIN} after {cfg.train.epochs} steps"

"""Transforms keep image, boxes and masks together; sizes follow the config (reference §7.2/§7.3)."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from solq.config import ConfigError, DataConfig
from solq.data import CocoInstances, build_transforms
from solq.data.transforms import IMAGENET_MEAN, IMAGENET_STD, FinalizeTarget, RandomSizeCrop

CFG = DataConfig(train_scales=[48, 64, 80], max_size=120, crop_resize_scales=[60, 70], crop_min=40, crop_max=60,
                 eval_size=64)
COLOURS = {1: (230, 20, 20), 2: (20, 230, 20), 3: (20, 20, 230), 4: (230, 230, 20)}
# (label, x0, y0, x1, y1) on a 90 x 60 (w x h) image; label 4 touches the right border
BOXES = [(1, 4, 6, 30, 26), (2, 40, 30, 60, 55), (3, 66, 4, 80, 20), (4, 82, 35, 90, 60)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    h, w = 60, 90
    img = np.full((h, w, 3), 128, np.uint8)
    anns = []
    for i, (label, x0, y0, x1, y1) in enumerate(BOXES):
        img[y0:y1, x0:x1] = COLOURS[label]
        anns.append({"id": i + 1, "image_id": 1, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": 1.0, "iscrowd": 0, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    Image.fromarray(img).save(root / "a.png")
    Image.fromarray(np.full((20, 100, 3), 128, np.uint8)).save(root / "wide.png")
    cats = [{"id": k, "name": str(k)} for k in COLOURS]
    images = [{"id": 1, "file_name": "a.png", "width": w, "height": h},
              {"id": 2, "file_name": "wide.png", "width": 100, "height": 20}]
    (root / "i.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoInstances(root, root / "i.json")


def denormalise(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255


def check_consistent(image, t, cfg=CFG):
    h, w = image.shape[-2:]
    n = t["labels"].numel()
    assert t["masks"].shape == (n, h, w) and t["masks"].dtype == torch.bool
    assert t["boxes"].shape == t["boxes_xyxy"].shape == (n, 4) and t["size"].tolist() == [h, w]
    xyxy = t["boxes_xyxy"].double()
    assert (xyxy[:, 0] >= 0).all() and (xyxy[:, 2] <= w).all() and (xyxy[:, 1] >= 0).all() and (xyxy[:, 3] <= h).all()
    assert (xyxy[:, 2] > xyxy[:, 0]).all() and (xyxy[:, 3] > xyxy[:, 1]).all()
    expected = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                            (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], 1)
    assert torch.allclose(t["boxes"].double(), expected, atol=1e-6)
    pixels = denormalise(image)
    for m, box, label in zip(t["masks"], xyxy, t["labels"].tolist()):
        if not m.any():  # only a sliver of a box can lose all its mask pixels
            assert min(box[2] - box[0], box[3] - box[1]) < 2
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)
        assert (tight - box).abs().max() <= 1.5, (tight, box)
        # the image under the mask has the instance's colour (image and mask moved together)
        inner = m.clone()
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        if inner.any():
            colour = pixels[:, inner].mean(1)
            assert (colour - torch.tensor(COLOURS[label])).abs().max() < 30, (label, colour)


def test_train_transforms_keep_everything_consistent(dataset):
    dataset.transforms = build_transforms(True, CFG)
    seen_sizes, flipped = set(), 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, t = dataset[0]
        h, w = image.shape[-2:]
        assert image.dtype == torch.float32 and max(h, w) <= CFG.max_size
        assert min(h, w) in CFG.train_scales or max(h, w) >= CFG.max_size - 1
        seen_sizes.add(min(h, w))
        check_consistent(image, t)
        if 1 in t["labels"].tolist():  # label 1 sits on the left of the original image
            box = t["boxes"][t["labels"].tolist().index(1)]
            flipped += bool(box[0] > 0.5)
    assert len(seen_sizes) >= 2 and 0 < flipped


def test_train_max_size_on_extreme_aspect_ratio(dataset):
    dataset.transforms = build_transforms(True, CFG)
    for seed in range(10):
        torch.manual_seed(seed)
        image, t = dataset[1]  # 100 x 20 image without annotations
        assert max(image.shape[-2:]) <= CFG.max_size and t["masks"].shape[0] == 0


def expected_eval_size(h, w, size, max_size):
    """Shorter side -> size, unless the longer side would exceed max_size: then the largest shorter side
    that keeps it within (naive search, independent of the closed form in the code)."""
    short, long = min(h, w), max(h, w)
    s = size
    while s > 1 and int(s * long / short) > max_size:
        s -= 1
    return (s, int(s * long / short)) if h <= w else (int(s * long / short), s)


def detr_eval_size(h, w, size, max_size):
    if max(h, w) / min(h, w) * size > max_size:
        size = int(round(max_size * min(h, w) / max(h, w)))
    return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)


@pytest.mark.parametrize("hw", [(60, 90), (90, 60), (20, 100), (100, 20), (64, 64), (33, 47)])
def test_eval_resize_exact_size(hw):
    h, w = hw
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[1.0, 1, 10, 10]], format="XYXY", canvas_size=(h, w)),
              "masks": tv_tensors.Mask(torch.ones(1, h, w, dtype=torch.uint8)), "labels": torch.tensor([1])}
    out, t = build_transforms(False, CFG)(image, target)
    exp = expected_eval_size(h, w, CFG.eval_size, CFG.max_size)
    assert tuple(out.shape[-2:]) == exp and t["size"].tolist() == list(exp) and t["masks"].all()
    assert max(exp) <= CFG.max_size
    assert all(abs(a - b) <= 1 for a, b in zip(exp, detr_eval_size(h, w, CFG.eval_size, CFG.max_size)))
    scale = torch.tensor([exp[1] / w, exp[0] / h] * 2)
    assert torch.allclose(t["boxes_xyxy"], torch.tensor([[1.0, 1, 10, 10]]) * scale, atol=1e-4)


def test_eval_normalisation():
    image = tv_tensors.Image(torch.full((3, 64, 80), 200, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(64, 80)),
              "masks": tv_tensors.Mask(torch.zeros(0, 64, 80, dtype=torch.uint8)), "labels": torch.zeros(0).long()}
    out, t = build_transforms(False, CFG)(image, target)
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert type(out) is torch.Tensor and torch.allclose(out[:, 5, 5], expected, atol=1e-5)
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 64, 80)


def test_random_size_crop_shifts_clips_and_drops():
    h, w = 70, 90
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = tv_tensors.Image(torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8))  # pixel = its coords
    boxes = torch.tensor([[0, 0, 10, 10], [80, 60, 90, 70], [30, 20, 60, 50]], dtype=torch.float32)
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    crop, finalize = RandomSizeCrop(25, 50), FinalizeTarget()
    dropped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                  "masks": tv_tensors.Mask(masks), "labels": torch.tensor([1, 2, 3]), "iscrowd": torch.zeros(3).long()}
        out, t = finalize(*crop(image, target))
        ch, cw = out.shape[-2:]
        left, top = int(out[0, 0, 0]), int(out[1, 0, 0])
        assert 25 <= ch <= 50 and 25 <= cw <= 50
        shifted = boxes - torch.tensor([left, top, left, top])
        clipped = torch.stack([shifted[:, 0].clamp(0, cw), shifted[:, 1].clamp(0, ch),
                               shifted[:, 2].clamp(0, cw), shifted[:, 3].clamp(0, ch)], 1)
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        dropped += int((~keep).sum())
        assert t["labels"].tolist() == torch.tensor([1, 2, 3])[keep].tolist()
        assert torch.equal(t["boxes_xyxy"], clipped[keep]) and t["iscrowd"].shape == t["labels"].shape
        assert torch.equal(t["masks"], masks[keep][:, top:top + ch, left:left + cw].bool())
    assert dropped > 0


def test_random_size_crop_small_image_and_bad_args():
    image = tv_tensors.Image(torch.zeros(3, 10, 12, dtype=torch.uint8))
    assert RandomSizeCrop(40, 60)(image).shape == (3, 10, 12)
    with pytest.raises(ValueError):
        RandomSizeCrop(50, 40)


def test_config_checked_and_pipeline_pickles():
    with pytest.raises(ConfigError, match="crop_min"):
        build_transforms(True, DataConfig(crop_min=700, crop_max=600))
    with pytest.raises(ConfigError, match="train_scales"):
        build_transforms(True, DataConfig(train_scales=[]))
    pickle.loads(pickle.dumps(build_transforms(True, CFG)))

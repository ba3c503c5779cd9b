"""collate pads to the batch max with a padding mask True on padding (reference §2.1)."""
import pytest
import torch

from solq.config import DataConfig
from solq.data import Batch, CocoInstances, build_transforms, collate, samples_dir


def fake(h, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) + 0.5  # never 0, so padding is recognisable
    target = {"labels": torch.arange(n), "boxes": torch.rand(n, 4, generator=g),
              "masks": torch.zeros(n, h, w, dtype=torch.bool), "image_id": torch.tensor(seed), "name": f"im{seed}"}
    return image, target


def test_collate_pads_and_masks():
    sizes = [(5, 9), (7, 4), (6, 6)]
    batch = [fake(h, w, i + 1, i) for i, (h, w) in enumerate(sizes)]
    out = collate(batch)
    assert isinstance(out, Batch) and len(out) == 3
    assert out.images.shape == (3, 3, 7, 9) and out.mask.shape == (3, 7, 9) and out.mask.dtype == torch.bool
    for i, ((h, w), (image, target)) in enumerate(zip(sizes, batch)):
        expected = torch.ones(7, 9, dtype=torch.bool)
        for y in range(h):  # naive reference
            for x in range(w):
                expected[y, x] = False
        assert torch.equal(out.mask[i], expected)
        assert torch.equal(out.images[i, :, :h, :w], image)
        assert (out.images[i][:, expected] == 0).all()
        assert out.targets[i] is target


def test_size_divisibility_and_errors():
    out = collate([fake(5, 9, 1, 0), fake(7, 4, 1, 1)], size_divisibility=8)
    assert out.images.shape[-2:] == (8, 16) and out.mask[:, 7:, :].all() and out.mask[:, :, 9:].all()
    with pytest.raises(ValueError):
        collate([])


def test_batch_to_moves_every_tensor():
    out = collate([fake(5, 9, 2, 0), fake(7, 4, 0, 1)])
    moved = out.to("meta")  # a device without needing a GPU
    assert moved.images.device.type == moved.mask.device.type == "meta"
    for t in moved.targets:
        assert all(v.device.type == "meta" for v in t.values() if isinstance(v, torch.Tensor))
        assert t["name"].startswith("im")
    assert out.images.device.type == "cpu"  # the original is untouched


def test_dataloader_with_samples():
    cfg = DataConfig(train_scales=[96, 128], max_size=160, crop_resize_scales=[100], crop_min=64, crop_max=96)
    ds = CocoInstances(samples_dir() / "images", samples_dir() / "instances.json", build_transforms(True, cfg),
                       max_images=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch.images.shape[0] == 3 and max(batch.images.shape[-2:]) <= 160
    for i, t in enumerate(batch.targets):
        h, w = t["size"].tolist()
        assert not batch.mask[i, :h, :w].any() and batch.mask[i].sum() == batch.mask.shape[1] * batch.mask.shape[2] - h * w
        assert t["masks"].shape[-2:] == (h, w) and {"boxes", "boxes_xyxy", "labels", "masks"} <= set(t)

"""Batching of variable-size images with a padding mask (what DETR's NestedTensor holds).

Images are zero-padded at the bottom/right to the largest height and width in the batch; ``mask``
is True on padding. Targets stay a list of per-image dicts (their masks are not padded: they keep the
unpadded image size, which is what the boxes are normalised to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Batch", "collate"]


def _move(value, device, non_blocking: bool):
    return value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value


@dataclass
class Batch:
    """``images`` float [B,3,H,W] zero-padded; ``mask`` bool [B,H,W] True on padding;
    ``targets`` list of B dicts (see solq.data.transforms.FinalizeTarget)."""

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move images, mask and every tensor in the targets to ``device`` (returns a new Batch)."""
        return Batch(images=self.images.to(device, non_blocking=non_blocking),
                     mask=self.mask.to(device, non_blocking=non_blocking),
                     targets=[{k: _move(v, device, non_blocking) for k, v in t.items()} for t in self.targets])

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``."""
        pin = lambda v: v.pin_memory() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Batch(self.images.pin_memory(), self.mask.pin_memory(),
                     [{k: pin(v) for k, v in t.items()} for t in self.targets])

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(batch: Sequence[tuple[torch.Tensor, dict]], *, size_divisibility: int = 0) -> Batch:
    """List of ``(image [C,H_i,W_i], target)`` -> :class:`Batch`.

    The padded size is the batch max (H, W), rounded up to a multiple of ``size_divisibility`` when
    > 0 (the reference uses none). Use as ``DataLoader(..., collate_fn=collate)``.
    """
    if len(batch) == 0:
        raise ValueError("collate needs at least one (image, target) pair")
    images = [img.as_subclass(torch.Tensor) for img, _ in batch]
    if any(img.dim() != 3 or img.shape[0] != images[0].shape[0] for img in images):
        raise ValueError(f"collate expects images [C,H,W] with one C, got {[tuple(i.shape) for i in images]}")
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    if size_divisibility > 0:
        h = -(-h // size_divisibility) * size_divisibility
        w = -(-w // size_divisibility) * size_divisibility
    padded = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):  # one copy per image, not per pixel
        padded[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return Batch(images=padded, mask=mask, targets=[t for _, t in batch])

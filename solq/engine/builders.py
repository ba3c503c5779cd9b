"""Datasets and loaders from a Config, with sampling that makes runs reproducible and resumable.

Reproducibility design:

- :class:`EpochSampler` orders an epoch by a permutation seeded with (seed, epoch) only, pads it to a
  multiple of the world size by repeating its head, and gives rank r the positions r, r+W, r+2W, ...
  So one process with batch 2B sees, step by step, exactly the images that two processes with batch B see,
  and resuming mid-epoch is "skip the first k positions".
- :class:`SeededDataset` draws each sample's augmentation from RNGs seeded with (seed, epoch, index) and
  restores the global RNG states afterwards: augmentation depends neither on the number of workers nor
  on the rank nor on where a run was resumed, and never disturbs the training RNG (dropout).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from solq.coding import build_codec_from_config, study
from solq.config import Config, ConfigError
from solq.data import CocoInstances, build_transforms, collate
from solq.data.synthetic import generate
from solq.engine import distributed as du

__all__ = ["EpochSampler", "SeededDataset", "dataset_paths", "data_overrides", "build_dataset", "build_datasets",
           "build_train_loader", "build_val_loader", "sample_seed", "fit_codec", "vector_statistics",
           "complete_config"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed mixed from (seed, epoch, index) with numpy's SeedSequence (no collisions in practice)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class EpochSampler(Sampler):
    """Yields ``(epoch, dataset_index)`` for this rank's share of one epoch.

    Args:
        num_samples: dataset length n.
        shuffle: permute with a generator seeded by ``seed + epoch`` (else 0..n-1).
        seed: base seed, the same on every rank.
        rank / world_size: positions rank::world_size of the padded order are this rank's.
        pad: repeat the head so every rank has ceil(n / world_size) items (needed for equal step counts;
            evaluation drops the duplicates by image id).
    Call :meth:`set_epoch` (epoch, start) before iterating: ``start`` skips this rank's first items.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.n, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world, self.pad = rank, world_size, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n and len(order) % self.world:
            extra = self.world - len(order) % self.world
            order += (order * (extra // len(order) + 1))[:extra]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self._indices()[self.start:]])

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world) if self.pad else len(range(self.rank, self.n, self.world))
        return max(per_rank - self.start, 0)


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(epoch, i)`` is produced under RNGs seeded by (seed, epoch, i).

    The global torch, numpy and ``random`` states are restored after each item.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _worker_init(worker_id: int) -> None:
    # numpy/random in workers follow the worker's torch seed (set by the DataLoader from its generator)
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def dataset_paths(cfg: Config, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` ("train" or "val"); empty config fields take the
    defaults under ``data.root`` (synthetic: {root}/{split}, {root}/annotations/instances_{split}.json;
    coco: {root}/{split}2017, {root}/annotations/instances_{split}2017.json)."""
    d = cfg.data
    images, ann = getattr(d, f"{split}_images"), getattr(d, f"{split}_annotations")
    root = Path(d.root)
    tag = split if d.dataset == "synthetic" else f"{split}2017"
    return (Path(images) if images else root / tag,
            Path(ann) if ann else root / "annotations" / f"instances_{tag}.json")


def _ensure_synthetic(cfg: Config) -> None:
    """Generate the synthetic set into data.root when an annotation file is missing (rank 0 writes,
    the other ranks wait)."""
    needed = [dataset_paths(cfg, s)[1] for s in ("train", "val")]
    if all(p.is_file() for p in needed):
        return
    if du.is_main_process():
        d = cfg.data
        generate(d.root, d.synth_num_train, d.synth_num_val, d.synth_image_size, d.synth_seed,
                 val_seed=d.synth_val_seed if d.synth_val_seed >= 0 else None)
    du.barrier()
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(f"data.dataset=synthetic: generation into data.root={cfg.data.root!r} did not produce "
                          f"{missing}; set data.train_annotations/val_annotations or remove them")


def data_overrides(dataset: str, data_root: str | Path = "", coco_root: str | Path = "") -> list[str]:
    """Config overrides selecting the data: ``"synthetic"`` (scenes under ``data_root``, generated when
    missing) or ``"coco"`` (COCO 2017 under ``coco_root``: train2017/, val2017/, annotations/); empty roots
    keep the config's ``data.root``. Raises ConfigError for another ``dataset``."""
    if dataset == "synthetic":
        return ["data.dataset=synthetic"] + ([f"data.root={data_root}"] if str(data_root) else [])
    if dataset == "coco":
        return ["data.dataset=coco"] + ([f"data.root={coco_root}"] if str(coco_root) else [])
    raise ConfigError(f"dataset must be 'synthetic' or 'coco', got {dataset!r}")


def build_dataset(cfg: Config, split: str, *, transforms: str = "auto", max_images: Optional[int] = None):
    """The CocoInstances of ``split`` ("train" | "val"), the one way every part of solq opens a dataset.

    ``transforms``: "auto" (train augmentation for "train", the eval resize for "val"), "train", "eval", or
    "none" (images and masks at their original size, bool masks: galleries, ground truth).
    ``max_images`` None keeps ``data.max_images``. Synthetic scenes are generated when missing.
    Raises ConfigError naming a missing path.
    """
    if transforms not in ("auto", "train", "eval", "none"):
        raise ValueError(f"transforms must be auto, train, eval or none, got {transforms!r}")
    if cfg.data.dataset == "synthetic":
        _ensure_synthetic(cfg)
    images, ann = dataset_paths(cfg, split)
    for key, p in ((f"data.{split}_images", images), (f"data.{split}_annotations", ann)):
        if not p.exists():
            raise ConfigError(f"{key}: {p} does not exist (data.dataset={cfg.data.dataset}, data.root={cfg.data.root})")
    if transforms == "none":
        chain = None
    else:
        chain = build_transforms(transforms == "train" or (transforms == "auto" and split == "train"), cfg.data)
    return CocoInstances(str(images), str(ann), chain, strict=cfg.data.strict,
                         max_images=cfg.data.max_images if max_images is None else max_images)


def build_datasets(cfg: Config) -> tuple:
    """(train dataset, val dataset); the train set's ``num_classes`` goes into :func:`complete_config`."""
    return build_dataset(cfg, "train"), build_dataset(cfg, "val")


def build_train_loader(dataset: Dataset, cfg: Config, *, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False) -> DataLoader:
    """Training loader: EpochSampler (shuffled, seeded by train.seed) + SeededDataset, per-process batch
    ``train.batch_size``, drop_last. Call ``loader.sampler.set_epoch(epoch, start)`` before each epoch.
    Batches are ``solq.data.Batch``."""
    seed = cfg.train.seed
    sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    if len(sampler) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(sampler)} training images "
                          f"per process ({len(dataset)} images, {world_size} processes)")
    return DataLoader(SeededDataset(dataset, seed), batch_size=cfg.train.batch_size, sampler=sampler,
                      drop_last=True, num_workers=cfg.data.num_workers, collate_fn=collate,
                      pin_memory=pin_memory, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(seed + rank))


def build_val_loader(dataset: Dataset, cfg: Config, *, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> DataLoader:
    """Evaluation loader: dataset order, padded so every rank runs the same number of batches of
    ``eval.batch_size`` (duplicates are dropped by image id when gathering)."""
    sampler = EpochSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size, pad=world_size > 1)
    return DataLoader(SeededDataset(dataset, cfg.train.seed), batch_size=cfg.eval.batch_size, sampler=sampler,
                      drop_last=False, num_workers=cfg.data.num_workers, collate_fn=collate,
                      pin_memory=pin_memory, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(cfg.train.seed + rank))


def fit_codec(cfg: Config, train_ds, output_dir: str | Path) -> tuple:
    """The codec of ``cfg.codec``, ready to use: ``(codec, file)``.

    A pca/sparse codec without ``codec.file`` is fitted on the non-crowd GT masks of ``train_ds`` (the training
    CocoInstances: its annotations, ``coco``, and kept image ``ids``; no images are read), cropped
    to their boxes at the codec resolution: ``codec.fit_max_masks`` of them drawn at random with
    ``codec.fit_seed`` (0 = all), by the sampler the coding study uses (``solq.coding.study.fit_codec``).
    Rank 0 fits and saves ``output_dir/codec.pt``, every rank loads it, and ``file`` is that path, for the run's
    completed config (:func:`complete_config`) so checkpoints and evaluation find the same codec. Codecs
    without a fit (dct, flatten) and already fitted ones come back with ``cfg.codec.file``.
    Raises ConfigError when the training set has fewer than 2 masks to fit on.
    """
    codec = build_codec_from_config(cfg.codec)
    if codec.is_fitted:
        return codec, cfg.codec.file
    path = Path(output_dir) / "codec.pt"
    if du.is_main_process() and not path.is_file():
        try:
            study.fit_codec(codec, train_ds.coco, image_ids=train_ds.ids, max_masks=cfg.codec.fit_max_masks,
                            seed=cfg.codec.fit_seed)
        except ValueError as e:  # fewer than 2 masks
            raise ConfigError(f"codec.name={cfg.codec.name}: cannot fit the codec on {train_ds.ann_file} "
                              f"({e})") from None
        codec.save(path)
    du.barrier()
    codec.load(path)
    return codec, str(path)


def vector_statistics(cfg: Config, train_ds, codec) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [codec.dim] of the training codes for ``model.vector_standardize``: the non-crowd GT masks
    of ``train_ds`` (annotations only, no images), ``codec.fit_max_masks`` of them drawn with ``codec.fit_seed``
    as for fitting a codec. Deterministic, so every process computes the same. Raises ConfigError when the
    training set has fewer than 2 masks."""
    try:
        return study.code_statistics(codec, train_ds.coco, image_ids=train_ds.ids, max_masks=cfg.codec.fit_max_masks,
                                     seed=cfg.codec.fit_seed)
    except ValueError as e:
        raise ConfigError(f"model.vector_standardize: {train_ds.ann_file}: {e}") from None


def complete_config(cfg: Config, *, num_classes: int, codec_file: str) -> Config:
    """A copy of ``cfg`` with what the run took from its data: ``model.num_classes`` (where it was 0) and
    ``codec.file`` (a codec fitted by :func:`fit_codec`). The run saves this copy (config.yaml, checkpoints),
    so evaluation rebuilds the same model; the caller's ``cfg`` stays as given."""
    done = Config.from_dict(cfg.to_dict())
    if done.model.num_classes == 0:
        done.model.num_classes = int(num_classes)
    done.codec.file = codec_file
    return done

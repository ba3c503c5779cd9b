"""solq.data: COCO-format instance dataset, transforms, batching, shipped samples.

- :class:`CocoInstances` (coco.py): validated COCO dataset on pycocotools.
- :class:`DatasetReport`, :class:`DatasetError`, :class:`DataWarning` (validation.py): the annotation checks.
- :class:`ImageLoadError` (images.py): an image file missing, unreadable or of the wrong size.
- :func:`build_transforms` (transforms.py): the authors' release augmentation / eval resize, v2 + tv_tensors.
- :func:`collate` / :class:`Batch` (batching.py): padding to the batch max with a padding mask.
- :func:`samples_dir`: 8 permissively licensed COCO images with annotations, shipped in the package.
- ``solq.data.synthetic`` (import it explicitly): procedural COCO-format scenes.
"""
from pathlib import Path

from .batching import Batch, collate
from .coco import CocoInstances
from .images import ImageLoadError
from .transforms import build_transforms
from .validation import DatasetError, DatasetReport, DataWarning

__all__ = ["CocoInstances", "DatasetReport", "DatasetError", "ImageLoadError", "DataWarning",
           "build_transforms", "collate", "Batch", "samples_dir"]


def samples_dir() -> Path:
    """Folder with the shipped samples: ``images/*.jpg``, ``instances.json``, ``ATTRIBUTION.md``."""
    return Path(__file__).resolve().parent / "samples"

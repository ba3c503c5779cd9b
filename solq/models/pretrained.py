"""Weights shipped inside the package, reachable by name (as hub names are elsewhere; nothing is downloaded).

``path(name)`` returns the file of a shipped name, or ``name`` itself when it is an existing file, so every
option that takes weights accepts either. Every file is a plain dict of tensors and metadata, loadable with
``torch.load(weights_only=True)``.

| name | what | made by |
|---|---|---|
| ``synthetic-small`` | the ``small`` backbone pretrained on synthetic-scene segmentation | ``solq pretrain-backbone`` |
| ``smoke-uqr`` | the smoke SOLQ (UQR) model, weights + config + its measured metrics | ``scripts/make_teaching_models.sh`` |
| ``smoke-sqr`` | the smoke SQR baseline, the same way | ``scripts/make_teaching_models.sh`` |

The two smoke models are checkpoints: every ``--checkpoint`` option and the notebooks' ``checkpoint`` parameters
take their names (``solq eval --checkpoint smoke-uqr``).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["SHIPPED", "path", "names", "resolve"]

_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = {
    "synthetic-small": "backbone_small_synthetic.pt",
    "smoke-uqr": "smoke_uqr.pt",
    "smoke-sqr": "smoke_sqr.pt",
}


def names() -> list[str]:
    """The shipped names whose files are present."""
    return [n for n, f in SHIPPED.items() if (_DIR / f).is_file()]


def path(name: str | Path) -> Path:
    """The file of a shipped ``name``, or ``name`` itself when it is an existing file.

    Raises FileNotFoundError naming the shipped names when it is neither."""
    if str(name) in SHIPPED:
        f = _DIR / SHIPPED[str(name)]
        if not f.is_file():
            raise FileNotFoundError(f"shipped weights {name!r} should be at {f}, which is missing (a broken install?)")
        return f
    p = Path(name)
    if p.is_file():
        return p
    raise FileNotFoundError(f"{name!r} is neither a file nor a shipped name ({sorted(SHIPPED)})")


def resolve(value: str | Path) -> Path:
    """The file of a shipped name (as :func:`path`), else ``value`` unchanged as a Path (existing or not: the
    caller reports a missing file in its own terms)."""
    return path(str(value)) if str(value) in SHIPPED else Path(value)

"""Run logging: a JSON-lines file per run, TensorBoard when the package is installed, tqdm progress.

Only the main process writes; the others get a disabled logger, so callers never branch on the rank.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm import tqdm

from solq.files import describe_os_error

__all__ = ["RunLogger", "progress", "MeanMeter", "flatten_metrics"]


def _plain(v: Any) -> Any:
    """JSON-able scalar: tensors and numpy numbers become floats; NaN/inf become strings."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def flatten_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"bbox": {"AP": .5}} -> {"bbox/AP": .5} (for TensorBoard tags)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class RunLogger:
    """Append records to ``output_dir/log.jsonl`` (one JSON object per line, flushed at once; a resumed
    run appends, so a step may appear twice: the later record is the one the run continued from) and mirror
    numeric values to TensorBoard under ``output_dir/tb`` when ``torch.utils.tensorboard`` imports.

    Args:
        output_dir: run folder; created when missing.
        enabled: False on non-main ranks (every method becomes a no-op).
        tensorboard: try to open a SummaryWriter.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 filename: str = "log.jsonl"):
        self.enabled = enabled
        self.path = Path(output_dir) / filename
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a run killed mid-write may have left half a line: start ours on a fresh one
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")
        if torn:
            self._file.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"))
            except ImportError:
                self._tb = None

    def log(self, record: dict, *, step: Optional[int] = None, tb_prefix: str = "") -> None:
        """Write ``record`` (nested dicts allowed) as one JSON line with a wall-clock ``time`` field;
        numeric leaves also go to TensorBoard as ``tb_prefix/key`` at ``step``."""
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **record}
        if self._file is not None:
            try:
                self._file.write(json.dumps(_stringify(rec)) + "\n")
                self._file.flush()
            except OSError as exc:  # e.g. a full disk: say so once; the checkpoint writes decide whether to stop
                warnings.warn(f"cannot write the log {self.path}: {describe_os_error(exc)}; logging to it stops "
                              f"here", RuntimeWarning, stacklevel=2)
                self._close_file()
        if self._tb is not None and step is not None:
            for tag, value in flatten_metrics(record).items():
                if tag not in ("epoch", "step") and math.isfinite(value):
                    self._tb.add_scalar(f"{tb_prefix}{tag}", value, step)
            self._tb.flush()

    def close(self) -> None:
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # its buffer could not be written either; the warning has said so
                pass
            self._file = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stringify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _stringify(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_stringify(v) for v in tree]
    return _plain(tree)


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True,
             initial: int = 0) -> tqdm:
    """A tqdm bar (to stderr, with ETA) that is silent on non-main ranks or when ``enabled`` is False."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0, leave=False)


class MeanMeter:
    """Running means of named scalars (e.g. loss terms over an epoch)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, float], n: int = 1) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
            self.counts[k] = self.counts.get(k, 0) + n

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}

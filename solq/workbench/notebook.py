"""Helpers the notebooks use: parameter validation, seeding, and writing metrics and figures.

A notebook's cell after ``parameters`` typically reads::

    from solq.workbench.notebook import Param, validate_parameters, set_seed
    P = validate_parameters(dict(scale=scale, seed=seed, output_dir=output_dir), {
        "scale": ("smoke", "paper"),
        "seed": int,
        "output_dir": Param(str, nonempty=True),
    })

and its last cell ``write_metrics(output_dir, {"segm": results["segm"], "bbox": ...}, config=cfg)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from solq import code_version
from solq.files import write_text_atomic
from solq.models import pretrained

__all__ = ["Param", "validate_parameters", "flatten_metrics", "write_metrics", "save_figure", "set_seed",
           "checkpoint_path", "project_root", "resolve_path"]

_SCALAR = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """What one notebook parameter may be.

    ``kind``: a type or tuple of types (``float`` also accepts ints; ``bool`` is never an int);
    ``choices``: allowed values (for a list value: allowed items); ``min``/``max``: numeric bounds (inclusive, also applied to list items);
    ``items``: type of list items; ``path``: ``"file"``, ``"dir"`` or ``"exists"`` that must exist, or
    ``"checkpoint"``: an existing path or a shipped checkpoint name (checked when the value is non-empty;
    relative paths are resolved from the project root, see ``resolve_path``);
    ``nullable``: None allowed; ``nonempty``: strings and lists must not be empty; ``help``: hint
    appended to error messages.
    """

    kind: type | tuple[type, ...] = object
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    items: type | tuple[type, ...] | None = None
    path: str | None = None
    nullable: bool = False
    nonempty: bool = False
    help: str = ""


def _as_param(spec: Any) -> Param:
    if isinstance(spec, Param):
        return spec
    if isinstance(spec, type) or (isinstance(spec, tuple) and spec and all(isinstance(s, type) for s in spec)):
        return Param(kind=spec)
    if isinstance(spec, (list, tuple, set, frozenset)):
        return Param(choices=tuple(spec))
    raise TypeError(f"schema entry {spec!r}: expected a Param, a type, or a collection of allowed values")


def _type_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _instance(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is object:
            return True
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k is int and isinstance(value, bool):
            continue
        if isinstance(value, k):
            return True
    return False


def _check(name: str, value: Any, p: Param) -> str | None:
    """The problem with ``value`` for parameter ``name``, or None."""
    if value is None:
        return None if p.nullable else f"parameter {name!r}: must not be None"
    if not _instance(value, p.kind):
        return f"parameter {name!r}: expected {_type_name(p.kind)}, got {type(value).__name__} {value!r}"
    if p.choices is not None:  # for a list value, every item must be a choice
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in p.choices):
                return f"parameter {name!r}: {v!r} is not one of {list(p.choices)}"
    if p.nonempty and isinstance(value, (str, list, tuple, dict)) and len(value) == 0:
        return f"parameter {name!r}: must not be empty"
    values = value if isinstance(value, (list, tuple)) else [value]
    if p.items is not None and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if not _instance(v, p.items):
                return (f"parameter {name!r}: item {i} should be {_type_name(p.items)}, "
                        f"got {type(v).__name__} {v!r}")
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if p.min is not None and v < p.min:
                return f"parameter {name!r}: {v!r} is below the minimum {p.min}"
            if p.max is not None and v > p.max:
                return f"parameter {name!r}: {v!r} is above the maximum {p.max}"
    if p.path and isinstance(value, (str, os.PathLike)) and str(value):
        try:
            path = checkpoint_path(value) if p.path == "checkpoint" else resolve_path(value)
        except FileNotFoundError as e:  # a shipped name whose file is missing
            return f"parameter {name!r}: {e}"
        ok = path.is_file() if p.path == "file" else path.is_dir() if p.path == "dir" else path.exists()
        if not ok:
            what = {"file": "file", "dir": "directory", "checkpoint": "checkpoint (run folder, file or shipped "
                    "name)"}.get(p.path, "path")
            return f"parameter {name!r}: {what} {str(value)!r} does not exist (resolved to {path})"
    return None


def validate_parameters(params: Mapping[str, Any], schema: Mapping[str, Any]) -> dict:
    """Check notebook parameters against ``schema`` (name -> Param, type, or allowed values).

    Returns a new dict with the same values (ints given for ``float`` parameters become floats).
    Raises ValueError naming every unknown, missing or invalid parameter and what is wrong.
    """
    problems = []
    unknown = sorted(set(params) - set(schema))
    if unknown:
        problems.append(f"unknown parameter(s) {unknown}; valid parameters: {sorted(schema)}")
    out = {}
    for name, spec in schema.items():
        p = _as_param(spec)
        if name not in params:
            problems.append(f"parameter {name!r} is missing")
            continue
        value = params[name]
        problem = _check(name, value, p)
        if problem:
            problems.append(problem + (f" ({p.help})" if p.help else ""))
            continue
        if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[name] = value
    if problems:
        raise ValueError("invalid notebook parameters:\n  " + "\n  ".join(problems))
    return out


def _to_python(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    return value


def flatten_metrics(metrics: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict:
    """``{"segm": {"AP": 0.3}}`` -> ``{"segm/AP": 0.3}``. Values become plain Python scalars
    (numpy/torch scalars unwrapped, NaN/inf -> None); lists of scalars are kept.
    Raises ValueError naming the key of any other value."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, sep, name + sep))
            continue
        value = _to_python(value)
        if isinstance(value, (list, tuple)):
            value = [_to_python(v) for v in value]
            if not all(isinstance(v, _SCALAR) for v in value):
                raise ValueError(f"metric {name!r}: lists may hold only scalars, got {value!r}")
        elif not isinstance(value, _SCALAR):
            raise ValueError(f"metric {name!r}: expected a number, string, bool or None, "
                             f"got {type(value).__name__}")
        flat[name] = value
    return flat


def _config_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config: expected a Config, a dataclass or a dict, got {type(config).__name__}")


def write_metrics(output_dir: str | Path, flat_metrics: Mapping[str, Any], config: Any = None,
                  *, filename: str = "metrics.json") -> Path:
    """Write ``output_dir/metrics.json``: the flattened metrics, ``code_version`` and, when given,
    the resolved ``config`` (a Config, dataclass or dict) under the key ``"config"``.

    Metric conventions (see README): AP values as fractions in [0, 1] under ``segm/AP``,
    ``segm/AP50``, ``bbox/APs`` ...; the factor under study under its parameter name.
    Written atomically (solq.files.write_text_atomic: a full disk or unwritable folder raises OutputWriteError
    naming the path). Returns the path.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = flatten_metrics(flat_metrics)
    if "config" in record:
        raise ValueError("metric key 'config' is reserved for the resolved config")
    record["code_version"] = code_version()
    cfg = _config_dict(config)
    if cfg is not None:
        record["config"] = json.loads(json.dumps(cfg, default=str))
    return write_text_atomic(out / filename, json.dumps(record, indent=2, allow_nan=False), what="metrics file")


def save_figure(fig: Any, output_dir: str | Path, name: str, *, dpi: int = 100) -> Path:
    """Save a matplotlib figure as ``output_dir/<name>.png`` (name made file-safe). Returns the path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", name.removesuffix(".png")).strip("_") or "figure"
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding both
    ``notebooks/`` and ``experiments/``; the working directory when there is none."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "notebooks").is_dir() and (d / "experiments").is_dir():
            return d
    return here


def resolve_path(path: str | Path) -> Path:
    """Resolve a path parameter: absolute paths as given, relative ones from the project root
    (where the runner executes notebooks), so a notebook opened from ``notebooks/`` finds the same files."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (project_root() / p).resolve()


def checkpoint_path(value: str | Path) -> Path:
    """A checkpoint parameter: a shipped name (``smoke-uqr``, ``smoke-sqr``) as its file, else a path as
    :func:`resolve_path` (a run folder or a .pth file)."""
    return resolve_path(pretrained.resolve(value))  # a shipped file's path is absolute: kept as it is


def set_seed(seed: int) -> int:
    """Seed Python's ``random``, NumPy and torch (all devices). Returns ``seed``."""
    import numpy as np
    import torch

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed

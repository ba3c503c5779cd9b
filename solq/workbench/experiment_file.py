"""The experiment YAML (one per paper table or figure): loading and checking it, expanding its grid.

An experiment YAML (see ``experiments/``)::

    name: table3b_vector_loss_weight     # optional, defaults to the file name
    title: "Table 3b: ..."               # and ``claim:`` (what the paper says), both free text
    notebook: notebooks/ablation.ipynb   # relative to the project root (the folder holding experiments/)
    requires: [table2_uqr_vs_sqr]        # experiments whose runs at the same scale this one reads
    parameters: {...}                    # notebook parameters shared by every scale and point
    grid: {vector_loss_coef: [0.3, 1]}   # factor(s) under study: product of lists, or a list of points
    seeds: [0, 1, 2]                     # optional: every grid point runs once per seed (notebook parameter seed)
    scales:                              # exactly the scales `smoke` and `paper`, each with
      smoke: {description, parameters, grid (replaces the top-level grid), seeds and requires (replace the
              top-level ones), timeout (s per cell)}
      paper: {...}
    report: {...}                        # table layout, read by solq.workbench.report (run_tables)

String parameters may use ``${runs_dir}``, ``${scale}``, ``${experiment}``, ``${root}`` (project root),
``${seed_suffix}`` (``__seed=N`` in a seeded point, else empty: ``.../mode=sqr${seed_suffix}`` names the point of
another grid value with the same seed) and ``${<other parameter>}``.

Seeds: with ``seeds`` (or ``solq run --seeds``), a grid point of name ``P`` becomes one point per seed, named
``P__seed=N`` (e.g. ``default__seed=0``), whose notebook parameter ``seed`` is N; without them
names and parameters are as before. :func:`split_seed` reads a point name back into (grid point, seed); the report
aggregates the seeds of one grid point into mean ± std.

- :func:`load_experiment` -> :class:`Experiment`; ``Experiment.points(scale)`` -> the grid's :class:`Point` list
  with resolved parameters (ValueError names the file and the key at fault).
- :func:`expand_grid` (a grid -> a list of value dicts), :func:`point_slug` (values -> the point's folder name).

Running the points is :mod:`solq.workbench.runner`; not to be confused with :mod:`solq.workbench.experiment`,
which holds what the notebooks run (``train_and_evaluate``, ...).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solq.config import read_yaml_mapping

__all__ = ["Experiment", "Point", "load_experiment", "expand_grid", "point_slug", "seeded_name", "split_seed",
           "parse_seeds", "SCALES"]

SCALES = ("smoke", "paper")
_TOP_KEYS = {"name", "title", "claim", "description", "notebook", "requires", "parameters", "grid", "seeds",
             "scales", "report"}
_SCALE_KEYS = {"description", "parameters", "grid", "seeds", "requires", "timeout", "report"}
_SEEDED = re.compile(r"^(?:(?P<group>.+)__)?seed=(?P<seed>\d+)$")
_INJECTED = ("scale", "output_dir")


@dataclass
class Point:
    """One grid point: ``name`` (stable slug of ``values``, with ``__seed=N`` when seeded), the grid ``values``
    (without the seed), all notebook ``parameters`` (without ``output_dir``) and its ``seed`` (None: unseeded)."""

    name: str
    values: dict
    parameters: dict
    seed: int | None = None


@dataclass
class Experiment:
    """A parsed experiment YAML (see the module docstring)."""

    name: str
    path: Path
    root: Path
    notebook: Path
    title: str
    raw: dict = field(repr=False)

    def scale_spec(self, scale: str) -> dict:
        if scale not in self.raw["scales"]:
            raise ValueError(f"{self.path}: no scale {scale!r}; scales: {sorted(self.raw['scales'])}")
        return self.raw["scales"][scale] or {}

    def requires(self, scale: str) -> list[str]:
        """The experiments whose runs at ``scale`` this one reads: ``scales.<scale>.requires``, else the
        top-level ``requires`` (empty when neither)."""
        spec = self.scale_spec(scale)
        return list(spec["requires"] if "requires" in spec else self.raw.get("requires") or [])

    def seeds(self, scale: str, override: Any = None) -> list[int] | None:
        """The seeds each grid point runs with at ``scale``: ``override`` (e.g. ``solq run --seeds``) when given,
        else ``scales.<scale>.seeds``, else the top-level ``seeds``; None when unseeded (see :func:`parse_seeds`)."""
        spec = self.scale_spec(scale)
        raw = override if override is not None else spec.get("seeds", self.raw.get("seeds"))
        return parse_seeds(raw, where=f"{self.path}: seeds")

    def points(self, scale: str, overrides: dict | None = None, runs_dir: str | Path = "experiments/runs",
               seeds: Any = None) -> list[Point]:
        """The grid points at ``scale``, in grid order (each one's seeds in a row), with resolved parameters.

        ``seeds``: replaces the YAML's (:meth:`seeds`); a seeded grid point becomes one point per seed."""
        spec = self.scale_spec(scale)
        grid = spec.get("grid", self.raw.get("grid"))
        base = {**(self.raw.get("parameters") or {}), **(spec.get("parameters") or {})}
        overrides = dict(overrides or {})
        seed_list = self.seeds(scale, seeds)
        points, seen = [], {}
        for values in expand_grid(grid, where=f"{self.path}: grid"):
            clash = sorted(set(values) & set(overrides))
            if clash:
                raise ValueError(f"{self.path}: cannot override grid parameter(s) {clash}; "
                                 f"select points instead")
            for key in _INJECTED:
                if key in base or key in values:
                    raise ValueError(f"{self.path}: parameter {key!r} is set by the runner; remove it")
            if seed_list is not None and ("seed" in values or "seed" in overrides):
                raise ValueError(f"{self.path}: 'seed' is both a grid value or override and given by seeds "
                                 f"{seed_list}; use one of them")
            slug = point_slug(values)
            for seed in seed_list or [None]:
                params = {**base, **values, **overrides, "scale": scale}
                if seed is not None:
                    params["seed"] = seed
                suffix = "" if seed is None else f"__seed={seed}"
                params = _substitute(params, {"runs_dir": str(Path(runs_dir).resolve()), "scale": scale,
                                              "experiment": self.name, "root": str(self.root),
                                              "seed_suffix": suffix}, self.path)
                name = seeded_name(slug, seed)
                if name in seen:
                    raise ValueError(f"{self.path}: grid points {seen[name]} and {values} share the name {name!r}")
                seen[name] = values
                points.append(Point(name, values, params, seed))
        return points


def parse_seeds(value: Any, where: str = "seeds") -> list[int] | None:
    """Seeds from a YAML list (``[0, 1, 2]``) or a command-line string (``"0,1,2"``): distinct non-negative
    integers in the order given. None or an empty list/string -> None (unseeded). Raises ValueError naming
    ``where`` otherwise."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise ValueError(f"{where}: expected comma-separated integers such as 0,1,2, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ValueError(f"{where}: expected a list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: seeds repeat in {value}")
    return list(value) or None


def seeded_name(slug: str, seed: int | None) -> str:
    """The folder name of grid point ``slug`` run with ``seed``: ``slug__seed=N``; ``slug`` itself when ``seed``
    is None."""
    return slug if seed is None else f"{slug}__seed={seed}"


def split_seed(name: str) -> tuple[str, int | None]:
    """A point folder name -> (its grid point's name, its seed or None): the inverse of :func:`seeded_name`,
    e.g. ``"mode=uqr__seed=2"`` -> ``("mode=uqr", 2)``, ``"mode=uqr"`` -> ``("mode=uqr", None)``; a grid whose
    only factor is ``seed`` gives ``"seed=0"`` -> ``("default", 0)``."""
    m = _SEEDED.match(name)
    if m is None:
        return name, None
    return m.group("group") or "default", int(m.group("seed"))


def _substitute(params: dict, builtins: dict, where: Path) -> dict:
    """Replace ``${name}`` in string values (also inside lists) by builtins or other parameters."""
    mapping = {**{k: v for k, v in params.items() if isinstance(v, (str, int, float))}, **builtins}

    def sub(key: str, v: Any) -> Any:
        if isinstance(v, str) and "$" in v:
            try:
                return string.Template(v).substitute(mapping)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{where}: parameter {key!r}: cannot fill {v!r} ({e}); "
                                 f"available: {sorted('${' + k + '}' for k in mapping)}") from None
        if isinstance(v, list):
            return [sub(key, x) for x in v]
        return v

    return {k: sub(k, v) for k, v in params.items()}


def expand_grid(grid: Any, where: str = "grid") -> list[dict]:
    """``{"a": [1, 2], "b": ["x"]}`` -> the product as a list of dicts (key order kept; a scalar is
    a one-value list); a list of dicts is taken as explicit points; None/empty -> ``[{}]``."""
    if not grid:
        return [{}]
    if isinstance(grid, dict):
        keys = list(grid)
        lists = [v if isinstance(v, list) else [v] for v in grid.values()]
        for k, v in zip(keys, lists):
            if not v:
                raise ValueError(f"{where}.{k}: empty list of values")
        return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]
    if isinstance(grid, list):
        for i, p in enumerate(grid):
            if not isinstance(p, dict):
                raise ValueError(f"{where}[{i}]: expected a mapping of parameter values, got {p!r}")
        return [dict(p) for p in grid]
    raise ValueError(f"{where}: expected a mapping of lists or a list of mappings, got {type(grid).__name__}")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def point_slug(values: dict) -> str:
    """A stable, file-safe name for grid ``values``: ``"key=value__key2=value2"`` ("default" when
    empty); long names are cut and suffixed with a hash of the values."""
    if not values:
        return "default"
    slug = "__".join(f"{k}={_fmt(v)}" for k, v in values.items())
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "-", slug).strip("-")
    if len(slug) > 120:
        digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
        slug = f"{slug[:100]}-{digest}"
    return slug


def load_experiment(path: str | Path, *, require_notebook: bool = True) -> Experiment:
    """Parse and check an experiment YAML; ValueError names the file and the key at fault
    (also when the notebook does not exist, unless ``require_notebook`` is False)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"experiment file {path} does not exist")
    raw = read_yaml_mapping(path, ValueError, "a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(_TOP_KEYS)}")
    if "notebook" not in raw:
        raise ValueError(f"{path}: missing key 'notebook'")
    scales = raw.get("scales")
    if not isinstance(scales, dict) or set(scales) != set(SCALES):
        raise ValueError(f"{path}: 'scales' must define exactly {list(SCALES)}, got "
                         f"{sorted(scales) if isinstance(scales, dict) else scales!r}")
    for s, spec in scales.items():
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"{path}: scales.{s}: expected a mapping")
        bad = sorted(set(spec or {}) - _SCALE_KEYS)
        if bad:
            raise ValueError(f"{path}: scales.{s}: unknown key(s) {bad}; valid keys: {sorted(_SCALE_KEYS)}")
    for s, spec in [(None, raw), *scales.items()]:
        where = f"{path}: " + ("seeds" if s is None else f"scales.{s}.seeds")
        parse_seeds((spec or {}).get("seeds"), where=where)  # raises naming the file and the key
    for key in ("parameters",):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"{path}: {key!r} must be a mapping")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"{path}: name {name!r} must be letters, digits, '_', '.', '-'")
    root = path.parent.parent
    nb = Path(raw["notebook"])
    candidates = [nb] if nb.is_absolute() else [root / nb, path.parent / nb]
    notebook = next((c.resolve() for c in candidates if c.is_file()), None)
    if notebook is None and not require_notebook:
        notebook = candidates[0].resolve()
    if notebook is None:
        raise ValueError(f"{path}: notebook {raw['notebook']!r} not found (looked at "
                         f"{', '.join(str(c) for c in candidates)})")
    return Experiment(name, path, root, notebook, str(raw.get("title", name)), raw)

"""Runs collected and laid out as the paper's tables: ``Run``, ``Table`` (rows of ``Cell``s) and ``build_table``.

``collect_runs(runs_dir)`` reads every ``runs_dir/<experiment>/<scale>/<point>/metrics.json`` into a ``Run``;
``build_table`` lays out the runs of one (experiment, scale) -- scales are never mixed in a table -- and
matches each point to its row of the paper's table (rows with no paper counterpart follow, sorted).
Rendering the tables is :mod:`solq.workbench.table_rendering`; :mod:`solq.workbench.report` ties both together.

The layout of a table is the ``report:`` section of the experiment YAML (``experiments/<name>.yaml``,
else the copy the runner stores in the scale folder); ``scales.<scale>.report`` overrides keys of it::

    report:
      paper_table: table3b_vector_loss_weight   # key in paper_tables.json
      match: {lambda_vec: "{vector_loss_coef}"} # paper column -> our value (format string over metrics)
      labels: {}                                # paper column -> {our value: paper value}
      paper_rows: {}                            # paper column -> allowed values (rows shown)
      columns: [seg, seg_50, seg_75, box, box_50, box_75]
      metrics: {}                               # column -> metric key (default: seg -> segm/AP, box_S -> bbox/APs ...)
      percent: [..]                             # columns shown x100 (default: keys under segm/ bbox/ boundary/)
      factor: {params_mask_M: 1.0e-6}           # column -> multiplier (units)
      plot: {metrics: [seg, box], log_x: false} # or false
      reference: "3.0"                          # row the noise rule compares with (its key values joined by
                                                # " / "); default: the first row with our numbers
    # or  layout: keyed, pattern: '^coding/(?P<codec>[^/]+)/(?P<metric>.+)$', columns: [...]

Without a layout, a table lists every numeric metric of every grid point.

Seeds. The runs of one grid point with different seeds (folders ``<point>__seed=N``) fall into one row (or, in a
table without a layout, one column): each cell is their mean, with the sample std (n - 1) and n when n > 1.
The noise rule (:func:`mark_noise`): in a table with several seeds per row, every cell of our numbers whose
difference from the same column of the reference row is smaller than the larger of the two standard deviations,
|mean - mean_ref| < max(std, std_ref), is marked ``noise`` ("inside the noise"); a cell or reference with one run
(no std) is never marked. A screen, not a significance test: with 3 seeds a difference just above it may still be
chance.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from solq.workbench.experiment_file import split_seed
from solq.workbench.paper import paper_table, same_value

__all__ = ["Run", "Cell", "Row", "Table", "collect_runs", "load_spec", "build_table", "label_sort_key",
           "mark_noise", "row_name", "DEFAULT_METRICS", "PERCENT_PREFIXES", "RESERVED"]

_AP = {"": "AP", "_50": "AP50", "_75": "AP75", "_S": "APs", "_M": "APm", "_L": "APl"}
DEFAULT_METRICS = {f"{s}{suf}": f"{k}/{ap}" for s, k in (("seg", "segm"), ("box", "bbox")) for suf, ap in _AP.items()}
PERCENT_PREFIXES = ("segm/", "bbox/", "boundary/")
RESERVED = {"experiment", "scale", "point", "code_version", "config", "parameters", "seed"}


@dataclass
class Run:
    """One finished point: where it lies, its scalar metrics and the notebook parameters it ran with; ``group``
    is its grid point's name (the folder name without ``__seed=N``) and ``seed`` its seed (None: unseeded)."""

    experiment: str
    scale: str
    point: str
    path: Path
    metrics: dict
    parameters: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return split_seed(self.point)[0]

    @property
    def seed(self) -> int | None:
        return split_seed(self.point)[1]


@dataclass
class Cell:
    """Our number in one table cell: the ``mean`` of ``n`` runs (seeds), their sample ``std`` (None when
    n < 2), and ``noise``: True when its difference from the reference row is inside the noise (module doc)."""

    mean: float | None
    std: float | None = None
    n: int = 0
    noise: bool = False


@dataclass
class Row:
    label: tuple                       # values of the key columns
    paper: dict = field(default_factory=dict)   # column -> paper number (None if not legible)
    ours: dict = field(default_factory=dict)    # column -> Cell
    runs: list = field(default_factory=list)    # point names aggregated here


@dataclass
class Table:
    experiment: str
    scale: str
    title: str
    key_columns: list
    columns: list
    rows: list
    has_paper: bool
    claim: str = ""
    caption: str = ""
    percent: set = field(default_factory=set)
    plot: dict | None = None
    sweep_figure: Path | None = None
    run_figures: list = field(default_factory=list)  # (point, path)
    reference: tuple | None = None  # label of the row the noise rule compared with (None: no rule applied)

    @property
    def seeded(self) -> bool:
        """Whether some cell of ours aggregates several runs (then rows show n and the noise marks)."""
        return any(c.n > 1 for r in self.rows for c in r.ours.values())


def collect_runs(runs_dir: str | Path, scale: str | None = None, problems: list | None = None) -> list[Run]:
    """Every ``<experiment>/<scale>/<point>/metrics.json`` under ``runs_dir`` (only ``scale`` when given).
    Unreadable files and files whose recorded scale or experiment contradicts their folder are skipped
    and described in ``problems``."""
    problems = [] if problems is None else problems
    runs = []
    for path in sorted(Path(runs_dir).glob("*/*/*/metrics.json")):
        point_dir = path.parent
        exp, sc, point = point_dir.parent.parent.name, point_dir.parent.name, point_dir.name
        if scale is not None and sc != scale:
            continue
        if (point_dir / "failed.json").exists():
            problems.append(f"{point_dir}: skipped, the run failed (see failed.json and log.txt)")
            continue
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, OSError) as e:
            problems.append(f"{path}: skipped, unreadable ({e})")
            continue
        bad = [(k, raw[k], want) for k, want in (("scale", sc), ("experiment", exp)) if k in raw and raw[k] != want]
        if bad:
            k, got, want = bad[0]
            problems.append(f"{path}: skipped, records {k}={got!r} but lies under {k} {want!r}")
            continue
        metrics = {k: v for k, v in raw.items() if k not in RESERVED and (v is None or isinstance(v, (int, float, str, bool)))}
        params = raw.get("parameters") if isinstance(raw.get("parameters"), dict) else {}
        runs.append(Run(exp, sc, point, point_dir, metrics, params))
    return runs


def load_spec(experiment: str, scale: str, runs_dir: Path, experiments_dir: Path | None) -> dict:
    """The table layout of ``experiment`` at ``scale``: ``experiments_dir/<experiment>.yaml``, else the runner's
    copy ``runs_dir/<experiment>/<scale>/experiment.yaml`` (``report:`` merged with ``scales.<scale>.report``,
    plus ``title`` and ``claim``); ``{"title": experiment}`` when neither file exists."""
    candidates = [runs_dir / experiment / scale / "experiment.yaml"]
    if experiments_dir is not None:
        candidates.insert(0, Path(experiments_dir) / f"{experiment}.yaml")
    for c in candidates:
        if c.is_file():
            raw = yaml.safe_load(c.read_text()) or {}
            spec = dict(raw.get("report") or {})
            spec.update(((raw.get("scales") or {}).get(scale) or {}).get("report") or {})
            spec.setdefault("title", raw.get("title", experiment))
            spec.setdefault("claim", raw.get("claim", ""))
            return spec
    return {"title": experiment}


def _metric_key(spec: dict, col: str) -> str:
    return (spec.get("metrics") or {}).get(col, DEFAULT_METRICS.get(col, col))


def _value(run: Run, key: str, percent: bool, problems: list) -> float | None:
    v = run.metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    if percent:
        if v > 1.0 + 1e-9:
            problems.append(f"{run.path}/metrics.json: {key}={v} looks like a percent; the convention is a "
                            f"fraction in [0, 1]")
        return 100.0 * v
    return float(v)


def _aggregate(values: list[float]) -> Cell:
    vals = [v for v in values if v is not None]
    if not vals:
        return Cell(None, None, 0)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return Cell(mean, std, len(vals))


def label_sort_key(label: tuple) -> tuple:
    """Sort key of a row label (tuple of key-column values): numbers by value, before other values by text."""
    out = []
    for v in label:
        try:
            out.append((0, float(v), ""))
        except (TypeError, ValueError):
            out.append((1, 0.0, str(v)))
    return tuple(out)


def _key_of(run: Run, spec: dict, problems: list) -> tuple:
    if not spec["match"]:
        return (run.group,)
    labels = {col: {str(k): v for k, v in (m or {}).items()} for col, m in (spec.get("labels") or {}).items()}
    key = []
    for col, template in spec["match"].items():
        try:
            raw = str(template).format_map({**run.parameters, **run.metrics})
        except (KeyError, IndexError, ValueError) as e:
            problems.append(f"{run.path}/metrics.json: lacks {e} needed for the {col!r} column of the layout")
            raw = "?"
        key.append(labels.get(col, {}).get(raw, raw))
    return tuple(key)


def build_table(experiment: str, scale: str, runs: list[Run], spec: dict, problems: list | None = None) -> Table:
    """One table of ``runs`` (all of ``experiment`` at ``scale``) laid out by ``spec`` (see module doc)."""
    problems = [] if problems is None else problems
    assert all(r.experiment == experiment and r.scale == scale for r in runs), "runs of another table"
    common = dict(experiment=experiment, scale=scale, title=str(spec.get("title", experiment)),
                  claim=str(spec.get("claim", "") or "").strip())
    layout = spec.get("layout", "paired" if ("match" in spec or "paper_table" in spec) else "generic")
    if layout == "keyed":
        return _keyed_table(runs, spec, problems, common)
    if layout == "generic":
        return _generic_table(runs, common)
    ptable = paper_table(spec["paper_table"]) if spec.get("paper_table") else None
    spec = {**spec, "match": spec.get("match") or {}}
    numeric = [c for c in (ptable.columns if ptable else []) if c not in spec["match"]]
    columns = list(spec.get("columns") or numeric)
    percent = set(spec["percent"]) if "percent" in spec else {
        c for c in columns if _metric_key(spec, c).startswith(PERCENT_PREFIXES)}
    rows: list[Row] = []
    if ptable is not None:
        for rec in ptable.select(**(spec.get("paper_rows") or {})):
            rows.append(Row(tuple(rec[c] for c in spec["match"]), {c: rec.get(c) for c in columns}))
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(_key_of(run, spec, problems), []).append(run)
    extra = []
    for key, members in groups.items():
        row = next((r for r in rows if all(same_value(a, b) for a, b in zip(r.label, key))), None)
        if row is None:
            row = Row(key)
            extra.append(row)
        row.runs += [m.point for m in members]
        for c in columns:
            unit = float((spec.get("factor") or {}).get(c, 1.0))  # e.g. parameter counts -> millions
            row.ours[c] = _aggregate([None if v is None else v * unit for v in
                                      (_value(m, _metric_key(spec, c), c in percent, problems) for m in members)])
    rows += sorted(extra, key=lambda r: label_sort_key(r.label))
    plot = spec.get("plot", {})
    if plot is not False:
        plot = dict(plot or {})
        plot.setdefault("metrics", [c for c in ("seg", "box") if c in columns] or columns[:2])
    table = Table(key_columns=list(spec["match"]) or ["run"], columns=columns, rows=rows,
                  has_paper=ptable is not None, caption=ptable.caption if ptable else "", percent=percent,
                  plot=plot or None, **common)
    return mark_noise(table, spec.get("reference"), problems)


def row_name(label: tuple) -> str:
    """A row's label as text: its key values joined by " / " ("–" for a missing one)."""
    return " / ".join("–" if v is None else str(v) for v in label)


def mark_noise(table: Table, reference: str | None = None, problems: list | None = None) -> Table:
    """Apply the noise rule (module doc) to ``table`` in place: the reference row is the one whose
    :func:`row_name` is ``reference`` (or, with one key column, whose value equals it as a number), else the first
    row with any of our numbers. Sets ``Cell.noise`` and ``table.reference`` (left None when no cell has n > 1).
    Returns ``table``."""
    ours = [r for r in table.rows if any(c.mean is not None for c in r.ours.values())]
    if not ours or not table.seeded:
        return table
    ref = ours[0]
    if reference is not None:
        hits = [r for r in ours if row_name(r.label) == str(reference)
                or (len(r.label) == 1 and same_value(r.label[0], reference))]
        if hits:
            ref = hits[0]
        elif problems is not None:
            problems.append(f"{table.experiment} [{table.scale}]: reference row {reference!r} has no runs; "
                            f"comparing with {row_name(ref.label)!r}")
    table.reference = ref.label
    for row in ours:
        if row is ref:
            continue
        for col, cell in row.ours.items():
            base = ref.ours.get(col)
            if cell.std is None or base is None or base.std is None or cell.mean is None or base.mean is None:
                continue
            cell.noise = abs(cell.mean - base.mean) < max(cell.std, base.std)
    return table


def _keyed_table(runs: list[Run], spec: dict, problems: list, common: dict) -> Table:
    """Rows from metric keys: ``pattern`` (regex with named groups, one called ``metric``)."""
    pattern = re.compile(spec["pattern"])
    key_cols = [g for g in pattern.groupindex if g != "metric"]
    cells: dict[tuple, dict[str, list]] = {}
    found: list[str] = []
    for run in runs:
        for k in run.metrics:
            m = pattern.match(k)
            if not m:
                continue
            metric = m.group("metric")
            found += [metric] if metric not in found else []
            cells.setdefault(tuple(m.group(g) for g in key_cols), {}).setdefault(metric, []).append((run, k))
    columns = list(spec.get("columns") or found)
    percent = set(spec.get("percent", [c for c in columns if c.startswith(PERCENT_PREFIXES)]))
    rows = []
    for key in sorted(cells, key=label_sort_key):
        row = Row(key)
        for c in columns:
            row.ours[c] = _aggregate([_value(r, k, c in percent, problems) for r, k in cells[key].get(c, [])])
        rows.append(row)
    table = Table(key_columns=key_cols, columns=columns, rows=rows, has_paper=False, percent=percent, **common)
    return mark_noise(table, spec.get("reference"), problems)


def _generic_table(runs: list[Run], common: dict) -> Table:
    """Metrics as rows, grid points as columns (no layout known); the seeds of a grid point share its column.
    No noise rule: its rows are different metrics."""
    keys = sorted({k for r in runs for k, v in r.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    points = list(dict.fromkeys(r.group for r in runs))
    rows = []
    for k in keys:
        row = Row((k,))
        for p in points:
            vals = [r.metrics.get(k) for r in runs if r.group == p]
            row.ours[p] = _aggregate([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) else None for v in vals])
        rows.append(row)
    return Table(key_columns=["metric"], columns=points, rows=rows, has_paper=False, **common)

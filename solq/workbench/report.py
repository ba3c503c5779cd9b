"""Compile runs into the paper's table layouts, beside the paper's numbers: Markdown, LaTeX, HTML.

``build_report(runs_dir, out_dir)`` reads every ``runs_dir/<experiment>/<scale>/<point>/metrics.json``,
builds one table per (experiment, scale) -- scales are never mixed in a table -- and writes
``report.md``, ``report.tex`` and a self-contained ``report.html`` (figures embedded as base64 PNG),
plus ``figures/`` with a plot of each sweep (metric against the factor, ours and the paper's).

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
    # or  layout: keyed, pattern: '^coding/(?P<codec>[^/]+)/(?P<metric>.+)$', columns: [...]

Without a layout, a table lists every numeric metric of every point.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from solq.workbench.paper import paper_table, same_value

__all__ = ["Run", "Table", "collect_runs", "build_table", "build_report", "render_markdown", "render_latex",
           "render_html", "add_report_arguments", "report_from_args", "DEFAULT_METRICS"]

_AP = {"": "AP", "_50": "AP50", "_75": "AP75", "_S": "APs", "_M": "APm", "_L": "APl"}
DEFAULT_METRICS = {f"{s}{suf}": f"{k}/{ap}" for s, k in (("seg", "segm"), ("box", "bbox")) for suf, ap in _AP.items()}
PERCENT_PREFIXES = ("segm/", "bbox/", "boundary/")
RESERVED = {"experiment", "scale", "point", "code_version", "config", "parameters"}
SCALE_NOTES = {
    "smoke": "Smoke scale: tiny models on small data for a CPU budget. Absolute numbers are not comparable with "
             "the paper's COCO numbers; compare the trends across rows.",
    "paper": "Paper scale: COCO 2017 with the paper's recipe.",
}
MAX_FIGURES_PER_RUN = 6


@dataclass
class Run:
    """One finished point: where it lies, its scalar metrics and the notebook parameters it ran with."""

    experiment: str
    scale: str
    point: str
    path: Path
    metrics: dict
    parameters: dict = field(default_factory=dict)


@dataclass
class Cell:
    mean: float | None
    std: float | None = None
    n: int = 0


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


def _load_spec(experiment: str, scale: str, runs_dir: Path, experiments_dir: Path | None) -> dict:
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


def _sort_key(label: tuple) -> tuple:
    out = []
    for v in label:
        try:
            out.append((0, float(v), ""))
        except (TypeError, ValueError):
            out.append((1, 0.0, str(v)))
    return tuple(out)


def _key_of(run: Run, spec: dict, problems: list) -> tuple:
    if not spec["match"]:
        return (run.point,)
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
    rows += sorted(extra, key=lambda r: _sort_key(r.label))
    plot = spec.get("plot", {})
    if plot is not False:
        plot = dict(plot or {})
        plot.setdefault("metrics", [c for c in ("seg", "box") if c in columns] or columns[:2])
    return Table(key_columns=list(spec["match"]) or ["run"], columns=columns, rows=rows,
                 has_paper=ptable is not None, caption=ptable.caption if ptable else "", percent=percent,
                 plot=plot or None, **common)


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
    for key in sorted(cells, key=_sort_key):
        row = Row(key)
        for c in columns:
            row.ours[c] = _aggregate([_value(r, k, c in percent, problems) for r, k in cells[key].get(c, [])])
        rows.append(row)
    return Table(key_columns=key_cols, columns=columns, rows=rows, has_paper=False, percent=percent, **common)


def _generic_table(runs: list[Run], common: dict) -> Table:
    """Metrics as rows, points as columns (no layout known)."""
    keys = sorted({k for r in runs for k, v in r.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    points = [r.point for r in runs]
    rows = []
    for k in keys:
        row = Row((k,))
        for r in runs:
            v = r.metrics.get(k)
            row.ours[r.point] = Cell(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None, n=1)
        rows.append(row)
    return Table(key_columns=["metric"], columns=points, rows=rows, has_paper=False, **common)


# ----------------------------------------------------------------------------------------------- rendering
def _num(v: Any, percent: bool) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.1f}" if percent else f"{v:.4g}"
    return str(v)


def _ours(cell: Cell | None, percent: bool) -> str:
    if cell is None or cell.mean is None:
        return "–"
    text = _num(cell.mean, percent)
    return f"{text} ± {_num(cell.std, percent)}" if cell.std is not None else text


def _header(t: Table) -> list[tuple[str, str]]:
    """(column, which) pairs: which is 'paper' or 'ours' (or '' without paper numbers)."""
    return [(c, w) for c in t.columns for w in (("paper", "ours") if t.has_paper else ("",))]


def _cells(t: Table, row: Row) -> list[str]:
    out = [_num(v, False) if v is not None else "–" for v in row.label]
    for c, which in _header(t):
        out.append(_num(row.paper.get(c), c in t.percent) if which == "paper" else _ours(row.ours.get(c), c in t.percent))
    return out


def _heading(t: Table) -> str:
    return f"{t.title} — scale `{t.scale}`"


def render_markdown(tables: list[Table], out_dir: Path, problems: list, runs_dir: Path) -> str:
    lines = ["# solq reproduction report", "",
             f"Compiled {datetime.now():%Y-%m-%d %H:%M} from `{runs_dir}`. AP values in percent (COCO AP × 100), "
             "as in the paper. *paper*: the paper's number; *ours*: mean (± std when several runs) of our runs; "
             "– : not available.", ""]
    for scale in _scales(tables):
        lines += [f"## Scale `{scale}`", "", SCALE_NOTES.get(scale, ""), ""]
        for t in (t for t in tables if t.scale == scale):
            lines += [f"### {_heading(t)}", ""]
            if t.claim:
                lines += [f"> {t.claim}", ""]
            head = t.key_columns + [f"{c} {w}".strip() for c, w in _header(t)]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_cells(t, r)) + " |" for r in t.rows]
            if t.caption:
                lines += ["", f"*Paper:* {t.caption}"]
            if t.sweep_figure:
                lines += ["", f"![{t.experiment} {scale}]({t.sweep_figure.relative_to(out_dir).as_posix()})"]
            for point, fig in t.run_figures:
                lines += ["", f"![{point}: {fig.name}]({_rel(fig, out_dir)})"]
            lines.append("")
    if not tables:
        lines += [f"No runs found under `{runs_dir}`. Run e.g. `solq run experiments/table3b_vector_loss_weight.yaml "
                  "--scale smoke` first.", ""]
    if problems:
        lines += ["## Problems", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)


def _rel(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path, start)).as_posix()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$", "–": "--", "—": "---",
        "λ": r"$\lambda$", "×": r"$\times$"}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX))


def _tex(s: Any) -> str:
    return _TEX_RE.sub(lambda m: _TEX[m.group(0)], str(s))  # one pass, so replacements are not re-escaped


def render_latex(tables: list[Table], out_dir: Path) -> str:
    lines = [r"\documentclass{article}", r"\usepackage{booktabs}", r"\usepackage{graphicx}",
             r"\usepackage[margin=2cm]{geometry}", r"\begin{document}", r"\section*{solq reproduction report}",
             "AP values in percent. paper: the paper's number; ours: mean ($\\pm$ std) of our runs."]
    for scale in _scales(tables):
        lines += [rf"\subsection*{{Scale {_tex(scale)}}}", _tex(SCALE_NOTES.get(scale, ""))]
        for t in (t for t in tables if t.scale == scale):
            nk = len(t.key_columns)
            per = 2 if t.has_paper else 1
            lines += [r"\begin{table}[ht]", r"\centering\small", rf"\caption{{{_tex(_heading(t))}}}",
                      r"\begin{tabular}{" + "l" * nk + "r" * (per * len(t.columns)) + "}", r"\toprule"]
            if t.has_paper:
                lines.append(" & ".join([""] * nk + [rf"\multicolumn{{2}}{{c}}{{{_tex(c)}}}" for c in t.columns]) + r" \\")
                lines.append(" ".join(rf"\cmidrule(lr){{{nk + 1 + 2 * i}-{nk + 2 + 2 * i}}}" for i in range(len(t.columns))))
                lines.append(" & ".join([_tex(k) for k in t.key_columns] + ["paper", "ours"] * len(t.columns)) + r" \\")
            else:
                lines.append(" & ".join(_tex(k) for k in t.key_columns + t.columns) + r" \\")
            lines.append(r"\midrule")
            lines += [" & ".join(_tex(c) for c in _cells(t, r)) + r" \\" for r in t.rows]
            lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
            if t.sweep_figure:
                lines += [r"\begin{figure}[ht]\centering",
                          rf"\includegraphics[width=\linewidth]{{{t.sweep_figure.relative_to(out_dir).as_posix()}}}",
                          rf"\caption{{{_tex(t.title)} ({_tex(scale)}): ours and the paper's}}", r"\end{figure}"]
    lines.append(r"\end{document}")
    return "\n".join(lines) + "\n"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(tables: list[Table], problems: list, runs_dir: Path) -> str:
    e = html.escape
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "td.k,th.k{text-align:left}.paper{background:#f0f0f0;color:#555}img{max-width:100%}"
           ".note{color:#666}blockquote{color:#333;border-left:3px solid #ccc;margin-left:0;padding-left:1em}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>solq report</title><style>{css}</style></head><body>",
           "<h1>solq reproduction report</h1>",
           f"<p class='note'>Compiled {datetime.now():%Y-%m-%d %H:%M} from {e(str(runs_dir))}. AP in percent. "
           "<span class='paper'>paper</span>: the paper's number; ours: mean (± std) of our runs.</p>"]
    for scale in _scales(tables):
        out += [f"<h2>Scale <code>{e(scale)}</code></h2>", f"<p class='note'>{e(SCALE_NOTES.get(scale, ''))}</p>"]
        for t in (t for t in tables if t.scale == scale):
            out.append(f"<h3>{e(_heading(t))}</h3>")
            if t.claim:
                out.append(f"<blockquote>{e(t.claim)}</blockquote>")
            out.append(f"<table data-experiment='{e(t.experiment)}' data-scale='{e(scale)}'>")
            keys = "".join(f"<th class='k' rowspan='{2 if t.has_paper else 1}'>{e(k)}</th>" for k in t.key_columns)
            if t.has_paper:
                out.append("<tr>" + keys + "".join(f"<th colspan='2'>{e(c)}</th>" for c in t.columns) + "</tr>")
                out.append("<tr>" + "<th class='paper'>paper</th><th>ours</th>" * len(t.columns) + "</tr>")
            else:
                out.append("<tr>" + keys + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>")
            for r in t.rows:
                cells = _cells(t, r)
                nk = len(t.key_columns)
                tds = [f"<td class='k'>{e(c)}</td>" for c in cells[:nk]]
                tds += [f"<td class='{w}'>{e(c)}</td>" for c, (_, w) in zip(cells[nk:], _header(t))]
                out.append("<tr>" + "".join(tds) + "</tr>")
            out.append("</table>")
            if t.caption:
                out.append(f"<p class='note'>Paper: {e(t.caption)}</p>")
            if t.sweep_figure:
                out.append(_img(t.sweep_figure, f"{t.experiment} {scale}"))
            for point, fig in t.run_figures:
                out.append(f"<figure>{_img(fig, point)}<figcaption>{e(point)}: {e(fig.name)}</figcaption></figure>")
    if not tables:
        out.append(f"<p>No runs found under {e(str(runs_dir))}.</p>")
    if problems:
        out += ["<h2>Problems</h2><ul>"] + [f"<li>{e(p)}</li>" for p in problems] + ["</ul>"]
    out.append("</body></html>")
    return "\n".join(out)


def _scales(tables: list[Table]) -> list[str]:
    order = {"smoke": 0, "paper": 1}
    return sorted({t.scale for t in tables}, key=lambda s: (order.get(s, 2), s))


# ----------------------------------------------------------------------------------------------- plotting
def plot_sweep(t: Table, path: Path) -> Path | None:
    """Plot each of ``t.plot['metrics']`` against the row key: lines for a numeric factor, bars
    otherwise; ours and the paper's (on a second axis unless at paper scale). Returns the PNG path."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    cols = [c for c in (t.plot or {}).get("metrics", []) if c in t.columns]
    rows = [r for r in t.rows if any(r.ours.get(c) and r.ours[c].mean is not None for c in cols)]
    if not cols or not rows:
        return None
    labels = [" / ".join("–" if v is None else str(v) for v in r.label) for r in t.rows]
    numeric = len(t.key_columns) == 1 and all(_sort_key(r.label)[0][0] == 0 for r in t.rows if r.label[0] is not None)
    fig = Figure(figsize=(4.5 * len(cols), 3.4))
    axes = fig.subplots(1, len(cols), squeeze=False)
    for ax, c in zip(axes[0], cols):
        pax = ax if t.scale == "paper" else ax.twinx()
        if numeric:
            pts = [(float(r.label[0]), r.ours.get(c)) for r in t.rows if r.label[0] is not None]
            ours = sorted((x, cell) for x, cell in pts if cell and cell.mean is not None)
            ax.errorbar([x for x, _ in ours], [cell.mean for _, cell in ours],
                        yerr=[cell.std or 0 for _, cell in ours], marker="o", color="C0", label="ours")
            paper = sorted((float(r.label[0]), r.paper.get(c)) for r in t.rows
                           if r.label[0] is not None and r.paper.get(c) is not None)
            if paper:
                pax.plot(*zip(*paper), marker="s", ls="--", color="0.45", label="paper")
            if (t.plot or {}).get("log_x"):
                ax.set_xscale("log")
        else:
            xs = range(len(t.rows))
            ax.bar([x - 0.2 for x in xs], [(r.ours.get(c) or Cell(None)).mean or 0 for r in t.rows], 0.4,
                   color="C0", label="ours")
            pv = [(x, r.paper.get(c)) for x, r in zip(xs, t.rows) if r.paper.get(c) is not None]
            if pv:
                pax.bar([x + 0.2 for x, _ in pv], [v for _, v in pv], 0.4, color="0.7", label="paper")
            ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(c)
        ax.set_xlabel(" / ".join(t.key_columns))
        ax.set_ylabel(f"ours [{t.scale}]" + (" (%)" if c in t.percent else ""), color="C0")
        if pax is not ax:
            pax.set_ylabel("paper (COCO)", color="0.45")
        handles = ax.get_legend_handles_labels()
        more = pax.get_legend_handles_labels() if pax is not ax else ([], [])
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="best")
    fig.suptitle(f"{t.title} [{t.scale}]", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


# ----------------------------------------------------------------------------------------------- entry points
def build_report(runs_dir: str | Path, out_dir: str | Path, *, scale: str | None = None,
                 experiments_dir: str | Path | None = None) -> dict:
    """Compile every run under ``runs_dir`` (only ``scale`` when given) into ``out_dir``.

    Layouts come from ``experiments_dir/<experiment>.yaml`` (default: the folder holding
    ``runs_dir``) or the runner's copy in the scale folder. Returns ``{"markdown": report.md,
    "latex": report.tex, "html": report.html, "figures": [sweep PNGs]}`` (paths).
    """
    runs_dir, out_dir = Path(runs_dir).resolve(), Path(out_dir).resolve()
    experiments_dir = Path(experiments_dir) if experiments_dir is not None else runs_dir.parent
    problems: list[str] = []
    runs = collect_runs(runs_dir, scale, problems)
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.experiment, r.scale), []).append(r)
    tables = []
    for exp, sc in sorted(groups, key=lambda k: (not k[0].startswith("table"), k[0], k[1])):
        spec = _load_spec(exp, sc, runs_dir, experiments_dir)
        try:
            t = build_table(exp, sc, groups[(exp, sc)], spec, problems)
        except (KeyError, ValueError, re.error) as e:
            problems.append(f"{exp} [{sc}]: layout error ({e}); showing all metrics instead")
            t = build_table(exp, sc, groups[(exp, sc)], {"title": spec.get("title", exp), "layout": "generic"})
        if t.plot:
            t.sweep_figure = plot_sweep(t, out_dir / "figures" / f"{exp}__{sc}.png")
        for r in groups[(exp, sc)]:
            t.run_figures += [(r.point, f) for f in sorted(r.path.rglob("*.png"))[:MAX_FIGURES_PER_RUN]]
        tables.append(t)
    problems[:] = dict.fromkeys(problems)  # once each, in order
    for p in problems:
        warnings.warn(p, stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "latex": out_dir / "report.tex", "html": out_dir / "report.html"}
    paths["markdown"].write_text(render_markdown(tables, out_dir, problems, runs_dir))
    paths["latex"].write_text(render_latex(tables, out_dir))
    paths["html"].write_text(render_html(tables, problems, runs_dir))
    return {**paths, "figures": [t.sweep_figure for t in tables if t.sweep_figure]}


def add_report_arguments(parser) -> None:
    """Options of ``solq report`` (argparse)."""
    parser.add_argument("--runs-dir", type=Path, default=Path("experiments/runs"),
                        help="folder of runs: RUNS/<experiment>/<scale>/<point>/metrics.json (default experiments/runs)")
    parser.add_argument("--out", type=Path, default=Path("experiments/report"),
                        help="where report.md, report.tex, report.html and figures/ go (default experiments/report)")
    parser.add_argument("--scale", choices=("smoke", "paper"), default=None,
                        help="only this scale (default: every scale, each in its own tables)")
    parser.add_argument("--experiments-dir", type=Path, default=None,
                        help="folder of the experiment YAMLs with the table layouts (default: parent of --runs-dir)")


def report_from_args(args) -> int:
    """Run ``solq report`` from parsed arguments; prints the written paths. Returns 0."""
    paths = build_report(args.runs_dir, args.out, scale=args.scale, experiments_dir=args.experiments_dir)
    for key in ("markdown", "latex", "html"):
        print(f"{key}: {paths[key]}")
    return 0

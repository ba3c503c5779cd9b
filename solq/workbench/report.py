"""Compile runs into the paper's table layouts, beside the paper's numbers: Markdown, LaTeX, HTML.

``build_report(runs_dir, out_dir)`` reads every ``runs_dir/<experiment>/<scale>/<point>/metrics.json``,
builds one table per (experiment, scale) -- scales are never mixed in a table -- and writes
``report.md``, ``report.tex`` and a self-contained ``report.html`` (figures embedded as base64 PNG),
plus ``figures/`` with a plot of each sweep (metric against the factor, ours and the paper's).
``add_report_arguments`` / ``report_from_args`` are the ``solq report`` command.

This module is the public entry point: collecting runs and building tables live in
:mod:`solq.workbench.run_tables` (which documents the ``report:`` layout of an experiment YAML),
rendering and plots in :mod:`solq.workbench.table_rendering`; the names in ``__all__`` are re-exported here.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from solq.files import check_writable, write_text_atomic
from solq.workbench.run_tables import DEFAULT_METRICS, Run, Table, build_table, collect_runs, load_spec
from solq.workbench.table_rendering import plot_sweep, render_html, render_latex, render_markdown

__all__ = ["Run", "Table", "collect_runs", "build_table", "build_report", "render_markdown", "render_latex",
           "render_html", "add_report_arguments", "report_from_args", "DEFAULT_METRICS"]

MAX_FIGURES_PER_RUN = 6


def build_report(runs_dir: str | Path, out_dir: str | Path, *, scale: str | None = None,
                 experiments_dir: str | Path | None = None) -> dict:
    """Compile every run under ``runs_dir`` (only ``scale`` when given) into ``out_dir``.

    Layouts come from ``experiments_dir/<experiment>.yaml`` (default: the folder holding
    ``runs_dir``) or the runner's copy in the scale folder. Returns ``{"markdown": report.md,
    "latex": report.tex, "html": report.html, "figures": [sweep PNGs]}`` (paths). Each file is written
    atomically; an unwritable ``out_dir`` (checked first) or a failed write raises
    :class:`solq.files.OutputWriteError` naming the file and the cause, leaving any previous file as it was.
    """
    runs_dir, out_dir = Path(runs_dir).resolve(), Path(out_dir).resolve()
    check_writable(out_dir, what="report folder")  # before any work
    experiments_dir = Path(experiments_dir) if experiments_dir is not None else runs_dir.parent
    problems: list[str] = []
    runs = collect_runs(runs_dir, scale, problems)
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.experiment, r.scale), []).append(r)
    tables = []
    for exp, sc in sorted(groups, key=lambda k: (not k[0].startswith("table"), k[0], k[1])):
        spec = load_spec(exp, sc, runs_dir, experiments_dir)
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
    paths = {"markdown": out_dir / "report.md", "latex": out_dir / "report.tex", "html": out_dir / "report.html"}
    write_text_atomic(paths["markdown"], render_markdown(tables, out_dir, problems, runs_dir), what="report")
    write_text_atomic(paths["latex"], render_latex(tables, out_dir), what="report")
    write_text_atomic(paths["html"], render_html(tables, problems, runs_dir), what="report")
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

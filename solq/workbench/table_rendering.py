"""Tables of runs rendered for reading: Markdown, LaTeX and self-contained HTML documents, and sweep plots.

``render_markdown``, ``render_latex`` and ``render_html`` turn a list of :class:`~solq.workbench.run_tables.Table`
into one document each (tables grouped by scale, the paper's number beside ours); ``plot_sweep`` draws one
table's metrics against its factor as a PNG (with ± std error bars where a row has several seeds). A table with
seeds gets a column ``n`` (runs per row: the largest n of its cells), ``≈`` after each of our numbers inside the
noise of the reference row, and a note naming that row and the rule (``solq.workbench.run_tables``); a table of
single runs renders as before. :func:`solq.workbench.report.build_report` writes them to disk.
"""
from __future__ import annotations

import base64
import html
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from solq.files import write_atomic
from solq.workbench.run_tables import Cell, Row, Table, label_sort_key, row_name

__all__ = ["render_markdown", "render_latex", "render_html", "plot_sweep", "noise_note", "SCALE_NOTES", "NOISE_MARK"]

NOISE_MARK = "≈"

SCALE_NOTES = {
    "smoke": "Smoke scale: tiny models on small data for a CPU budget. Absolute numbers are not comparable with "
             "the paper's COCO numbers; compare the trends across rows.",
    "paper": "Paper scale: COCO 2017 with the paper's recipe.",
}


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
    text = f"{text} ± {_num(cell.std, percent)}" if cell.std is not None else text
    return f"{text} {NOISE_MARK}" if cell.noise else text


def _key_header(t: Table) -> list[str]:
    """The label columns: the key columns, then ``n`` (runs per row) in a table with seeds."""
    return t.key_columns + (["n"] if t.seeded else [])


def noise_note(t: Table) -> str:
    """The sentence under a table with seeds: what ``n``, ± and ≈ mean and which row ≈ compares with ("" for a
    table of single runs)."""
    if not t.seeded:
        return ""
    text = "n: runs (seeds) per row; ours: mean ± sample std over them."
    if t.reference is not None:
        text += (f" {NOISE_MARK}: inside the noise of the reference row {row_name(t.reference)!r}: |mean − its mean| "
                 f"< the larger of the two stds (a screen, not a significance test).")
    return text


def _header(t: Table) -> list[tuple[str, str]]:
    """(column, which) pairs: which is 'paper' or 'ours' (or '' without paper numbers)."""
    return [(c, w) for c in t.columns for w in (("paper", "ours") if t.has_paper else ("",))]


def _cells(t: Table, row: Row) -> list[str]:
    out = [_num(v, False) if v is not None else "–" for v in row.label]
    if t.seeded:
        out.append(str(max((c.n for c in row.ours.values()), default=0) or "–"))
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
            head = _key_header(t) + [f"{c} {w}".strip() for c, w in _header(t)]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_cells(t, r)) + " |" for r in t.rows]
            if noise_note(t):
                lines += ["", f"*{noise_note(t)}*"]
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
        "λ": r"$\lambda$", "×": r"$\times$", "≈": r"$\approx$", "−": "$-$", "|": r"$|$", "<": r"$<$"}
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
            keys = _key_header(t)
            nk = len(keys)
            per = 2 if t.has_paper else 1
            lines += [r"\begin{table}[ht]", r"\centering\small", rf"\caption{{{_tex(_heading(t))}}}",
                      r"\begin{tabular}{" + "l" * nk + "r" * (per * len(t.columns)) + "}", r"\toprule"]
            if t.has_paper:
                lines.append(" & ".join([""] * nk + [rf"\multicolumn{{2}}{{c}}{{{_tex(c)}}}" for c in t.columns]) + r" \\")
                lines.append(" ".join(rf"\cmidrule(lr){{{nk + 1 + 2 * i}-{nk + 2 + 2 * i}}}" for i in range(len(t.columns))))
                lines.append(" & ".join([_tex(k) for k in keys] + ["paper", "ours"] * len(t.columns)) + r" \\")
            else:
                lines.append(" & ".join(_tex(k) for k in keys + t.columns) + r" \\")
            lines.append(r"\midrule")
            lines += [" & ".join(_tex(c) for c in _cells(t, r)) + r" \\" for r in t.rows]
            lines += [r"\bottomrule", r"\end{tabular}"]
            if noise_note(t):
                lines.append(r"\par\footnotesize " + _tex(noise_note(t)))
            lines.append(r"\end{table}")
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
            keys = "".join(f"<th class='k' rowspan='{2 if t.has_paper else 1}'>{e(k)}</th>" for k in _key_header(t))
            if t.has_paper:
                out.append("<tr>" + keys + "".join(f"<th colspan='2'>{e(c)}</th>" for c in t.columns) + "</tr>")
                out.append("<tr>" + "<th class='paper'>paper</th><th>ours</th>" * len(t.columns) + "</tr>")
            else:
                out.append("<tr>" + keys + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>")
            for r in t.rows:
                cells = _cells(t, r)
                nk = len(_key_header(t))
                tds = [f"<td class='k'>{e(c)}</td>" for c in cells[:nk]]
                tds += [f"<td class='{w}'>{e(c)}</td>" for c, (_, w) in zip(cells[nk:], _header(t))]
                out.append("<tr>" + "".join(tds) + "</tr>")
            out.append("</table>")
            if noise_note(t):
                out.append(f"<p class='note'>{e(noise_note(t))}</p>")
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
    numeric = len(t.key_columns) == 1 and all(label_sort_key(r.label)[0][0] == 0
                                              for r in t.rows if r.label[0] is not None)
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
            cells = [r.ours.get(c) or Cell(None) for r in t.rows]
            ax.bar([x - 0.2 for x in xs], [cell.mean or 0 for cell in cells], 0.4, color="C0", label="ours",
                   yerr=[cell.std or 0 for cell in cells] if any(cell.std for cell in cells) else None, capsize=3)
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
    write_atomic(path, lambda f: fig.savefig(f, dpi=90, format="png"), what="report figure")
    return path

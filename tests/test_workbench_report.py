"""The report compiler on fabricated runs: the paper's layouts, our numbers in the right cells beside the
paper's, scales in separate tables, the three output formats; and results.ipynb through papermill."""
import json
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from solq.workbench.paper import load_paper_tables, paper_table, same_value
from solq.workbench.report import build_report, build_table, collect_runs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
B = "table3b_vector_loss_weight"
T2 = "table2_uqr_vs_sqr"


def _run(runs, exp, scale, point, metrics, png=False):
    d = runs / exp / scale / point
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    if png:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2, 2))
        fig.subplots().plot([0, 1], [1, 0])
        fig.savefig(d / "gallery.png")


def _ap(seg, box):
    """Fabricated COCO metrics (fractions) for a segm AP and a box AP."""
    return {"segm/AP": seg, "segm/AP50": seg + 0.2, "segm/AP75": seg - 0.01,
            "bbox/AP": box, "bbox/AP50": box + 0.2, "bbox/AP75": box + 0.01, "bbox/APs": box / 2}


def _make_runs(runs):
    for i, lam in enumerate([0.3, 3.0, 4]):
        _run(runs, B, "smoke", f"vector_loss_coef={lam}", {"vector_loss_coef": lam, **_ap(0.10 + i / 100, 0.20)})
    # two seeds of the same point collapse into one row: mean and std
    _run(runs, B, "smoke", "vector_loss_coef=2.0__seed=1", {"vector_loss_coef": 2.0, **_ap(0.04, 0.2)})
    _run(runs, B, "smoke", "vector_loss_coef=2.0__seed=2", {"vector_loss_coef": 2.0, **_ap(0.06, 0.2)})
    _run(runs, B, "smoke", "vector_loss_coef=9", {"vector_loss_coef": 9, **_ap(0.5, 0.5)})  # not in the paper
    _run(runs, B, "paper", "vector_loss_coef=3.0", {"vector_loss_coef": 3.0, **_ap(0.301, 0.405)})
    for mode, seg in (("det", None), ("sqr", 0.05), ("uqr", 0.09)):
        m = {"mode": mode, **_ap(seg or 0, 0.3), "parameters": {"mode": mode, "backbone": "resnet18"}}
        if seg is None:
            m = {k: v for k, v in m.items() if not k.startswith("segm/")}
        _run(runs, T2, "smoke", f"mode={mode}", m, png=mode == "uqr")
    _run(runs, T2, "paper", "mode=uqr__backbone=resnet101", {"mode": "uqr", "backbone": "resnet101", **_ap(0.41, 0.49)})
    _run(runs, "fig6_failure_cases", "smoke", "default", {"failures/merged": 3, "failures/missed": 5}, png=True)
    _run(runs, "mask_coding_upper_bound", "smoke", "default",
         {"coding/dct/N128/k256/miou": 0.93, "coding/dct/N64/k256/miou": 0.91, "coding/pca/N28/k60/miou": 0.8,
          "coding/dct/N128/k256/segm/AP": 0.85})
    return runs


@pytest.fixture()
def runs(tmp_path):
    return _make_runs(tmp_path / "runs")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Fabricated runs of both scales and the report compiled from them (shared: compiling plots is slow)."""
    tmp = tmp_path_factory.mktemp("report")
    runs = _make_runs(tmp / "runs")
    return runs, build_report(runs, tmp / "out", experiments_dir=EXPERIMENTS)


class _Tables(HTMLParser):
    """Collects each <table>'s data attributes and its rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append((dict(attrs), []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append(self._cell)
            self._cell = None


def _html_table(html, exp, scale):
    p = _Tables()
    p.feed(html)
    found = [rows for attrs, rows in p.tables if attrs == {"data-experiment": exp, "data-scale": scale}]
    assert len(found) == 1, f"expected one table for {exp} [{scale}]"
    return found[0]


def _md_rows(md, exp_title, scale):
    """Rows (lists of cells) of the Markdown table under the heading of ``exp_title`` at ``scale``."""
    lines = md.splitlines()
    start = lines.index(f"### {exp_title} — scale `{scale}`")
    table = []
    for line in lines[start + 1:]:
        if line.startswith("### ") or line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            table.append([c.strip() for c in line.strip("|").split("|")])
    return table


def test_table3b_layout_numbers_and_scales(built):
    paths = built[1]
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    title = "Table 3b: mask vector loss weight λ_vec"
    smoke = _md_rows(md, title, "smoke")
    header, body = smoke[0], {r[0]: r[:1] + r[2:] for r in smoke[1:]}  # without n (runs per row): below
    # a row of two seeds makes the table a seeded one: a column n after the key
    assert header == ["lambda_vec", "n"] + [f"{c} {w}" for c in ["seg", "seg_50", "seg_75", "box", "box_50", "box_75"]
                                            for w in ("paper", "ours")]
    assert {r[0]: r[1] for r in smoke[1:]} == {"0.3": "1", "0.7": "–", "1": "–", "2": "2", "3": "1", "4": "1", "9": "1"}
    paper = {row[0]: row for row in paper_table(B).rows}
    # every paper row, in the paper's order, then ours without a paper row
    assert list(body) == ["0.3", "0.7", "1", "2", "3", "4", "9"]
    for lam, ours_seg in (("0.3", 10.0), ("3", 11.0), ("4", 12.0)):
        row = body[lam]
        assert row[1] == f"{paper[float(lam)][1]:.1f}"          # seg paper
        assert row[2] == f"{ours_seg:.1f}"                      # seg ours: fraction shown as percent
        assert row[3] == f"{paper[float(lam)][2]:.1f}" and row[4] == f"{ours_seg + 20:.1f}"  # seg_50
        assert row[8] == "20.0" and row[7] == f"{paper[float(lam)][4]:.1f}"                   # box
    assert body["2"][2] == "5.0 ± 1.4"                # two runs: mean ± std
    assert body["0.7"][2] == "–" and body["0.7"][1] == "26.7"  # paper only
    assert body["9"][1] == "–" and body["9"][2] == "50.0"      # ours only
    # the paper-scale table holds only the paper-scale run
    big = {r[0]: r for r in _md_rows(md, title, "paper")[1:]}
    assert big["3"][2] == "30.1" and big["3"][8] == "40.5"
    assert all(r[2] == "–" for k, r in big.items() if k != "3")
    assert "10.0" not in [c for r in big.values() for c in r[2::2]]
    # HTML: same cells, two header rows (column, then paper/ours), scales in separate tables
    rows = _html_table(html, B, "smoke")
    assert rows[0][:4] == ["lambda_vec", "n", "seg", "seg_50"] and rows[1][:2] == ["paper", "ours"]
    html_body = {r[0]: r[:1] + r[2:] for r in rows[2:]}
    assert html_body["3"][1:3] == ["29.7", "11.0"] and html_body["2"][2] == "5.0 ± 1.4"
    assert {r[0] for r in _html_table(html, B, "paper")[2:]} == set(big)
    # LaTeX: a tabular with paired columns
    tex = paths["latex"].read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 6
    assert r"\multicolumn{2}{c}{seg\_50}" in tex and "3 & 1 & 29.7 & 11.0 & 53.5 & 31.0" in tex
    assert r"5.0 $\pm$ 1.4" in tex and tex.strip().endswith(r"\end{document}")


def test_sweep_plots_and_embedded_figures(built):
    paths = built[1]
    names = {p.name for p in paths["figures"]}
    assert {f"{B}__smoke.png", f"{B}__paper.png", f"{T2}__smoke.png"} <= names
    for p in paths["figures"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    p = _Tables()
    p.feed(html)
    # sweep plots + the runs' own figures (uqr gallery, failure gallery), all inline
    assert len(p.imgs) >= len(paths["figures"]) + 2
    assert all(src.startswith("data:image/png;base64,") for src in p.imgs)
    assert "src=\"figures/" not in html and "<img" in html
    md = paths["markdown"].read_text()
    assert f"![{B} smoke](figures/{B}__smoke.png)" in md


def test_table2_smoke_against_r50_rows_and_paper_scale(built):
    paths = built[1]
    md = paths["markdown"].read_text()
    smoke = _md_rows(md, "Table 2: UQR vs SQR", "smoke")
    assert smoke[0][:3] == ["method", "seg paper", "seg ours"]
    body = {r[0]: r for r in smoke[1:]}
    assert body["D-DETR*+UQR"][1:5] == ["40.1", "9.0", "47.8", "30.0"]  # the val figure, not the printed 39.5
    assert body["D-DETR*+SQR"][1:3] == ["32.2", "5.0"] and body["D-DETR*"][1:3] == ["–", "–"]
    assert "Faster RCNN" in body and body["Faster RCNN"][4] == "–"  # paper context rows
    big = _md_rows(md, "Table 2: UQR vs SQR", "paper")
    assert big[0][:2] == ["method", "backbone"]
    ours = [r for r in big[1:] if r[3] != "–"]
    assert [r[:4] for r in ours] == [["D-DETR*+UQR", "R101", "40.2", "41.0"]]


def test_other_layouts_scale_filter_and_problems(runs, tmp_path):
    # a metrics file whose recorded scale contradicts its folder is refused, and named
    _run(runs, B, "smoke", "moved", {"vector_loss_coef": 1, "scale": "paper", **_ap(0.9, 0.9)})
    # a failed run (its notebook may have written metrics before crashing) is left out, and named
    _run(runs, B, "smoke", "crashed", {"vector_loss_coef": 0.7, **_ap(0.77, 0.77)})
    (runs / B / "smoke" / "crashed" / "failed.json").write_text("{}")
    # AP written as percent instead of a fraction is flagged
    _run(runs, "table3c_vector_loss_stages", "paper", "vector_loss_stages=6",
         {"vector_loss_stages": 6, **_ap(32.0, 41.0)})
    with pytest.warns(UserWarning):
        paths = build_report(runs, tmp_path / "out", scale="smoke", experiments_dir=EXPERIMENTS)
    md = paths["markdown"].read_text()
    assert "Scale `paper`" not in md and "Scale `smoke`" in md
    assert "moved/metrics.json: skipped, records scale='paper'" in md
    assert "90.0" not in md and "77.0" not in md
    assert "crashed: skipped, the run failed" in md
    fig6 = {r[0]: r[1:] for r in _md_rows(md, "Figure 6: failure cases", "smoke")}
    assert fig6["metric"] == ["default"] and fig6["failures/missed"] == ["5"]
    coding = _md_rows(md, "Mask coding upper bound (Tables 3a/3d/3e without training)", "smoke")
    assert coding[0][:4] == ["codec", "N", "n_k", "miou"]
    assert coding[1][:5] == ["dct", "64", "256", "91.0", "–"] and coding[2][:5] == ["dct", "128", "256", "93.0", "85.0"]
    with pytest.warns(UserWarning, match="looks like a percent"):
        build_report(runs, tmp_path / "out2", scale="paper", experiments_dir=EXPERIMENTS)
    # no runs: a report that says so
    paths = build_report(tmp_path / "empty", tmp_path / "out3")
    assert "No runs found" in paths["markdown"].read_text()


def test_layout_from_runner_copy_and_generic_fallback(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "custom", "smoke", "k=1", {"k": 1, "segm/AP": 0.25})
    _run(runs, "custom", "smoke", "k=2", {"k": 2, "segm/AP": 0.35})
    (runs / "custom" / "smoke" / "experiment.yaml").write_text(
        "title: Custom sweep\nreport:\n  match: {k: '{k}'}\n  columns: [seg]\n")
    [r1, r2] = collect_runs(runs)
    t = build_table("custom", "smoke", [r1, r2], {"match": {"k": "{k}"}, "columns": ["seg"]})
    assert [(r.label, r.ours["seg"].mean) for r in t.rows] == [(("1",), pytest.approx(25.0)), (("2",), pytest.approx(35.0))]
    paths = build_report(runs, tmp_path / "out")  # no experiments dir: the runner's copy gives the layout
    assert _md_rows(paths["markdown"].read_text(), "Custom sweep", "smoke")[1:] == [["1", "25.0"], ["2", "35.0"]]


def test_paper_tables_shipped_copy():
    shipped = load_paper_tables()
    original = ROOT.parent / "shared" / "docs" / "paper_tables.json"
    if original.is_file():
        raw = json.loads(original.read_text())
        assert set(shipped) == {k for k in raw if not k.startswith("_")}
    assert shipped["table3c_vector_loss_stages"].row_where(num_stages=6)["seg"] == 32.6
    # Table 2 compares val results: the R50 UQR mask AP is the val 40.1 (the paper prints test-dev's 39.5)
    assert shipped["table2_uqr_vs_sqr_val"].row_where(method="D-DETR*+UQR", backbone="R50")["seg"] == 40.1
    assert same_value(1, "1.0") and not same_value(None, None) and not same_value("a", "b")
    with pytest.raises(KeyError, match="known tables"):
        paper_table("table9")


def test_results_notebook_through_papermill(runs, tmp_path):
    import papermill

    out = tmp_path / "report"
    nb_out = tmp_path / "results_out.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "results.ipynb"), str(nb_out), kernel_name="python3",
                               parameters={"runs_dir": str(runs), "out_dir": str(out), "scale": "smoke",
                                           "experiments_dir": str(EXPERIMENTS)},
                               cwd=str(ROOT), progress_bar=False)
    assert {"report.md", "report.tex", "report.html", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runs"] == len(collect_runs(runs, "smoke")) and metrics["config"]["scale"] == "smoke"
    assert "code_version" in metrics
    outputs = [o for c in nbformat.read(nb_out, as_version=4).cells for o in c.get("outputs", [])]
    shown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(shown) == 1 and "| D-DETR*+UQR | 40.1 | 9.0 |" in "".join(shown)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(list((out / "figures").glob("*.png"))) > 0
    with pytest.raises(papermill.PapermillExecutionError, match="parameter 'scale': 'huge' is not one of"):
        papermill.execute_notebook(str(ROOT / "notebooks" / "results.ipynb"), str(tmp_path / "bad.ipynb"),
                                   kernel_name="python3", parameters={"runs_dir": str(runs), "scale": "huge"},
                                   cwd=str(ROOT), progress_bar=False)


def test_table5_reads_bench_keys_in_paper_units():
    import yaml

    spec = yaml.safe_load((EXPERIMENTS / "table5_efficiency.yaml").read_text())["report"]
    from solq.workbench.report import Run

    r = Run("table5_efficiency", "smoke", "mode=uqr", Path("."),
            {"mode": "uqr", "params_detector": 12_345_678, "params_mask_branch": 250_000, "fps_forward": 3.5,
             "gmacs_mask_branch": 0.02, "gmacs_mask_branch_last_layer": 0.005, "segm/AP": 0.125})
    t = build_table("table5_efficiency", "smoke", [r], spec)
    uqr = next(row for row in t.rows if row.label == ("UQR",))
    assert uqr.paper["params_mask_M"] == 1.58 and uqr.paper["fps"] == 24.1
    assert uqr.ours["params_ddetr_M"].mean == pytest.approx(12.345678)
    assert uqr.ours["params_mask_M"].mean == pytest.approx(0.25)
    assert uqr.ours["fps"].mean == 3.5 and uqr.ours["seg"].mean == pytest.approx(12.5)
    # the paper's 0.47 GFLOPs is the last decoder layer's mask branch, not the sum over all layers
    assert uqr.paper["flops_mask_G"] == 0.47 and uqr.ours["flops_mask_G"].mean == pytest.approx(0.005)
    assert "fps" not in t.percent and "seg" in t.percent


# ------------------------------------------------------------------------------ seeds: mean ± std, n, noise
def _seeded_runs(runs):
    """Table 3b at the smoke scale, three seeds per point except λ = 1 (one run): segm AP per seed."""
    seg = {0.3: (0.10, 0.12, 0.14), 3.0: (0.13, 0.15, 0.17), 4: (0.11, 0.13, 0.15)}
    for lam, values in seg.items():
        for seed, v in enumerate(values):
            _run(runs, B, "smoke", f"vector_loss_coef={lam}__seed={seed}",
                 {"vector_loss_coef": lam, "seed": seed, **_ap(v, 0.2 + seed / 100)})
    _run(runs, B, "smoke", "vector_loss_coef=1", {"vector_loss_coef": 1, **_ap(0.5, 0.5)})
    for seed, merged in ((0, 3), (1, 5)):  # no layout: the seeds of one point share its column
        _run(runs, "fig6_failure_cases", "smoke", f"default__seed={seed}", {"failures/merged": merged, "seed": seed})
    return runs


def test_seeded_rows_show_mean_std_n_and_the_noise_marks(tmp_path):
    from solq.workbench.run_tables import load_spec

    runs = _seeded_runs(tmp_path / "runs")
    problems = []
    spec = load_spec(B, "smoke", runs, EXPERIMENTS)
    table = build_table(B, "smoke", [r for r in collect_runs(runs) if r.experiment == B], spec, problems)
    rows = {r.label[0]: r for r in table.rows}
    assert table.seeded and table.reference == (0.3,)  # the first row with our numbers
    seg = {lam: rows[lam].ours["seg"] for lam in (0.3, 3, 4, 1)}
    assert [(c.n, round(c.mean, 9), c.std and round(c.std, 9)) for c in seg.values()] == [
        (3, 12.0, 2.0), (3, 15.0, 2.0), (3, 13.0, 2.0), (1, 50.0, None)]  # percent; sample std (n - 1)
    # noise rule: |mean - mean_ref| < max(std, std_ref); 15 - 12 = 3 is outside, 13 - 12 = 1 inside
    assert [c.noise for c in seg.values()] == [False, False, True, False]  # one run: never marked
    box = rows[3].ours["box"]  # seeds 0, 1, 2 give 20, 21, 22 in every row: no difference, inside the noise
    assert (box.mean, box.std, box.noise) == (pytest.approx(21.0), pytest.approx(1.0), True)
    assert not problems
    # another reference row, by its label
    other = build_table(B, "smoke", [r for r in collect_runs(runs) if r.experiment == B],
                        {**spec, "reference": "3"}, problems)
    assert other.reference == (3,) and [r.ours["seg"].noise for r in other.rows if r.label[0] in (0.3, 4)] == [
        False, False]  # 12 and 13 against 15: differences 3 and 2 are not below the larger std 2

    out = build_report(runs, tmp_path / "out", experiments_dir=EXPERIMENTS)
    md = out["markdown"].read_text()
    title = "Table 3b: mask vector loss weight λ_vec"
    smoke = _md_rows(md, title, "smoke")
    body = {r[0]: r for r in smoke[1:]}
    assert smoke[0][:4] == ["lambda_vec", "n", "seg paper", "seg ours"]
    assert body["0.3"][1:4] == ["3", "25.2", "12.0 ± 2.0"] and body["4"][3] == "13.0 ± 2.0 ≈"
    assert body["3"][3] == "15.0 ± 2.0" and body["1"][1:4] == ["1", "27.2", "50.0"]  # one run: as before
    assert "inside the noise of the reference row '0.3'" in md
    html = _html_table(out["html"].read_text(), B, "smoke")
    assert {r[0]: r[3] for r in html[2:]}["4"] == "13.0 ± 2.0 ≈"
    assert r"13.0 $\pm$ 2.0 $\approx$" in out["latex"].read_text()
    assert f"{B}__smoke.png" in {p.name for p in out["figures"]}  # the sweep, with error bars
    generic = _md_rows(md, "Figure 6: failure cases", "smoke")
    assert generic[0] == ["metric", "n", "default"] and generic[1] == ["failures/merged", "2", "4 ± 1.414"]


def test_single_runs_render_as_before(built):
    md = built[1]["markdown"].read_text()
    t2 = _md_rows(md, "Table 2: UQR vs SQR", "smoke")
    assert "n" not in t2[0] and "≈" not in md.split("Table 2: UQR vs SQR")[1].split("###")[0]
    assert "inside the noise" not in md.split("Table 2: UQR vs SQR")[1].split("###")[0]

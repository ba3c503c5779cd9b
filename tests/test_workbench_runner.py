"""The experiment runner: YAML parsing, grid points, resuming a half-finished grid through papermill,
failure reports, scale separation; and every shipped experiment YAML."""
import argparse
import json
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from solq.workbench import run_command, runner
from solq.workbench.experiment_file import (SCALES, expand_grid, load_experiment, parse_seeds, point_slug,
                                            seeded_name, split_seed)
from solq.workbench.paper import load_paper_tables
from solq.workbench.runner import MARKER, run_experiment

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
EXPECTED = {"table2_uqr_vs_sqr", "table3a_mask_coding", "table3b_vector_loss_weight", "table3c_vector_loss_stages",
            "table3d_mask_resolution", "table3e_vector_dim", "table4_boundary_ap", "table5_efficiency",
            "mask_coding_upper_bound", "fig4_decoder_attention", "fig6_failure_cases"}

FAKE_BODY = """\
import json, pathlib
if counter:
    with open(counter, "a") as fh:
        fh.write(f"{x}\\n")
flag = pathlib.Path(fail_flag)
if fail_flag and flag.exists() and int(flag.read_text()) == x:
    raise ValueError(f"x={x} is the failing value")
out = pathlib.Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({"segm/AP": x / 10 + seed / 1000, "note": note}))
"""


def _fake_project(tmp_path, grid=(1, 2, 3)):
    """A project with notebooks/fake.ipynb (writes metrics from its parameters, raises when x equals the
    number in the fail_flag file) and experiments/fake.yaml."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "experiments").mkdir()
    nb = new_notebook(cells=[
        new_markdown_cell("# fake"),
        new_code_cell('scale = "smoke"\noutput_dir = ""\nx = 0\nfail_flag = ""\ncounter = ""\nnote = ""\nseed = 0',
                      metadata={"tags": ["parameters"]}),
        new_code_cell(FAKE_BODY)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "fake.ipynb")
    spec = {
        "title": "Fake", "notebook": "notebooks/fake.ipynb",
        "parameters": {"fail_flag": str(tmp_path / "flag"), "counter": str(tmp_path / "counter.txt")},
        "grid": {"x": list(grid)},
        "scales": {"smoke": {"parameters": {"note": "smoke ${experiment} ${scale}"}},
                   "paper": {"parameters": {"note": "paper"}, "grid": {"x": [7]}}},
    }
    path = tmp_path / "experiments" / "fake.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _counted(tmp_path):
    f = tmp_path / "counter.txt"
    return [int(v) for v in f.read_text().split()] if f.exists() else []


def test_expand_grid_and_point_names():
    assert expand_grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert expand_grid({"a": 3}) == [{"a": 3}]
    assert expand_grid(None) == [{}]
    assert expand_grid([{"m": "det"}, {"m": "uqr", "c": "dct"}]) == [{"m": "det"}, {"m": "uqr", "c": "dct"}]
    with pytest.raises(ValueError, match=r"grid\.a: empty"):
        expand_grid({"a": []})
    assert point_slug({}) == "default"
    assert point_slug({"vector_loss_coef": 0.3, "mode": "uqr"}) == "vector_loss_coef=0.3__mode=uqr"
    assert point_slug({"flag": True, "xs": [1, 2], "p": "a/b c"}) == "flag=true__xs=1-2__p=a-b-c"
    long_a, long_b = {"k": "v" * 200}, {"k": "v" * 199 + "w"}
    assert len(point_slug(long_a)) <= 120 and point_slug(long_a) != point_slug(long_b)
    assert point_slug(long_a) == point_slug(dict(long_a))  # stable


def test_yaml_errors_name_file_and_key(tmp_path):
    path = _fake_project(tmp_path)
    spec = yaml.safe_load(path.read_text())
    bad = tmp_path / "experiments" / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "grdi": {}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key\(s\) \['grdi'\]"):
        load_experiment(bad)
    bad.write_text(yaml.safe_dump({**spec, "scales": {"smoke": {}}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: 'scales' must define exactly \['smoke', 'paper'\]"):
        load_experiment(bad)
    bad.write_text(yaml.safe_dump({**spec, "notebook": "notebooks/missing.ipynb"}))
    with pytest.raises(ValueError, match="missing.ipynb"):
        load_experiment(bad)
    bad.write_text(yaml.safe_dump({**spec, "parameters": {"output_dir": "x"}}))
    with pytest.raises(ValueError, match="'output_dir' is set by the runner"):
        load_experiment(bad).points("smoke")
    bad.write_text(yaml.safe_dump({**spec, "parameters": {"counter": "${nope}"}}))
    with pytest.raises(ValueError, match=r"parameter 'counter'.*\$\{nope\}"):
        load_experiment(bad).points("smoke")
    bad.write_text(yaml.safe_dump({**spec, "parameters": {"typo": 1}}))
    with pytest.raises(ValueError, match=r"\['typo'\] are not parameters of .*fake\.ipynb"):
        run_experiment(bad, "smoke", runs_dir=tmp_path / "runs", progress=False)
    with pytest.raises(ValueError, match="cannot override grid parameter"):
        run_experiment(path, "smoke", runs_dir=tmp_path / "runs", overrides={"x": 1}, dry_run=True)
    with pytest.raises(ValueError, match="no point matches 'x=9'"):
        run_experiment(path, "smoke", runs_dir=tmp_path / "runs", points=["x=9"], dry_run=True)
    with pytest.raises(ValueError, match="scale 'big'"):
        run_experiment(path, "big", runs_dir=tmp_path / "runs")


def test_resume_half_finished_grid(tmp_path, capsys):
    path = _fake_project(tmp_path)
    runs = tmp_path / "runs"
    (tmp_path / "flag").write_text("2")  # the point x=2 fails while this file says 2

    # 1) stop at the first failure: x=3 is never started
    res = run_experiment(path, "smoke", runs_dir=runs, progress=False, keep_going=False)
    assert [(r.point, r.status) for r in res] == [("x=1", "done"), ("x=2", "failed")]
    assert _counted(tmp_path) == [1, 2]
    err = capsys.readouterr().err
    assert "FAILED fake [smoke] point x=2" in err and "ValueError: x=2 is the failing value" in err
    assert "| if fail_flag and flag.exists()" in err  # head of the failing cell's source
    failed_nb = runs / "fake" / "smoke" / "x=2" / "notebook.ipynb"
    assert f"partially executed notebook: {failed_nb}" in err and failed_nb.is_file()
    assert not (runs / "fake" / "smoke" / "x=3").exists()
    assert "ValueError: x=2 is the failing value" in (failed_nb.parent / "log.txt").read_text()  # traceback kept

    # 2) keep going: x=1 is skipped (complete), x=2 fails again, x=3 runs
    res = run_experiment(path, "smoke", runs_dir=runs, progress=False)
    assert [r.status for r in res] == ["skipped", "failed", "done"]
    assert _counted(tmp_path) == [1, 2, 2, 3]

    # 3) fix the cause and simulate a run killed after x=3's notebook but before its marker
    (tmp_path / "flag").unlink()
    (runs / "fake" / "smoke" / "x=3" / MARKER).unlink()
    res = run_experiment(path, "smoke", runs_dir=runs, progress=False)
    assert [r.status for r in res] == ["skipped", "done", "done"]
    assert _counted(tmp_path) == [1, 2, 2, 3, 2, 3]

    # 4) nothing left to do; each point holds notebook, metrics, log and marker
    res = run_experiment(path, "smoke", runs_dir=runs, progress=False)
    assert [r.status for r in res] == ["skipped"] * 3 and _counted(tmp_path) == [1, 2, 2, 3, 2, 3]
    for x in (1, 2, 3):
        d = runs / "fake" / "smoke" / f"x={x}"
        assert {"notebook.ipynb", "metrics.json", "log.txt", MARKER} <= {p.name for p in d.iterdir()}
        m = json.loads((d / "metrics.json").read_text())
        assert m["segm/AP"] == pytest.approx(x / 10)
        assert (m["experiment"], m["scale"], m["point"], m["x"]) == ("fake", "smoke", f"x={x}", x)
        assert m["note"] == "smoke fake smoke"  # ${experiment} ${scale} filled in
        assert m["parameters"]["x"] == x and "output_dir" not in m["parameters"]
        assert not (d / "failed.json").exists()
    assert (runs / "fake" / "smoke" / "experiment.yaml").read_text() == path.read_text()

    # changed parameters make complete points stale; a dry run says so without running anything
    res = run_experiment(path, "smoke", runs_dir=runs, overrides={"note": "other"}, dry_run=True)
    assert [(r.status, r.error) for r in res] == [("pending", "parameters changed")] * 3
    res = run_experiment(path, "smoke", runs_dir=runs, points=["x=[12]"], dry_run=True, force=True)
    assert [(r.point, r.status) for r in res] == [("x=1", "pending"), ("x=2", "pending")]
    # other scale: its own grid, its own folder, nothing run yet
    res = run_experiment(path, "paper", runs_dir=runs, dry_run=True)
    assert [(r.point, r.status, r.output_dir) for r in res] == [("x=7", "pending", runs / "fake" / "paper" / "x=7")]


def test_metrics_of_another_scale_are_refused(tmp_path):
    exp = load_experiment(_fake_project(tmp_path))
    point = exp.points("smoke")[0]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"segm/AP": 0.1, "scale": "paper"}))
    err = runner._complete_metrics(exp, "smoke", point, metrics)
    assert "records scale='paper' but the run is scale='smoke'" in err
    metrics.write_text(json.dumps({"segm/AP": 0.1}))
    assert runner._complete_metrics(exp, "smoke", point, metrics) is None
    assert json.loads(metrics.read_text())["scale"] == "smoke"


def test_requires_names_the_missing_experiment(tmp_path):
    path = _fake_project(tmp_path)
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "requires": ["table2_uqr_vs_sqr"]}))
    with pytest.raises(ValueError, match=r"run `solq run experiments/table2_uqr_vs_sqr.yaml --scale smoke` first"):
        run_experiment(path, "smoke", runs_dir=tmp_path / "runs", progress=False)


def test_kernel_of_another_interpreter_is_replaced(tmp_path, monkeypatch):
    other = tmp_path / "jp" / "kernels" / "python3"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "other", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jp"))
    with pytest.raises(ValueError, match="/nonexistent/python"):
        runner.ensure_kernel("python3")
    argv = runner.ensure_kernel("python3", private_dir=tmp_path / "private")
    assert argv[0] == sys.executable
    from jupyter_client.kernelspec import KernelSpecManager
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


def test_cli_arguments(tmp_path, capsys):
    path = _fake_project(tmp_path)
    parser = argparse.ArgumentParser()
    run_command.add_run_arguments(parser)
    args = parser.parse_args([str(path), "--scale", "smoke", "--runs-dir", str(tmp_path / "runs"), "--dry-run",
                              "--set", "note=hello", "--points", "x=1", "2"])
    assert run_command.parse_overrides(["a=1", "b=[x, y]", "c="]) == {"a": 1, "b": ["x", "y"], "c": ""}
    assert run_command.run_from_args(args) == 0
    out = capsys.readouterr().out
    assert "pending  fake/smoke/x=1" in out and "pending  fake/smoke/x=3" in out and "x=2" not in out
    with pytest.raises(SystemExit):
        parser.parse_args([str(path), "--scale", "huge"])


def test_seed_names_and_parsing():
    assert seeded_name("mode=uqr", 2) == "mode=uqr__seed=2" and seeded_name("default", 0) == "default__seed=0"
    assert seeded_name("mode=uqr", None) == "mode=uqr"
    for name, back in (("mode=uqr__seed=2", ("mode=uqr", 2)), ("seed=0", ("default", 0)),
                       ("default__seed=3", ("default", 3)),
                       ("mode=uqr", ("mode=uqr", None)), ("a=1__b=x__seed=10", ("a=1__b=x", 10)),
                       ("seed=x", ("seed=x", None))):
        assert split_seed(name) == back
    assert parse_seeds("0,1, 2") == [0, 1, 2] and parse_seeds([3, 1]) == [3, 1] and parse_seeds(5) == [5]
    assert parse_seeds(None) is None and parse_seeds([]) is None and parse_seeds("") is None
    for bad, why in (("0,x", "comma-separated integers"), ([0, 0], "repeat"), ([-1], "non-negative"),
                     ([True], "non-negative"), ({"a": 1}, "list of non-negative")):
        with pytest.raises(ValueError, match=why):
            parse_seeds(bad)


def test_seeds_expand_the_grid_into_distinct_points(tmp_path):
    path = _fake_project(tmp_path, grid=(1, 2))
    spec = yaml.safe_load(path.read_text())
    spec["parameters"]["note"] = "from ${seed_suffix}: x=${x}, seed ${seed}"
    spec["scales"]["smoke"]["parameters"] = {}
    path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1, 2]}))
    exp = load_experiment(path)
    points = exp.points("smoke", runs_dir=tmp_path / "runs")
    assert [p.name for p in points] == [f"x={x}__seed={s}" for x in (1, 2) for s in (0, 1, 2)]
    assert [(p.values, p.seed, p.parameters["seed"]) for p in points[:2]] == [({"x": 1}, 0, 0), ({"x": 1}, 1, 1)]
    assert points[4].parameters["note"] == "from __seed=1: x=2, seed 1"  # ${seed_suffix} names the seed's points
    assert [p.name for p in exp.points("smoke", seeds="7")] == ["x=1__seed=7", "x=2__seed=7"]  # --seeds replaces
    assert [p.name for p in exp.points("paper")] == [f"x=7__seed={s}" for s in (0, 1, 2)]
    # a scale's seeds replace the top-level ones; without seeds, names and parameters are as before
    spec["scales"]["paper"]["seeds"] = [5]
    spec["parameters"]["note"] = "from ${seed_suffix}."
    path.write_text(yaml.safe_dump(spec))
    assert [p.name for p in load_experiment(path).points("paper")] == ["x=7__seed=5"]
    plain = load_experiment(path).points("smoke")
    assert [p.name for p in plain] == ["x=1", "x=2"] and plain[0].seed is None and "seed" not in plain[0].parameters
    assert plain[0].parameters["note"] == "from ."  # unseeded: an empty suffix names the plain points
    for bad in ({"seeds": [0, 0]}, {"seeds": "a"}):
        path.write_text(yaml.safe_dump({**spec, **bad}))
        with pytest.raises(ValueError, match=r"fake\.yaml: seeds"):
            load_experiment(path)
    path.write_text(yaml.safe_dump({**spec, "seeds": [0], "grid": {"x": [1], "seed": [3]}}))
    with pytest.raises(ValueError, match="'seed' is both a grid value or override and given by seeds"):
        load_experiment(path).points("smoke")


def test_seeded_points_run_into_distinct_folders_and_resume(tmp_path, capsys):
    path = _fake_project(tmp_path, grid=(1, 2))
    runs = tmp_path / "runs"
    res = run_experiment(path, "smoke", runs_dir=runs, seeds=[0, 1], points=["x=1__*"], progress=False)
    assert [(r.point, r.status) for r in res] == [("x=1__seed=0", "done"), ("x=1__seed=1", "done")]
    for seed in (0, 1):
        metrics = json.loads((runs / "fake" / "smoke" / f"x=1__seed={seed}" / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["parameters"]["seed"] == seed and metrics["x"] == 1
        assert metrics["segm/AP"] == pytest.approx(0.1 + seed / 1000)  # the notebook ran with its seed
    assert sorted(d.name for d in (runs / "fake" / "smoke").iterdir() if d.is_dir()) == ["x=1__seed=0", "x=1__seed=1"]
    again = run_experiment(path, "smoke", runs_dir=runs, seeds="0,1", progress=False, dry_run=True)
    assert [(r.point, r.status) for r in again] == [("x=1__seed=0", "skipped"), ("x=1__seed=1", "skipped"),
                                                    ("x=2__seed=0", "pending"), ("x=2__seed=1", "pending")]
    # the command line: --seeds on solq run, --dry-run lists the seeded points
    from solq.cli import main

    assert main(["run", str(path), "--scale", "smoke", "--runs-dir", str(runs), "--seeds", "0,1,2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for point, status in (("x=1__seed=0", "skipped"), ("x=1__seed=2", "pending"), ("x=2__seed=1", "pending")):
        assert f"{status:8s} fake/smoke/{point}" in out
    assert "6 of 6 points ok" in out
    with pytest.raises(SystemExit):
        main(["run", str(path), "--scale", "smoke", "--seeds", "1,1"])
    assert "--seeds: seeds repeat" in capsys.readouterr().err


def test_scale_requires_replace_the_top_level_ones(tmp_path):
    path = _fake_project(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["scales"]["smoke"]["requires"] = []
    path.write_text(yaml.safe_dump({**spec, "requires": ["table2_uqr_vs_sqr"]}))
    exp = load_experiment(path)
    assert exp.requires("smoke") == [] and exp.requires("paper") == ["table2_uqr_vs_sqr"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_shipped_experiment(path):
    exp = load_experiment(path, require_notebook=False)
    assert exp.notebook.parent == ROOT / "notebooks"
    assert exp.raw.get("claim"), f"{path.name}: say what the paper claims"
    tables = load_paper_tables()
    for scale in SCALES:
        points = exp.points(scale, runs_dir=ROOT / "experiments" / "runs")
        assert points and len({p.name for p in points}) == len(points)
        for p in points:
            assert p.parameters["scale"] == scale
            assert not any("${" in str(v) for v in p.parameters.values()), p.parameters
        if scale == "smoke":
            assert all(p.parameters.get("device", "cpu") == "cpu" for p in points)
        else:
            params = points[0].parameters
            assert params.get("device") == "cuda"
            if "dataset" in params:
                assert "coco" in f"{params['dataset']} {params.get('coco_root', '')}", "paper scale reads COCO"
    report = exp.raw.get("report") or {}
    if "paper_table" in report:
        t = tables[report["paper_table"]]
        for col in list(report.get("match", {})) + list(report.get("columns", [])):
            assert col in t.columns, f"{path.name}: column {col!r} not in paper table {t.key}"
        assert t.select(**report.get("paper_rows", {}))


def test_every_paper_table_and_figure_has_an_experiment():
    assert {p.stem for p in EXPERIMENTS} >= EXPECTED


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_parameters_exist_in_notebook(path):
    import papermill

    exp = load_experiment(path, require_notebook=False)
    if not exp.notebook.is_file():
        pytest.skip(f"{exp.notebook.name} not written yet")
    declared = set(papermill.inspect_notebook(str(exp.notebook)))
    for scale in SCALES:
        for p in exp.points(scale) + exp.points(scale, seeds=[0, 1]):  # every experiment can run with seeds
            assert set(p.parameters) | {"output_dir"} <= declared, (
                f"{path.name} [{scale}]: {sorted(set(p.parameters) | {'output_dir'} - declared)} "
                f"not parameters of {exp.notebook.name}")


# ------------------------------------------------------------------ helpers the notebooks use
def test_validate_parameters_names_what_is_wrong(tmp_path):
    from solq.workbench.notebook import Param, validate_parameters

    schema = {"scale": ("smoke", "paper"), "lr": Param(float, min=0), "seed": int,
              "codecs": Param(list, items=str, choices=("dct", "pca"), nonempty=True),
              "data_root": Param(str, path="dir"), "ckpt": Param(str, nullable=True)}
    good = {"scale": "smoke", "lr": 1, "seed": 3, "codecs": ["dct"], "data_root": str(tmp_path), "ckpt": None}
    out = validate_parameters(good, schema)
    assert out["lr"] == 1.0 and isinstance(out["lr"], float) and out["codecs"] == ["dct"]
    cases = [
        ({"scale": "big"}, "parameter 'scale': 'big' is not one of ['smoke', 'paper']"),
        ({"lr": -1e-4}, "parameter 'lr': -0.0001 is below the minimum 0"),
        ({"seed": True}, "parameter 'seed': expected int, got bool True"),
        ({"seed": "3"}, "parameter 'seed': expected int, got str '3'"),
        ({"codecs": ["dct", "jpeg"]}, "parameter 'codecs': 'jpeg' is not one of ['dct', 'pca']"),
        ({"codecs": []}, "parameter 'codecs': must not be empty"),
        ({"data_root": str(tmp_path / "nope")}, "parameter 'data_root': directory"),
        ({"ckpt": 3}, "parameter 'ckpt': expected str, got int 3"),
        ({"lrr": 0.1}, "unknown parameter(s) ['lrr']; valid parameters:"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError) as e:
            validate_parameters({**good, **change}, schema)
        assert message in str(e.value), (change, str(e.value))
    with pytest.raises(ValueError, match="parameter 'seed' is missing") as e:
        validate_parameters({k: v for k, v in good.items() if k != "seed"} | {"scale": "x"}, schema)
    assert "'scale'" in str(e.value)  # every problem at once


def test_write_metrics_flat_with_config_and_version(tmp_path):
    import numpy as np
    import torch

    from solq.config import load_config
    from solq.workbench.notebook import flatten_metrics, write_metrics

    cfg = load_config("smoke")
    path = write_metrics(tmp_path / "out", {"segm": {"AP": np.float32(0.25), "AP50": float("nan")},
                                            "bbox/AP": torch.tensor(0.5), "vector_loss_coef": 3, "codecs": ["dct"]},
                         config=cfg)
    m = json.loads(path.read_text())
    assert m["segm/AP"] == pytest.approx(0.25) and m["segm/AP50"] is None and m["bbox/AP"] == 0.5
    assert m["vector_loss_coef"] == 3 and m["codecs"] == ["dct"]
    assert m["config"]["model"]["backbone"] == cfg.model.backbone and m["code_version"].startswith("0.")
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    with pytest.raises(ValueError, match="metric 'bad/obj'"):
        flatten_metrics({"bad": {"obj": object()}})


def test_set_seed_and_resolve_path(tmp_path, monkeypatch):
    import torch

    from solq.workbench.notebook import project_root, resolve_path, set_seed

    set_seed(5)
    a = torch.rand(3)
    set_seed(5)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError, match="seed"):
        set_seed(-1)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "experiments").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # a notebook opened in Jupyter runs from notebooks/
    assert project_root() == tmp_path
    assert resolve_path("data/synthetic") == tmp_path / "data" / "synthetic"
    assert resolve_path("/abs/x") == Path("/abs/x")


PARALLEL_BODY = """\
import json, os, pathlib, time
t0 = time.time()
time.sleep(1.5)
out = pathlib.Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({"start": t0, "end": time.time(),
                                               "omp": os.environ.get("OMP_NUM_THREADS")}))
"""


def test_jobs_run_points_at_once_on_their_share_of_the_cores(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "experiments").mkdir()
    params = new_code_cell('scale = "smoke"\noutput_dir = ""\nx = 0', metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[params, new_code_cell(PARALLEL_BODY)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "par.ipynb")
    path = tmp_path / "experiments" / "par.yaml"
    path.write_text(yaml.safe_dump({"title": "Par", "notebook": "notebooks/par.ipynb", "grid": {"x": [1, 2, 3]},
                                    "scales": {"smoke": {}, "paper": {}}}))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.chdir(tmp_path / "experiments")
    res = run_experiment(path, "smoke", runs_dir=tmp_path / "runs", progress=False, jobs=2)
    assert [(r.point, r.status) for r in res] == [("x=1", "done"), ("x=2", "done"), ("x=3", "done")]
    assert Path.cwd() == tmp_path / "experiments"  # two jobs' papermill cwd= never leave the caller elsewhere
    m = [json.loads((r.output_dir / "metrics.json").read_text()) for r in res]
    assert m[0]["start"] < m[1]["end"] and m[1]["start"] < m[0]["end"]  # the first two overlapped
    assert {x["omp"] for x in m} == {str(max(1, (runner.os.cpu_count() or 1) // 2))}
    assert runner.os.environ["OMP_NUM_THREADS"] == "7"  # restored
    with pytest.raises(ValueError, match="jobs"):
        run_experiment(path, "smoke", runs_dir=tmp_path / "runs", progress=False, jobs=0, force=True)


def test_wait_for_point_states(tmp_path):
    import threading
    import time

    from solq.workbench.runner import wait_for_point

    point = tmp_path / "mode=sqr"
    assert wait_for_point(point, timeout_s=5) == "not running"  # never started
    point.mkdir()
    (point / "log.txt").write_text("training")
    assert wait_for_point(point, timeout_s=0.2, poll_s=0.05) == "timeout"  # running, fresh log
    assert wait_for_point(point, timeout_s=5, stale_s=0.0) == "not running"  # log too old: abandoned
    threading.Timer(0.3, lambda: (point / MARKER).write_text("{}")).start()
    t0 = time.monotonic()
    assert wait_for_point(point, timeout_s=10, poll_s=0.05) == "done"
    assert time.monotonic() - t0 < 5
    (point / MARKER).unlink()
    (point / "failed.json").write_text("{}")
    assert wait_for_point(point, timeout_s=5) == "failed"


def test_table3a_pca_point_codes_as_the_release_with_jittered_targets(tmp_path):
    from solq.workbench.experiment import config_from_parameters
    from solq.workbench.experiment_file import load_experiment

    exp = load_experiment("experiments/table3a_mask_coding.yaml")
    jitter = {(p.values["mode"], p.values["codec"]): config_from_parameters(p.parameters, run_dir=tmp_path).codec.jitter
              for p in exp.points("smoke")}
    assert jitter[("uqr", "pca")] is True  # the experiment says "PCA as the release": logit jitter + sigmoid
    assert not any(v for k, v in jitter.items() if k != ("uqr", "pca"))


def test_tables_4_and_5_read_models_of_the_main_setting(teaching_recipe):
    """Table 4's SOLQ and Table 5's UQR are SOLQ R50 at the main setting (Sec. 4.1, batch 32: main_model), not
    Table 2's batch-16 model; the smoke scale reads the shipped teaching models and needs no run first."""
    runs = ROOT / "experiments" / "runs"
    t4, t5, main = (load_experiment(ROOT / "experiments" / f"{n}.yaml", require_notebook=False)
                    for n in ("table4_boundary_ap", "table5_efficiency", "main_model"))
    assert [p.parameters["checkpoint"] for p in t4.points("smoke")] == ["smoke-uqr"] and t4.requires("smoke") == []
    assert t4.points("paper", runs_dir=runs)[0].parameters["checkpoint"] == str(runs / "main_model/paper/default")
    assert t4.points("paper", runs_dir=runs, seeds=[1])[0].parameters["checkpoint"] == str(
        runs / "main_model/paper/default__seed=1")  # a seeded Table 4 reads the main model of its seed
    assert t4.requires("paper") == ["main_model"]
    for p in t5.points("smoke"):
        assert (p.parameters["checkpoint_uqr"], p.parameters["checkpoint_sqr"]) == ("smoke-uqr", "smoke-sqr")
    paper = t5.points("paper", runs_dir=runs)[0].parameters
    assert paper["checkpoint_uqr"] == str(runs / "main_model/paper/default")
    assert paper["checkpoint_sqr"] == str(runs / "table2_uqr_vs_sqr/paper/mode=sqr__backbone=resnet50")
    [point] = main.points("paper")
    m = point.parameters  # batch 32 = 8 GPUs x 4, ResNet-50 with four levels (the paper-r50 preset), 50 epochs
    assert (point.name, m["mode"], m["preset"], m["batch_size"] * m["nproc_per_node"], m["epochs"]) == (
        "default", "uqr", "paper-r50", 32, 50)
    from solq.config import load_config

    assert load_config("paper-r50").model.num_feature_levels == 4
    [smoke] = main.points("smoke")  # the recipe of the shipped smoke-uqr (scripts/make_teaching_models.sh)
    assert (smoke.parameters["max_steps"], smoke.parameters["batch_size"], smoke.parameters["seed"]) == (8000, 8, 42)
    assert smoke.parameters["overrides"] == teaching_recipe["uqr"]  # the script's model settings: the same model

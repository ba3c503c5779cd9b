"""Table 1's experiment: it dry-runs, every point makes a valid config with the backbone it names (Swin-L with the
paper's sizes), and the report lays our SOLQ runs beside the paper's rows, the other methods' rows kept as the
paper's numbers."""
from pathlib import Path

from solq.cli import main
from solq.workbench.experiment import config_from_parameters
from solq.workbench.experiment_file import SCALES, load_experiment
from solq.workbench.run_tables import Run, build_table, load_spec

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "experiments" / "table1_main_results.yaml"


def test_dry_run_lists_the_points(tmp_path, capsys):
    assert main(["run", str(PATH), "--scale", "smoke", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for backbone in ("small", "resnet50", "resnet101", "swin_t"):
        assert f"pending  table1_main_results/smoke/backbone={backbone}" in out
    assert "4 of 4 points ok" in out and not any(tmp_path.iterdir())  # nothing run, nothing written


def test_every_point_makes_the_config_it_names(tmp_path):
    exp = load_experiment(PATH)
    backbones = {}
    for scale in SCALES:
        for p in exp.points(scale, runs_dir=tmp_path):
            cfg = config_from_parameters(p.parameters, run_dir=tmp_path / p.name)
            assert cfg.model.backbone == p.values["backbone"] and cfg.model.mode == "uqr"
            assert cfg.model.pretrained_backbone == (scale == "paper")  # downloads only at the paper scale
            backbones[scale, cfg.model.backbone] = cfg
    assert {b for s, b in backbones if s == "paper"} == {"resnet50", "resnet101", "swin_t", "swin_s", "swin_b",
                                                         "swin_l"}
    assert backbones["smoke", "small"].model.backbone_weights == "synthetic-small"
    assert backbones["smoke", "swin_t"].model.backbone_weights == ""
    swin_l = backbones["paper", "swin_l"]  # the paper's Swin-L: width 384, short side 400-1200, long side <= 1536
    assert swin_l.model.hidden_dim == 384 and swin_l.data.max_size == 1536
    assert (min(swin_l.data.train_scales), max(swin_l.data.train_scales)) == (400, 1200)
    assert backbones["paper", "resnet50"].model.hidden_dim == 384  # release-r50, the authors' script


def _run(scale, backbone, seg, box):
    return Run("table1_main_results", scale, f"backbone={backbone}", Path("."), {"segm/AP": seg, "bbox/AP": box},
               {"backbone": backbone})


def test_report_puts_our_solq_rows_beside_the_papers(tmp_path):
    spec = load_spec("table1_main_results", "paper", tmp_path, ROOT / "experiments")
    runs = [_run("paper", "resnet50", 0.40, 0.48), _run("paper", "swin_t", 0.41, 0.49)]
    table = build_table("table1_main_results", "paper", runs, spec)
    rows = {r.label: r for r in table.rows}
    assert table.key_columns == ["method", "backbone"] and table.has_paper
    r50 = rows["SOLQ", "R50"]
    assert r50.paper["seg"] == 39.7 and r50.ours["seg"].mean == 40.0 and r50.ours["box"].mean == 48.0
    other = rows["Mask R-CNN", "R50-FPN"]  # another method: the paper's numbers, nothing of ours
    assert other.paper["seg"] == 37.5 and not other.ours
    assert rows["SOLQ", "Swin-L"].paper["box"] == 56.5 and not rows["SOLQ", "Swin-L"].ours
    assert table.rows[-1].label == ("SOLQ", "Swin-T") and not table.rows[-1].paper  # no paper row: after them
    smoke = build_table("table1_main_results", "smoke", [_run("smoke", "small", 0.2, 0.3)],
                        load_spec("table1_main_results", "smoke", tmp_path, ROOT / "experiments"))
    assert {r.label[0] for r in smoke.rows} == {"SOLQ"}  # the smoke table: the paper's SOLQ rows and ours
    assert smoke.rows[-1].label == ("SOLQ", "small (smoke)")

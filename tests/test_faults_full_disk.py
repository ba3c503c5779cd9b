"""Full disks and unwritable folders: a write that fails mid-file names the path and the cause and leaves the
previous file intact (checkpoints, metrics.json, eval results, the report); --resume auto still finds the last
good checkpoint; the run folder is checked before any work."""
import errno
import json
import os
from pathlib import Path

import pytest

import solq.files
from solq.config import load_config
from solq.engine.checkpoint import find_resume_checkpoint, load_checkpoint
from solq.files import OutputWriteError, check_writable, write_text_atomic
from test_engine_train import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


class _FullDisk:
    """A file that takes ``room`` more bytes and then fails as a full disk does (ENOSPC), mid-write."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):  # flush, fileno, close, ...
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(name, after=k, room=n)``: the (k+1)-th and later writes of a file called ``name`` fail
    after ``n`` bytes. Returns the list of temporary files handed out for it."""
    original = solq.files._temp_file
    handed: list[Path] = []

    def arm(name: str, after: int = 0, room: int = 100):
        def temp_file(path: Path):
            f, tmp = original(path)
            if path.name != name:
                return f, tmp
            handed.append(tmp)
            return (_FullDisk(f, room) if len(handed) > after else f), tmp

        monkeypatch.setattr(solq.files, "_temp_file", temp_file)
        return handed

    return arm


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")]


def test_a_write_failing_mid_file_names_the_path_and_cause_and_keeps_the_old_file(tmp_path, full_disk):
    path = write_text_atomic(tmp_path / "metrics.json", '{"old": true}')
    handed = full_disk("metrics.json", room=5)
    with pytest.raises(OutputWriteError) as info:
        write_text_atomic(path, json.dumps({"new": list(range(100))}), what="metrics file")
    message = str(info.value)
    assert f"cannot write the metrics file {path}: ENOSPC: No space left on device" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert len(handed) == 1 and not handed[0].exists()  # 5 bytes reached the temporary file; it is gone
    assert path.read_text() == '{"old": true}' and _no_temp_files(tmp_path)


@pytest.mark.parametrize("cause", [errno.EROFS, errno.EACCES])
def test_an_unwritable_folder_is_named_with_its_cause(tmp_path, monkeypatch, cause):
    def refuse(path):  # what a read-only mount or a folder without write permission answers (we run as root)
        raise OSError(cause, os.strerror(cause), str(path))

    monkeypatch.setattr(solq.files, "_temp_file", refuse)
    with pytest.raises(OutputWriteError, match=rf"the output folder {tmp_path / 'out'} is not writable: "
                                               rf"{errno.errorcode[cause]}: {os.strerror(cause)}"):
        check_writable(tmp_path / "out")


def test_a_folder_that_cannot_exist_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputWriteError, match=rf"{tmp_path / 'a_file' / 'run'} is not writable: "
                                               r"(ENOTDIR|EEXIST)"):
        check_writable(tmp_path / "a_file" / "run")


def test_train_checks_the_run_folder_before_building_anything(tmp_path, monkeypatch, capsys):
    from solq import cli
    from solq.engine import train

    def never(*args, **kwargs):
        raise AssertionError("datasets built before the run folder was checked")

    monkeypatch.setattr(train, "build_datasets", never)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    assert cli.main(["train", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"solq train: error: the run folder {out} is not writable" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from solq.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 8, 4, 64, 0, progress=False)
    return root


def test_a_full_disk_during_a_checkpoint_stops_training_and_resume_auto_finds_the_previous_one(
        synth_root, tmp_path, full_disk):
    from solq.engine.train import fit

    out = tmp_path / "run"
    cfg = load_config("smoke", tiny_overrides(synth_root, out, 8, **{"train.epochs": 1, "train.eval_every": 0}))
    handed = full_disk("checkpoint.pth", after=2, room=4096)  # steps 1 and 2 are saved; step 3's write fails
    with pytest.raises(OutputWriteError) as info:
        fit(cfg, save_every_steps=1, progress_bar=False, tensorboard=False)
    assert f"cannot write the checkpoint {out / 'checkpoint.pth'}: ENOSPC: No space left on device" in str(info.value)
    assert len(handed) == 3 and _no_temp_files(out)
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 2  # the previous checkpoint, intact
    path, state = find_resume_checkpoint(out)
    assert path == out / "checkpoint.pth" and state["step"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "error" and "ENOSPC" in records[-1]["error"] and records[-1]["step"] == 3

    # space again for checkpoints, but not for metrics.json: the run resumes at step 2 and finishes training
    (out / "metrics.json").write_text('{"previous": 1}')
    full_disk("metrics.json", room=10)
    resumed = load_config("smoke", tiny_overrides(synth_root, out, 8, **{"train.epochs": 1, "train.eval_every": 0,
                                                                         "runtime.resume": "auto"}))
    with pytest.raises(OutputWriteError, match=rf"metrics file {out / 'metrics.json'}: ENOSPC"):
        fit(resumed, progress_bar=False, tensorboard=False)
    start = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "start"][-1]
    assert start["resumed_from"] == str(out / "checkpoint.pth") and start["step"] == 2
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 4
    assert (out / "metrics.json").read_text() == '{"previous": 1}' and _no_temp_files(out)


def test_eval_results_failing_mid_file_keep_the_previous_results(tmp_path, full_disk):
    from solq.evaluation.coco_eval import write_results_json

    entries = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9}] * 50
    write_results_json(None, tmp_path, ["bbox"], coco_results={"bbox": entries[:1]})
    full_disk("bbox_results.json", room=64)
    with pytest.raises(OutputWriteError, match=rf"results file {tmp_path / 'bbox_results.json'}: ENOSPC"):
        write_results_json(None, tmp_path, ["bbox"], coco_results={"bbox": entries})
    assert json.loads((tmp_path / "bbox_results.json").read_text()) == entries[:1] and _no_temp_files(tmp_path)


@pytest.mark.parametrize("name", ["report.html", "table3b_vector_loss_weight__smoke.png"])
def test_a_report_file_failing_mid_file_is_named_and_the_previous_report_stays(tmp_path, full_disk, name):
    from solq.workbench.report import build_report
    from test_workbench_report import EXPERIMENTS, _make_runs

    runs = _make_runs(tmp_path / "runs")
    first = build_report(runs, tmp_path / "out", scale="smoke", experiments_dir=EXPERIMENTS)
    target = next((tmp_path / "out").rglob(name))
    before = target.read_bytes()
    full_disk(name, room=256)
    with pytest.raises(OutputWriteError, match=rf"cannot write the report( figure)? {target}: ENOSPC"):
        build_report(runs, tmp_path / "out", scale="smoke", experiments_dir=EXPERIMENTS)
    assert target.read_bytes() == before and first["html"].is_file() and _no_temp_files(tmp_path / "out")

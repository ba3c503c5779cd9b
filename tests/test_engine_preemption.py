"""Preemption: SIGTERM/SIGUSR1 stop a run after the current step with a checkpoint of exactly that step, a resumed
run ends where an uninterrupted one does, every torchrun rank stops after the same step, and a second signal or
the grace period ends the process at once without leaving a partly written file."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from solq.config import load_config
from solq.engine.checkpoint import load_checkpoint
from solq.preemption import REPEAT_WINDOW_S, StopRequest
from test_engine_train import assert_same_final_weights, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _records(run: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if any(r.get("type") == "train" and r["step"] >= step for r in _records(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"{run}: step {step} never logged (exit status {proc.poll()})")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from solq.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 10, 4, 64, 0, progress=False)
    return root


def _overrides(root: Path, out: Path) -> list[str]:
    """10 images, batch 2, 2 epochs = 10 steps with dropout and random flips and scales; no periodic
    checkpoints, so a mid-epoch checkpoint can only come from the stop."""
    return tiny_overrides(root, out, 10, **{"train.epochs": 2, "train.eval_every": 0, "model.dropout": 0.1,
                                            "runtime.deterministic": "true"})


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "solq.cli", "train", "--config", "smoke", "--set", *_overrides(root, out),
            "--no-progress", *extra]


def test_sigterm_mid_epoch_checkpoints_that_step_and_resume_equals_an_uninterrupted_run(synth_root, tmp_path):
    from solq.engine.train import fit

    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen(_train_cmd(synth_root, victim_dir), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _wait_for_step(victim_dir, victim, 1)  # the signal lands in step 2 (3 or 4 on a busy machine): mid-epoch 0 of 5 steps
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 0, err[-3000:]

    records = _records(victim_dir)
    stopped = [r for r in records if r["type"] == "stopped"]
    assert len(stopped) == 1 and "end" not in [r["type"] for r in records]
    step = stopped[0]["step"]
    assert stopped[0]["signal"] == "SIGTERM" and 2 <= step <= 4 and stopped[0]["batch_in_epoch"] == step
    assert max(r["step"] for r in records if r["type"] == "train") == step  # nothing ran after the stop
    ckpt = load_checkpoint(victim_dir / "checkpoint.pth")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (step, 0, step)  # exactly that step
    assert f"SIGTERM: stopped after step {step}" in out and "--resume auto" in out
    assert not list(victim_dir.glob(".*.tmp")) and not (victim_dir / "metrics.json").exists()

    resumed = subprocess.Popen(_train_cmd(synth_root, victim_dir, "--resume", "auto"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # the uninterrupted reference runs here meanwhile (the same settings, on one thread as well)
    fit(load_config("smoke", _overrides(synth_root, tmp_path / "ref")), progress_bar=False, tensorboard=False)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    starts = [r for r in _records(victim_dir) if r["type"] == "start"]
    assert len(starts) == 2 and starts[1]["step"] == step
    assert_same_final_weights(tmp_path / "ref", victim_dir, 10, f"stopped after step {step}")


# A writer stuck in the middle of a file (a hung or very slow file system): only an immediate exit helps.
# (solq.files and solq.preemption need no torch: the process starts in a fraction of a second.)
_STUCK_WRITER = textwrap.dedent("""
    import sys, time
    from solq.files import write_atomic
    from solq.preemption import StopRequest

    path, grace = sys.argv[1], float(sys.argv[2])
    write_atomic(path, lambda f: f.write(b"the previous checkpoint"))
    StopRequest(grace_s=grace).install()

    def stuck(f):
        f.write(b"the first bytes of the next one")
        f.flush()
        print("writing", flush=True)
        while True:
            time.sleep(0.05)

    write_atomic(path, stuck)
""")


@pytest.mark.parametrize("how", ["second signal", "grace period"])
def test_a_second_signal_or_the_grace_period_exits_at_once_without_a_partial_file(tmp_path, how):
    grace = 60.0 if how == "second signal" else 1.0
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(tmp_path / "checkpoint.pth"), str(grace)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    assert [p.name for p in tmp_path.glob(".checkpoint.pth.*.tmp")]  # the partial file exists now
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    if how == "second signal":
        time.sleep(REPEAT_WINDOW_S + 0.2)
        assert proc.poll() is None  # the first signal only asked for a stop
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert ("second stop signal (SIGTERM)" if how == "second signal" else "stop_grace_s (1 s) ran out") in err
    assert "removed 1 partly written file" in err
    assert elapsed < (REPEAT_WINDOW_S + 5 if how == "second signal" else grace + 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary file left
    assert (tmp_path / "checkpoint.pth").read_bytes() == b"the previous checkpoint"  # intact


def test_a_repeat_within_the_window_is_the_same_request_and_a_later_one_exits(monkeypatch):
    import solq.preemption

    exits, cleanups = [], []
    # the real one also blocks every later rename, for good: right before os._exit, not in this test process
    monkeypatch.setattr(solq.preemption, "remove_partial_writes", lambda: cleanups.append(1) or [])
    stop = StopRequest(grace_s=0, exit=exits.append)
    assert not stop.requested and not stop.agreed()
    stop.handle(signal.SIGUSR1)
    stop.handle(signal.SIGTERM)  # e.g. torchrun passing on what the cluster also sent to every process
    assert stop.signal_name == "SIGUSR1" and exits == [] and stop.agreed() and stop.stopping
    stop._received_at -= REPEAT_WINDOW_S
    stop.handle(signal.SIGTERM)
    assert exits == [128 + signal.SIGUSR1] and cleanups == [1]


def test_install_hands_the_signals_back_afterwards():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    stop = StopRequest(grace_s=5).install()
    assert signal.getsignal(signal.SIGTERM) == stop.handle == signal.getsignal(signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.time() + 5
    while not stop.requested and time.time() < deadline:
        time.sleep(0.01)
    stop.uninstall()  # also cancels the grace timer, so this test process lives on
    assert stop.signal_name == "SIGUSR1" and stop._timer is None
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_train_exits_with_the_requested_status_after_a_stop(monkeypatch):
    from solq import cli
    from solq.engine import train

    result = {"metrics": {}, "output_dir": "x", "epoch": 0, "step": 3, "stopped": "SIGUSR1"}
    monkeypatch.setattr(train, "fit", lambda cfg, **kw: result)
    assert cli.main(["train", "--exit-code-on-stop", "3"]) == 3
    assert cli.main(["train"]) == 0
    result["stopped"] = None
    assert cli.main(["train", "--exit-code-on-stop", "3"]) == 0


# ------------------------------------------------------------------------------------------ torchrun
def _worker_of_rank(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker with RANK=rank (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {launcher_pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_signal_to_one_torchrun_rank_stops_every_rank_after_the_same_step(synth_root, tmp_path):
    out = tmp_path / "ddp"
    overrides = tiny_overrides(synth_root, out, 8, **{"train.epochs": 2, "train.eval_every": 0,
                                                      "train.batch_size": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "solq.cli",
           "train", "--config", "smoke", "--set", *overrides, "--no-progress"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(out, proc, 1)
    os.kill(_worker_of_rank(proc.pid, 1), signal.SIGUSR1)  # rank 0 gets nothing: it learns it from rank 1
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, text[-4000:]

    said = dict(re.findall(r"rank (\d): .*?stopped after step (\d+)", text))
    assert set(said) == {"0", "1"} and said["0"] == said["1"], text[-2000:]
    step = int(said["0"])
    stopped = [r for r in _records(out) if r["type"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == step < 8  # logged once, by rank 0
    assert stopped[0]["signal"] == "a signal on another rank"
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == step and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth"]  # one file, written once


# ------------------------------------------------------------------------------------ the SLURM script
_STUB_TRAINING = """#!{python}
import os, signal, sys, time
log = open(os.environ["STUB_LOG"], "a")
log.write("torchrun " + " ".join(sys.argv[1:]) + "\\n")
log.flush()
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.02)
log.write(f"training got {{signal.Signals(got[0]).name if got else 'nothing'}}\\n")
"""


def test_slurm_script_passes_the_time_limit_warning_on_and_requeues(tmp_path):
    """scripts/slurm_train.sh with srun/scontrol/torchrun stubs: USR1 to the batch shell reaches the training
    command, which ends with status 0 after its checkpoint; the script then requeues the job."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sh"
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {"srun": '#!/bin/sh\nexec "$@"\n',
             "scontrol": '#!/bin/sh\nif [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> "$STUB_LOG"; fi\n',
             "torchrun": _STUB_TRAINING.format(python=sys.executable)}
    for name, body in stubs.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1"}
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "torchrun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    calls = log.read_text().splitlines()
    assert calls[1:] == ["training got SIGUSR1", "scontrol requeue 42"], calls
    assert "--shutdown-timeout=110" in calls[0] and "train.stop_grace_s=90" in calls[0] and "--resume auto" in calls[0]

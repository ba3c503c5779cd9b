"""Training engine: parameter groups, sampling, a short train+eval run, non-finite loss, exact SIGKILL resume."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from solq.config import load_config
from solq.engine.builders import EpochSampler, SeededDataset
from tiny_overrides import RELEASE_LIKE

# 64-px synthetic scenes, a width-32 two-layer model: a training step takes well under a second on one core
TINY = ["data.synth_num_train=10", "data.max_images={n}", "data.synth_num_val=4", "data.synth_image_size=64",
        "data.train_scales=[48,64]", "data.max_size=64", "data.crop_resize_scales=[64]", "data.crop_min=40",
        "data.crop_max=64", "data.eval_size=64", "model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2",
        "model.num_queries=10", "model.vector_hidden_dim=32", "codec.resolution=32", "codec.num_coeffs=32",
        "runtime.num_threads=1", "runtime.device=cpu", "train.log_every=1"]


def tiny_overrides(root: Path, out: Path, num_train: int = 8, **extra) -> list[str]:
    return (RELEASE_LIKE + [o.format(n=num_train) for o in TINY] + [f"data.root={root}", f"runtime.output_dir={out}"]
            + [f"{k}={v}" for k, v in extra.items()])


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_final_weights(reference: Path, run: Path, steps: int, how: str) -> None:
    """The last checkpoints of two run folders are both at ``steps`` and hold the same parameters within 1e-6
    (``how`` names the interruption in a failure message)."""
    a = torch.load(reference / "checkpoint.pth", weights_only=True)
    b = torch.load(run / "checkpoint.pth", weights_only=True)
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=lambda m: f"{key} ({how}): {m}")


# ------------------------------------------------------------------------------------ optimiser groups
def test_param_groups_follow_the_release_recipe():
    from solq.engine.optim import build_optimizer, build_scheduler
    from solq.models import build_model

    cfg = load_config("smoke", RELEASE_LIKE + ["model.num_classes=4", "model.hidden_dim=32", "model.nheads=2",
                                "model.num_queries=5", "codec.resolution=16", "codec.num_coeffs=16"])
    model, _, _ = build_model(cfg)
    opt = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == pytest.approx(
        {"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-4 * 0.1})
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in groups.values())
    assert all("backbone.0" in names[id(p)] for p in groups["backbone"]["params"])
    assert all(any(k in names[id(p)] for k in ("sampling_offsets", "reference_points"))
               for p in groups["linear_proj"]["params"])
    listed = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable) and len(set(listed)) == len(listed)  # each once, frozen out
    assert len(listed) < len(list(model.parameters()))  # stem / layer1 are frozen
    default = {id(p) for p in groups["default"]["params"]}
    assert all(not any(k in n for k in ("backbone.0", "sampling_offsets", "reference_points"))
               for n, p in model.named_parameters() if id(p) in default)
    sched = build_scheduler(load_config("smoke", RELEASE_LIKE + ["train.lr_drop=2"]), opt)
    for _ in range(2):
        opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-5)


# ------------------------------------------------------------------------------------------ sampling
def test_one_process_batch_two_sees_what_two_processes_with_batch_one_see():
    single = list(EpochSampler(9, shuffle=True, seed=3, rank=0, world_size=1, pad=False))
    ranks = [EpochSampler(9, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    streams = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [5, 5]  # padded by repeating the head
    interleaved = [x for pair in zip(*streams) for x in pair]
    assert interleaved[:9] == single and interleaved[9] == single[0]
    other = EpochSampler(9, shuffle=True, seed=3)
    other.set_epoch(1)
    assert [i for _, i in other] != [i for _, i in single]  # reshuffled per epoch
    resumed = EpochSampler(9, shuffle=True, seed=3)
    resumed.set_epoch(1, start=4)
    full = EpochSampler(9, shuffle=True, seed=3)
    full.set_epoch(1)
    assert list(resumed) == list(full)[4:] and len(resumed) == 5


def test_augmentation_depends_only_on_seed_epoch_and_index():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3), random.random()

    ds = SeededDataset(Noise(), seed=7)
    torch.manual_seed(0)
    random.seed(0)
    before = torch.get_rng_state()
    a = ds[(2, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is untouched
    torch.manual_seed(123)
    b = ds[(2, 1)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(ds[(3, 1)][0], a[0]) and not torch.equal(ds[(2, 2)][0], a[0])


# ------------------------------------------------------------------------------- short run, in process
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from solq.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 10, 4, 64, 0, progress=False)
    return root


def test_short_train_and_eval_run_writes_log_checkpoints_and_metrics(synth_root, tmp_path):
    from solq.engine.checkpoint import load_checkpoint
    from solq.engine.train import fit

    out = tmp_path / "run"
    cfg = load_config("smoke", tiny_overrides(synth_root, out, 8, **{
        "train.epochs": 2, "train.batch_size": 1, "train.accumulate": 2, "train.save_every": 1}))
    result = fit(cfg, progress_bar=False, tensorboard=False)
    assert result["step"] == 8 and result["epoch"] == 2  # 8 images / (1 x 2 accumulated) x 2 epochs
    names = sorted(p.name for p in out.iterdir())
    assert {"config.yaml", "log.jsonl", "metrics.json", "checkpoint.pth", "checkpoint_epoch0001.pth",
            "checkpoint_epoch0002.pth"} <= set(names)
    records = _records(out)
    types = [r["type"] for r in records]
    assert types[0] == "start" and types[-1] == "end" and types.count("epoch") == 2 and types.count("eval") == 2
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["grad_norm"] > 0 and "loss_vector" in r and "loss_ce_0" in r for r in train)
    assert train[0]["lr"] == pytest.approx({"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5})
    metrics = json.loads((out / "metrics.json").read_text())
    for iou in ("bbox", "segm"):
        assert set(metrics[iou]) >= {"AP", "AP50", "AP75", "AR100"} and 0 <= metrics[iou]["AR100"] <= 1
    assert metrics["num_images"] == 4 and metrics["loss"]["loss"] > 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 0
    assert ckpt["config"]["model"]["num_classes"] == result["num_classes"] > 0  # taken from the data
    assert cfg.model.num_classes == 0  # returned, not written into the caller's config
    assert ckpt["categories"] and ckpt["lr_scheduler"]["last_epoch"] == 2 and ckpt["code_version"]
    assert load_config(out / "config.yaml").to_dict() == ckpt["config"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(synth_root, tmp_path, monkeypatch):
    from solq.engine.checkpoint import load_checkpoint
    from solq.engine.train import NonFiniteLossError, fit
    from solq.models.criterion import SetCriterion

    calls = {"n": 0}
    original = SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training step
            losses["loss_bbox_0"] = losses["loss_bbox_0"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    out = tmp_path / "run"
    cfg = load_config("smoke", tiny_overrides(synth_root, out, 8, **{"train.epochs": 1}))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*loss_bbox_0=nan.*left unchanged") as info:
        fit(cfg, save_every_steps=1, progress_bar=False, tensorboard=False)
    terms = info.value.terms
    assert info.value.step == 3 and math.isnan(terms["loss_bbox_0"]) and math.isfinite(terms["loss_ce"])
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 2
    assert _records(out)[-1]["type"] == "error"


# ----------------------------------------------------------------------------- SIGKILL and exact resume
def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides(root, out, 10, **{"train.epochs": 2, "train.eval_every": 0, "model.dropout": 0.1,
                                                 "runtime.deterministic": "true"})
    return [sys.executable, "-m", "solq.cli", "train", "--config", "smoke", "--set", *overrides,
            "--save-every-steps", "1", "--no-progress", *extra]


def _steps_logged(run: Path) -> int:
    try:
        return max((r.get("step", 0) for r in _records(run) if r["type"] == "train"), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def test_sigkill_at_an_arbitrary_step_then_resume_equals_an_uninterrupted_run(synth_root, tmp_path):
    """10 images, batch 2, 2 epochs = 10 steps with dropout (its RNG must be restored) and random flips and
    scales; the kill lands anywhere after step k (mid-step, mid-checkpoint-write, ...)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_after = random.randint(2, 7)
    reference = subprocess.Popen(_train_cmd(synth_root, tmp_path / "ref"), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen(_train_cmd(synth_root, victim_dir), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _steps_logged(victim_dir) < kill_after and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert "end" not in [r["type"] for r in _records(victim_dir)]

    resumed = subprocess.run(_train_cmd(synth_root, victim_dir, "--resume", "auto"), env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, ref_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_err[-3000:]

    starts = [r for r in _records(victim_dir) if r["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] and 0 < starts[1]["step"] < 10, starts[1]
    assert_same_final_weights(tmp_path / "ref", victim_dir, 10, f"killed after step {kill_after}")
    # same losses step by step, before and after the kill
    losses = [{r["step"]: r["loss"] for r in _records(run) if r["type"] == "train"}
              for run in (tmp_path / "ref", victim_dir)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 10


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_the_scaler(synth_root, tmp_path, amp):
    from solq.engine.checkpoint import load_checkpoint
    from solq.engine.train import fit

    out = tmp_path / amp
    cfg = load_config("smoke", tiny_overrides(synth_root, out, 4, **{
        "train.epochs": 1, "train.batch_size": 2, "train.amp": amp, "train.eval_every": 100}))
    result = fit(cfg, progress_bar=False, tensorboard=False)
    assert result["step"] == 2
    train = [r for r in _records(out) if r["type"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    scaler = load_checkpoint(out / "checkpoint.pth")["scaler"]
    if amp == "fp16":  # the gradient scaler is on and its state is in the checkpoint
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:  # bf16 needs no loss scaling
        assert scaler == {} or not scaler.get("_enabled", False)


def test_compiled_training_matches_eager_and_keeps_the_state_dict_names(synth_root, tmp_path):
    """runtime.compile compiles the forward in place: the same losses, the same checkpoint keys; a checkpoint
    loaded with the option gets a compiled forward. The "eager" backend (tracing without code generation) keeps
    the test fast; inductor is measured by ``solq bench`` (README)."""
    from solq.engine.checkpoint import build_from_checkpoint, load_checkpoint
    from solq.engine.train import fit

    losses, keys = {}, {}
    for backend in ("", "eager"):
        out = tmp_path / (backend or "plain")
        torch._dynamo.reset()
        cfg = load_config("smoke", tiny_overrides(synth_root, out, 4, **{
            "train.epochs": 1, "train.batch_size": 2, "train.eval_every": 100, "runtime.compile": backend}))
        fit(cfg, progress_bar=False, tensorboard=False)
        losses[backend] = [r["loss"] for r in _records(out) if r["type"] == "train"]
        keys[backend] = sorted(load_checkpoint(out / "checkpoint.pth")["model"])
    assert len(losses[""]) == 2 and losses["eager"] == pytest.approx(losses[""], rel=1e-5)
    assert keys["eager"] == keys[""] and not any("_orig_mod" in k for k in keys["eager"])
    _, model, *_ = build_from_checkpoint(tmp_path / "eager" / "checkpoint.pth", overrides=["runtime.compile=eager"])
    assert model._compiled_call_impl is not None  # nn.Module.compile's hook (private, no public accessor)
    _, model, *_ = build_from_checkpoint(tmp_path / "eager" / "checkpoint.pth")
    assert model._compiled_call_impl is None


# ------------------------------------------------------------------------------------ codec fitting
def test_a_pca_codec_is_fitted_by_the_studys_sampler_and_saved_for_the_run(tmp_path):
    from solq.coding import build_codec_from_config, study
    from solq.engine.builders import build_dataset, fit_codec

    cfg = load_config("smoke", tiny_overrides(tmp_path / "data", tmp_path / "run", **{
        "codec.name": "pca", "codec.num_coeffs": 8, "codec.fit_max_masks": 12, "codec.fit_seed": 3}))
    train = build_dataset(cfg, "train", transforms="none")
    codec, file = fit_codec(cfg, train, tmp_path / "run")
    assert file == str(tmp_path / "run" / "codec.pt") and Path(file).is_file()
    assert cfg.codec.file == "" and codec.is_fitted and codec.num_fit_samples == 12
    probe = study.collect_crops(train.coco, cfg.codec.resolution, max_masks=0).float()
    same = study.fit_codec(build_codec_from_config(cfg.codec), train.coco, image_ids=train.ids, max_masks=12, seed=3)
    torch.testing.assert_close(codec.encode(probe), same.encode(probe))  # the study's sampler and setting
    other = study.fit_codec(build_codec_from_config(cfg.codec), train.coco, image_ids=train.ids, max_masks=12, seed=4)
    assert not torch.allclose(codec.encode(probe), other.encode(probe), atol=1e-4)  # and the seed is used
    again, _ = fit_codec(cfg, train, tmp_path / "run")  # a resumed run loads the saved fit
    torch.testing.assert_close(again.encode(probe), codec.encode(probe))


def test_vector_statistics_are_the_training_codes_and_travel_with_the_checkpoint(synth_root, tmp_path):
    from solq.coding import build_codec_from_config, study
    from solq.engine.builders import build_dataset, vector_statistics
    from solq.engine.checkpoint import build_from_checkpoint
    from solq.engine.train import fit

    out = tmp_path / "run"
    cfg = load_config("smoke", tiny_overrides(synth_root, out, 4, **{
        "model.vector_standardize": True, "train.epochs": 1, "codec.fit_max_masks": 0}))
    train = build_dataset(cfg, "train", transforms="none")
    codec = build_codec_from_config(cfg.codec)
    mean, std = vector_statistics(cfg, train, codec)
    codes = codec.encode(study.collect_crops(train.coco, codec.resolution, image_ids=train.ids, max_masks=0).float())
    torch.testing.assert_close(mean, codes.double().mean(0).float())
    torch.testing.assert_close(std, codes.double().std(0).clamp(min=1e-3).float())
    assert std.max() / std.min() > 5  # DCT coefficients differ in scale: the point of standardising
    fit(cfg, progress_bar=False, tensorboard=False)
    state = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    torch.testing.assert_close(state["vector_mean"], mean)
    torch.testing.assert_close(state["vector_std"], std)
    _, model, _, _, _ = build_from_checkpoint(out / "checkpoint.pth")
    torch.testing.assert_close(model.vector_std, std)  # evaluation rebuilds the same head

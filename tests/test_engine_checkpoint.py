"""Checkpoints: atomic writes under SIGKILL, corrupt-file skipping, weights-only RNG round trip, release files."""
import argparse
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from solq.config import load_config
from solq.engine.checkpoint import (FORMAT, CheckpointError, build_from_checkpoint, capture_rng_state,
                                    config_for_checkpoint, epoch_checkpoint_name, find_resume_checkpoint,
                                    is_release_checkpoint, list_checkpoints, load_checkpoint, restore_rng_state,
                                    save_checkpoint)
from tiny_overrides import RELEASE_LIKE


pytestmark = pytest.mark.usefixtures("one_thread")


class _Custom:
    pass


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"format": FORMAT, "model": {"w": torch.randn(64, 64, generator=g)}, "step": step}


def test_kill_during_writes_always_leaves_a_loadable_file(tmp_path):
    """A writer overwriting checkpoint.pth in a loop is SIGKILLed at a random moment: the file loads and
    holds one complete state; a temporary file may remain but is never taken for a checkpoint."""
    script = textwrap.dedent(f"""
        import torch
        from solq.engine.checkpoint import save_checkpoint
        step = 0
        while True:
            step += 1
            g = torch.Generator().manual_seed(step)
            save_checkpoint({{"format": "{FORMAT}", "model": {{"w": torch.randn(256, 1024, generator=g)}},
                             "step": step}}, r"{tmp_path / 'checkpoint.pth'}")
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # at least three complete writes, then kill mid-stream
            assert proc.stdout.readline(), "writer died"
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.2))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    g = torch.Generator().manual_seed(state["step"])
    assert torch.equal(state["model"]["w"], torch.randn(256, 1024, generator=g))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint.pth"]
    found = find_resume_checkpoint(tmp_path)
    assert found is not None and found[1]["step"] == state["step"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(_state(1), path)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # temp file removed


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path):
    older = save_checkpoint(_state(5), tmp_path / epoch_checkpoint_name(1))
    newest = save_checkpoint(_state(9), tmp_path / "checkpoint.pth")
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))  # make the order unambiguous
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint.pth"):
        load_checkpoint(newest)
    with pytest.warns(RuntimeWarning, match="skipping invalid checkpoint.*checkpoint.pth"):
        path, state = find_resume_checkpoint(tmp_path)
    assert path == older and state["step"] == 5
    assert find_resume_checkpoint(tmp_path / "missing") is None


def test_non_weights_only_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": _Custom()}, path)  # needs full unpickling of a test class
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "no_model.pth")
    with pytest.raises(CheckpointError, match="'model'"):
        load_checkpoint(tmp_path / "no_model.pth")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint({"model": {}, "rng": capture_rng_state()}, tmp_path / "c.pth")
    expected = (torch.rand(5), np.random.standard_normal(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    again = (torch.rand(5), np.random.standard_normal(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    assert torch.equal(expected[0], again[0])
    np.testing.assert_array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def _tiny_cfg(**extra):
    overrides = ["model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2", "model.num_queries=6",
                 "model.vector_hidden_dim=32", "model.enc_layers=1", "model.dec_layers=2", "model.num_classes=5",
                 "codec.resolution=32", "codec.num_coeffs=24"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("smoke", RELEASE_LIKE + overrides)  # the release layout: a ResNet, frozen BN


def test_release_checkpoint_is_detected_and_mapped(tmp_path):
    """`solq eval` on an authors'-format file: no 'config', release key names; weights go through the mapper
    and the rebuilt model gives the same outputs."""
    from solq.models import build_model
    from solq.models.official import to_official_state_dict

    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    # as the release writes it: weights under 'model', argparse args (the mapper reads nheads from them)
    release = {"model": to_official_state_dict(model), "epoch": 49, "args": argparse.Namespace(nheads=2)}
    assert is_release_checkpoint(release) and not is_release_checkpoint({"model": {}, "config": {}})
    torch.save(release, tmp_path / "authors.pth")
    loaded_cfg, rebuilt, _, _, categories = build_from_checkpoint(tmp_path / "authors.pth")
    assert categories == {} and loaded_cfg.model.hidden_dim == 32 and loaded_cfg.model.num_queries == 6
    x, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        a, b = model.eval()(x, mask), rebuilt(x, mask)
    for key in ("pred_logits", "pred_boxes", "pred_vectors"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_config_for_checkpoint_keeps_model_and_codec_of_the_weights():
    saved = _tiny_cfg().to_dict()
    cfg = config_for_checkpoint(saved, "smoke", ["eval.topk=7"])
    assert cfg.model.hidden_dim == 32 and cfg.codec.num_coeffs == 24 and cfg.eval.topk == 7
    assert config_for_checkpoint(saved).to_dict() == saved


def test_stored_config_without_new_model_keys_keeps_its_trained_behaviour():
    """A config written before model.sqr_mask_features existed ran the encoder output; new configs default to the
    release's input-projected level, and a stored value or an override is kept as given."""
    new = load_config("smoke", ["model.mode=sqr"]).to_dict()
    assert new["model"]["sqr_mask_features"] == "input_proj"
    assert config_for_checkpoint(new).model.sqr_mask_features == "input_proj"
    old = {**new, "model": {k: v for k, v in new["model"].items() if k != "sqr_mask_features"}}
    assert config_for_checkpoint(old).model.sqr_mask_features == "encoder"
    assert config_for_checkpoint(old, "smoke").model.sqr_mask_features == "encoder"  # model section: the weights'
    assert config_for_checkpoint(old, None, ["model.sqr_mask_features=input_proj"]).model.sqr_mask_features == \
        "input_proj"

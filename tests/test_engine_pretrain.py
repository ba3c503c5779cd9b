"""Backbone pretraining on synthetic scenes: targets, a short run, the file format, loading by name."""
import math

import pytest
import torch

from solq.config import load_config
from solq.engine.pretrain import IGNORE, instance_targets, pretrain_backbone, semantic_targets
from solq.models import build_detector, pretrained
from solq.models.backbone import Backbone, load_backbone_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_semantic_targets_paint_labels_and_ignore_padding():
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 3, 4] = True
    t = [{"masks": masks, "labels": torch.tensor([3, 7])}, {"masks": torch.zeros(0, 2, 3, dtype=torch.bool),
                                                            "labels": torch.zeros(0, dtype=torch.int64)}]
    sem = semantic_targets(t, (6, 5), "cpu")
    assert sem.shape == (2, 6, 5)
    assert (sem[0, :2, :2] == 3).all() and sem[0, 3, 4] == 7 and sem[0, 2, 2] == 0
    assert (sem[0, 4:] == IGNORE).all()  # rows below the image are padding
    assert (sem[1, :2, :3] == 0).all() and (sem[1, 2:] == IGNORE).all() and (sem[1, :, 3:] == IGNORE).all()


def test_instance_targets_peak_at_centres_and_give_box_sizes():
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[0, 0:16, 0:16] = True    # a 16x16 square at the top left: centre (8, 8) -> cell (1, 1) at stride 8
    masks[1, 16:32, 16:48] = True  # a 32x16 box: centre (32, 24) -> between cells
    t = [{"masks": masks, "boxes_xyxy": torch.tensor([[0., 0, 16, 16], [16, 16, 48, 32]])}]
    heat, size, has = instance_targets(t, (40, 48), 8, "cpu")
    assert heat.shape == (1, 5, 6) and size.shape == (1, 2, 5, 6)
    # cell centres are at 4, 12, 20, ...: cells (0,0),(0,1),(1,0),(1,1) are equally near (8, 8)
    # sigma = max(side / 6, stride / 2) = 4 px and the distance is sqrt(32): exp(-32 / 32)
    assert heat[0, 0, 0] == pytest.approx(heat[0, 1, 1]) and heat[0, 0, 0].item() == pytest.approx(math.exp(-1), rel=1e-5)
    assert heat[0, 0, 3] < 1e-3
    assert heat[0, 4].max() < 0.05  # the padded row is far from every centre
    assert has[0, :2, :2].all() and not has[0, 0, 3] and not has[0, 4].any()
    torch.testing.assert_close(size[0, :, 0, 0], torch.tensor([16 / 48, 16 / 32]))
    torch.testing.assert_close(size[0, :, 3, 5], torch.tensor([32 / 48, 16 / 32]))


def test_short_pretraining_writes_a_loadable_file(tmp_path):
    out = tmp_path / "bb.pt"
    meta = pretrain_backbone(out, data_root=str(tmp_path / "scenes"), num_train=16, num_val=4, image_size=64,
                             train_size=64, steps=3, batch_size=4, progress_bar=False)
    assert 0.0 <= meta["pixel_accuracy"] <= 1.0 and meta["num_images"] == 4 and meta["steps"] == 3
    state = torch.load(out, weights_only=True)
    assert state["format"] == "solq-backbone-1" and state["arch"] == "small"
    cfg = load_config("smoke", ["model.backbone=small", "model.backbone_norm=batch", "model.freeze_stages=0",
                                f"model.backbone_weights={out}", "model.num_classes=9"])
    model = build_detector(cfg)
    body = model.backbone[0].body.state_dict()
    for k, v in state["state_dict"].items():
        assert torch.equal(body[k], v), k
    # a checkpoint rebuild skips the file (it is loaded from the checkpoint instead)
    cfg2 = load_config("smoke", ["model.backbone=small", "model.backbone_norm=batch", "model.freeze_stages=0",
                                 "model.backbone_weights=/nonexistent.pt", "model.num_classes=9"])
    build_detector(cfg2, initial_weights=False)
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        build_detector(cfg2)
    with pytest.raises(ValueError, match="norm"):
        load_backbone_weights(Backbone("small", norm="group", freeze_stages=0), out, arch="small")
    with pytest.raises(ValueError, match="resnet18"):
        load_backbone_weights(Backbone("resnet18", norm="batch", freeze_stages=0), out, arch="resnet18")


def test_shipped_names():
    with pytest.raises(FileNotFoundError, match="synthetic-small"):
        pretrained.path("no-such-weights")
    for name in pretrained.names():
        state = torch.load(pretrained.path(name), weights_only=True)
        assert isinstance(state, dict) and "format" in state
        assert pretrained.path(name).stat().st_size <= 15 * 2 ** 20

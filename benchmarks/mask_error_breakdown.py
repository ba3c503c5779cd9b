"""Where does mask quality go? Mean mask IoU (at the model's input size) of the val objects, each Hungarian-matched
to a query of the last decoder layer, with: normal (predicted code in the predicted box), oracle_vec (ground-truth
code in the predicted box), oracle_box (predicted code in the ground-truth box) and codec_only (ground-truth code in
the ground-truth box: the code's own loss). A UQR (vector) model only.

    python benchmarks/mask_error_breakdown.py CHECKPOINT [DATA_ROOT]
"""
import sys

import torch
from torchvision.ops import box_convert
from solq.engine.checkpoint import build_from_checkpoint
from solq.engine.builders import build_dataset, build_val_loader
from solq.coding import crop_to_box
from solq.coding.geometry import paste_in_image
torch.set_num_threads(1)
overrides = [f"data.root={sys.argv[2]}"] if len(sys.argv) > 2 else []
cfg, model, criterion, post, _ = build_from_checkpoint(sys.argv[1], overrides=overrides)
codec = criterion.codec if getattr(criterion, "codec", None) is not None else post.codec
loader = build_val_loader(build_dataset(cfg, "val"), cfg)
sums = {k: [] for k in ("normal", "oracle_vec", "oracle_box", "codec_only")}
l1 = []
def iou(a, b):
    inter = (a & b).flatten(1).sum(1).float(); union = (a | b).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)
with torch.no_grad():
    for batch in loader:
        out = model(batch.images, batch.mask)
        idx = criterion.matcher({k: out[k] for k in ("pred_logits", "pred_boxes")}, batch.targets)
        H, W = batch.images.shape[-2:]
        for b, (qi, ti) in enumerate(idx):
            t = batch.targets[b]
            if len(ti) == 0: continue
            gm = t["masks"][ti].bool(); gb = t["boxes_xyxy"][ti].float()
            h, w = [int(v) for v in t["size"]]
            pb = box_convert(out["pred_boxes"][b, qi], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
            gv = codec.encode(crop_to_box(gm, gb, codec.resolution)).float()
            pv = out["pred_vectors"][b, qi].float()
            l1.append((pv - gv).abs().mean(1))
            gm = gm[:, :h, :w]
            for name, vec, box in (("normal", pv, pb), ("oracle_vec", gv, pb), ("oracle_box", pv, gb), ("codec_only", gv, gb)):
                m = paste_in_image(codec.binarize(codec.decode(vec)).float(), box, (h, w))
                sums[name].append(iou(m, gm))
print({k: round(float(torch.cat(v).mean()), 3) for k, v in sums.items()}, "vector L1 per coef", round(float(torch.cat(l1).mean()), 3), "objects", len(torch.cat(l1)))

"""The main job behind ``make demo``.

Current stage (foundation): generate the synthetic scenes and evaluate their ground truth against itself,
printing the COCO table. This proves the data and evaluation path end to end on a fresh clone; the
workbench issue replaces it with training, the mask-coding study and the compiled report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO


def ground_truth_as_predictions(coco: COCO) -> list[dict]:
    """Turn the non-crowd annotations of ``coco`` into per-image predictions with score 1.

    Returns a list of dicts {image_id, boxes [K,4] xyxy, scores [K], labels [K], masks bool [K,H,W]}.
    """
    preds = []
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool) if anns else \
            np.zeros((0, info["height"], info["width"]), bool)
        preds.append({"image_id": image_id, "boxes": boxes, "scores": np.ones(len(anns)),
                      "labels": np.array([a["category_id"] for a in anns], dtype=np.int64), "masks": masks})
    return preds


def run_demo(out_dir: str | Path) -> Path:
    """Generate a small synthetic set into ``out_dir`` and evaluate GT against itself.

    Returns the path of the written metrics JSON.
    """
    from solq.data.synthetic import generate
    from solq.evaluation import evaluate_coco, format_table

    out_dir = Path(out_dir)
    paths = generate(out_dir / "synthetic", num_train=32, num_val=16, image_size=256, seed=0)
    coco = COCO(str(paths["val_annotations"]))
    results = evaluate_coco(coco, ground_truth_as_predictions(coco))
    print(format_table(results))
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(results, indent=2))
    return metrics


__all__ = ["run_demo", "ground_truth_as_predictions"]

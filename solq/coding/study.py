"""Training-free reconstruction study: how much does each mask coding lose? (paper Table 3a/3d/3e)

Every ground-truth mask of a COCO set is replaced by

    paste_in_image(codec.binarize(codec.decode(codec.encode(crop_to_box(mask, box, N)))), box, (H, W))

in its own GT box, and scored against the ground truth: mean mask IoU over the non-crowd instances and
COCO mask AP (``solq.evaluation.evaluate_coco``; each reconstruction is a detection with score 1 and the
GT category; crowd annotations are not predicted and stay ignore regions). This is the upper bound that
the coding allows a perfect network. ``codec=None`` measures the crop + paste resampling alone.

Data come straight from a COCO instances JSON (``solq.data.coco.decode_masks``); image files are not needed.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from solq.config import CodecConfig
from solq.data import samples_dir
from solq.data.coco import decode_masks
from solq.evaluation import evaluate_coco

from .base import Codec, build_codec
from .geometry import crop_to_box, paste_in_image

__all__ = ["resolve_coco", "load_coco", "image_ground_truth", "collect_crops", "fit_codec", "code_statistics",
           "make_codec", "reconstruct", "mask_iou", "run_study", "reconstruction_study", "StudyResult", "comparison_settings",
           "resolution_sweep_settings", "dimension_sweep_settings", "format_table", "coding_metric_keys",
           "DEFAULT_SPECS"]

# Table 3a settings: every coding at the paper's N = 128 and n_k = 256, except flatten (28x28 = 784-d).
DEFAULT_SPECS: dict[str, dict[str, Any]] = {
    "dct": {"name": "dct", "resolution": 128, "num_coeffs": 256},
    "pca": {"name": "pca", "resolution": 128, "num_coeffs": 256},
    "sparse": {"name": "sparse", "resolution": 128, "num_coeffs": 256},
    "flatten": {"name": "flatten"},
}


FIT_MAX_MASKS = CodecConfig.fit_max_masks  # one default for every codec fit (config: codec.fit_max_masks)


# ---- data -----------------------------------------------------------------------------------------------
def resolve_coco(dataset: str | Path, split: str = "val") -> tuple[Path, Path | None]:
    """Find the instances JSON (and image folder) of a COCO-format dataset.

    Args:
        dataset: "samples" (the shipped samples, ``solq.data.samples_dir()``), a JSON file, or a root with
            ``annotations/instances_{split}.json`` (or ``instances_{split}2017.json``) and ``images/{split}``
            (or ``{split}2017``).
        split: "train" | "val" | ... (ignored for "samples" and JSON files).
    Returns:
        (annotation file, image folder or None when absent). Raises FileNotFoundError naming what is missing.
    """
    if str(dataset) == "samples":
        root = samples_dir()
        return root / "instances.json", root / "images"
    path = Path(dataset).expanduser()
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {str(dataset)!r}: no such file or folder")
    candidates = [path / "annotations" / f"instances_{split}.json",
                  path / "annotations" / f"instances_{split}2017.json", path / f"instances_{split}.json"]
    ann = next((c for c in candidates if c.is_file()), None)
    if ann is None:
        raise FileNotFoundError(f"dataset {str(dataset)!r}, split {split!r}: none of "
                                f"{[str(c.relative_to(path)) for c in candidates]} exists")
    images = next((d for d in (path / "images" / split, path / f"{split}2017", path / "images" / f"{split}2017")
                   if d.is_dir()), None)
    return ann, images


def load_coco(ann_file: str | Path) -> COCO:
    """pycocotools COCO of an instances JSON, without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def image_ground_truth(coco: COCO, image_id: int, ann_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Non-crowd instances of one image: {masks bool [n,H,W], boxes float64 [n,4] xyxy (the COCO bbox),
    labels int64 [n], ann_ids int64 [n], height, width}. ``ann_ids`` restricts to those annotations."""
    img = coco.imgs[image_id]
    h, w = int(img["height"]), int(img["width"])
    ids = coco.getAnnIds(imgIds=[image_id]) if ann_ids is None else list(ann_ids)
    anns = [a for a in coco.loadAnns(ids) if not a.get("iscrowd", 0)]
    if anns:
        masks = decode_masks([a["segmentation"] for a in anns], h, w).bool()
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
    else:
        masks = torch.zeros(0, h, w, dtype=torch.bool)
        boxes = torch.zeros(0, 4, dtype=torch.float64)
    return {"masks": masks, "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "ann_ids": torch.tensor([a["id"] for a in anns], dtype=torch.int64), "height": h, "width": w}


def _select_images(coco: COCO, image_ids: Sequence[int] | None, max_images: int) -> list[int]:
    ids = sorted(coco.getImgIds()) if image_ids is None else [int(i) for i in image_ids]
    return ids[:max_images] if max_images and max_images > 0 else ids


def collect_crops(coco: COCO, resolution: int, *, image_ids: Sequence[int] | None = None, max_images: int = 0,
                  max_masks: int = FIT_MAX_MASKS, seed: int = 0) -> torch.Tensor:
    """Non-crowd GT masks cropped to their boxes: bool [K,N,N] (N = resolution), for fitting codecs.

    At most ``max_masks`` annotations (drawn at random with ``seed``; 0 = all) are rasterised.
    """
    ids = _select_images(coco, image_ids, max_images)
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=ids)) if not a.get("iscrowd", 0)]
    if max_masks and len(anns) > max_masks:
        keep = np.random.default_rng(seed).choice(len(anns), size=max_masks, replace=False)
        anns = [anns[i] for i in sorted(keep)]
    by_image: dict[int, list[int]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a["id"])
    crops = [crop_to_box(gt["masks"], gt["boxes"], resolution).bool()
             for gt in (image_ground_truth(coco, i, a) for i, a in by_image.items())]
    return torch.cat(crops) if crops else torch.zeros(0, resolution, resolution, dtype=torch.bool)


def fit_codec(codec: Codec, coco: COCO, *, image_ids: Sequence[int] | None = None, max_images: int = 0,
              max_masks: int = FIT_MAX_MASKS, seed: int = 0) -> Codec:
    """Fit a pca/sparse codec on the GT crops of ``coco`` (see ``collect_crops``); other codecs are returned as is."""
    if codec.requires_fit:
        crops = collect_crops(coco, codec.resolution, image_ids=image_ids, max_images=max_images,
                              max_masks=max_masks, seed=seed)
        codec.fit(crops.float(), seed=seed)
    return codec


def make_codec(spec: Codec | str | Mapping[str, Any] | None, *, fit_coco: COCO | None = None,
               fit_max_images: int = 0, fit_max_masks: int = FIT_MAX_MASKS, seed: int = 0) -> Codec | None:
    """A codec from a spec: a Codec, a name, or {"name": ..., **params}; None stays None (crop + paste only).

    Unfitted pca/sparse codecs are fitted on ``fit_coco`` (required for them).
    """
    if spec is None or isinstance(spec, Codec):
        codec = spec
    elif isinstance(spec, str):
        codec = build_codec(spec)
    elif isinstance(spec, Mapping):
        params = dict(spec)
        if "name" not in params:
            raise ValueError(f"codec spec {spec!r}: missing key 'name'")
        codec = build_codec(params.pop("name"), **params)
    else:
        raise TypeError(f"codec spec must be a Codec, a name or a mapping, got {type(spec).__name__}")
    if codec is not None and not codec.is_fitted:
        if fit_coco is None:
            raise ValueError(f"codec {codec.name!r} needs fitting: pass fit_coco (a COCO of training masks)")
        fit_codec(codec, fit_coco, max_images=fit_max_images, max_masks=fit_max_masks, seed=seed)
    return codec


def code_statistics(codec: Codec, coco: COCO, *, image_ids: Sequence[int] | None = None, max_masks: int = FIT_MAX_MASKS,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coefficient mean and standard deviation of ``codec.encode`` over the GT crops of ``coco`` (the
    sampler of :func:`collect_crops`): two float32 [codec.dim] tensors, the std clamped below at 1e-3 (a constant
    coefficient must not scale the vector head to zero). Raises ValueError with fewer than 2 masks."""
    crops = collect_crops(coco, codec.resolution, image_ids=image_ids, max_masks=max_masks, seed=seed)
    if len(crops) < 2:
        raise ValueError(f"code statistics need at least 2 non-crowd masks, found {len(crops)}")
    codes = torch.cat([codec.encode(chunk.float()).double() for chunk in crops.split(4096)])
    return codes.mean(0).float(), codes.std(0).clamp(min=1e-3).float()


# ---- reconstruction ---------------------------------------------------------------------------------------
def reconstruct(codec: Codec | None, masks: torch.Tensor, boxes_xyxy: torch.Tensor, image_hw: tuple[int, int],
                *, resolution: int = 128) -> torch.Tensor:
    """GT masks bool [n,H,W] + boxes [n,4] -> reconstructions bool [n,H,W] through the codec.

    ``codec=None``: crop at ``resolution`` and paste back, no coding (the resampling loss alone).
    """
    n = codec.resolution if codec is not None else resolution
    return _code_and_paste(codec, crop_to_box(masks, boxes_xyxy, n), boxes_xyxy, image_hw)


def _code_and_paste(codec: Codec | None, crops: torch.Tensor, boxes_xyxy: torch.Tensor,
                    image_hw: tuple[int, int]) -> torch.Tensor:
    if codec is not None:
        crops = codec.binarize(codec.decode(codec.encode(crops)))
    return paste_in_image(crops, boxes_xyxy, image_hw)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair IoU of bool masks a, b [n,H,W] -> float64 [n] (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1, dtype=torch.float64)
    union = (a | b).flatten(1).sum(1, dtype=torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class _RLEMasks:
    """Masks [K,H,W] kept as COCO RLE, decoded only when evaluate_coco converts them (np.asarray).

    Keeps a whole study in memory for large sets (a bool mask per instance at full size would not fit).
    """

    def __init__(self, masks: torch.Tensor):
        self.shape = tuple(masks.shape)
        m = masks.cpu().numpy()
        self.rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8))) if len(m) else []

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        if not self.rles:
            return np.zeros(self.shape, dtype=dtype or bool)
        out = mask_utils.decode(self.rles).transpose(2, 0, 1).astype(bool)
        return out if dtype is None else out.astype(dtype)


@dataclass
class StudyResult:
    """``metrics``: flat {"<setting>/<metric>": float}; ``examples`` (smallest object first): per example
    annotation a dict with image_id, ann_id, category_id, box, region (x0, y0, x1, y1 pixel window),
    ``gt`` bool [h,w] and ``recon`` {setting: bool [h,w]} over that window."""

    metrics: dict[str, float] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)


def _pick_examples(coco: COCO, image_ids: Sequence[int], count: int) -> set[int]:
    """``count`` non-crowd annotation ids spread evenly over the sorted object areas (small to large)."""
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=list(image_ids))) if not a.get("iscrowd", 0)]
    if count <= 0 or not anns:
        return set()
    anns.sort(key=lambda a: (a["area"], a["id"]))
    picks = np.linspace(0, len(anns) - 1, num=min(count, len(anns))).round().astype(int)
    return {anns[i]["id"] for i in picks}


def _example_region(box: torch.Tensor, h: int, w: int, margin: float = 0.15) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box.tolist()
    mx, my = margin * (x1 - x0) + 2, margin * (y1 - y0) + 2
    return (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my))))


def run_study(codecs: Mapping[str, Codec | None], coco: COCO, *, image_ids: Sequence[int] | None = None,
              max_images: int = 0, resolution: int = 128, num_examples: int = 0,
              device: str | torch.device = "cpu", progress: bool = True) -> StudyResult:
    """Reconstruct every non-crowd GT mask with each codec and score it (one pass over the images).

    Args:
        codecs: {setting name: fitted Codec, or None for crop + paste at ``resolution`` without coding}.
        coco: ground truth (pycocotools COCO, crowd annotations included).
        image_ids / max_images: images to use (default all, sorted by id; max_images > 0 keeps the first ones).
        num_examples: annotations (spread over sizes) whose crops are returned for a figure.
        device: where crops are coded and pasted.
    Returns:
        StudyResult; metrics per setting s: ``s/mask_iou`` (mean over instances), ``s/mask_AP``, ``s/mask_AP50``,
        ``s/mask_AP75``, ``s/mask_APs``, ``s/mask_APm``, ``s/mask_APl`` (fractions; -1 = no object of that
        size), ``s/seconds`` (crop + coding + paste time; a crop shared by settings of the same size is
        charged to the first); plus ``num_images`` and ``num_instances``.
    """
    from tqdm.auto import tqdm

    ids = _select_images(coco, image_ids, max_images)
    example_ids = _pick_examples(coco, ids, num_examples)
    preds: dict[str, list[dict]] = {name: [] for name in codecs}
    ious: dict[str, list[torch.Tensor]] = {name: [] for name in codecs}
    seconds = dict.fromkeys(codecs, 0.0)
    examples: list[dict] = []
    num_instances = 0
    for image_id in tqdm(ids, desc="reconstruction study", disable=not progress, leave=False):
        gt = image_ground_truth(coco, image_id)
        hw = (gt["height"], gt["width"])
        masks, boxes = gt["masks"].to(device), gt["boxes"].to(device)
        num_instances += len(masks)
        wanted = [i for i, a in enumerate(gt["ann_ids"].tolist()) if a in example_ids]
        image_examples = [_new_example(gt, i, image_id) for i in wanted]
        crops: dict[int, torch.Tensor] = {}  # shared by the settings with the same crop size
        for name, codec in codecs.items():
            n = codec.resolution if codec is not None else resolution
            start = time.perf_counter()
            with torch.no_grad():
                if n not in crops:
                    crops[n] = crop_to_box(masks, boxes, n)
                recon = _code_and_paste(codec, crops[n], boxes, hw)
            seconds[name] += time.perf_counter() - start
            ious[name].append(mask_iou(recon, masks).cpu())
            preds[name].append({"image_id": image_id, "boxes": gt["boxes"], "labels": gt["labels"],
                                "scores": torch.ones(len(masks)), "masks": _RLEMasks(recon)})
            for i, ex in zip(wanted, image_examples):
                x0, y0, x1, y1 = ex["region"]
                ex["recon"][name] = recon[i, y0:y1, x0:x1].cpu().numpy()
        examples.extend(image_examples)

    examples.sort(key=lambda ex: (int(ex["gt"].sum()), ex["ann_id"]))  # small to large objects
    metrics: dict[str, float] = {"num_images": float(len(ids)), "num_instances": float(num_instances)}
    for name in codecs:
        stats = evaluate_coco(coco, preds[name], iou_types=("segm",), image_ids=ids)["segm"]
        all_ious = torch.cat(ious[name]) if ious[name] else torch.zeros(0, dtype=torch.float64)
        metrics[f"{name}/mask_iou"] = float(all_ious.mean()) if len(all_ious) else float("nan")
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            metrics[f"{name}/mask_{key}"] = stats[key]
        metrics[f"{name}/seconds"] = seconds[name]
    return StudyResult(metrics=metrics, examples=examples)


def _new_example(gt: dict, i: int, image_id: int) -> dict:
    region = _example_region(gt["boxes"][i], gt["height"], gt["width"])
    x0, y0, x1, y1 = region
    return {"image_id": image_id, "ann_id": int(gt["ann_ids"][i]), "category_id": int(gt["labels"][i]),
            "box": gt["boxes"][i].tolist(), "region": region, "gt": gt["masks"][i, y0:y1, x0:x1].numpy(),
            "recon": {}}


def reconstruction_study(codec: Codec | str | Mapping[str, Any] | None, coco: COCO, *,
                         fit_coco: COCO | None = None, fit_max_images: int = 0, fit_max_masks: int = FIT_MAX_MASKS,
                         seed: int = 0, **kwargs) -> dict[str, float]:
    """The study for one codec (or spec, see ``make_codec``; unfitted pca/sparse are fitted on ``fit_coco``):
    flat metrics without the setting prefix (``mask_iou``, ``mask_AP``, ``mask_AP50``, ``mask_AP75``,
    ``mask_APs``, ``mask_APm``, ``mask_APl``, ``seconds``, ``num_images``, ``num_instances``).
    Other keyword arguments go to ``run_study``."""
    codec = make_codec(codec, fit_coco=fit_coco, fit_max_images=fit_max_images, fit_max_masks=fit_max_masks,
                       seed=seed)
    result = run_study({"codec": codec}, coco, **kwargs)
    return {k.split("/", 1)[-1]: v for k, v in result.metrics.items()}


# ---- settings of the paper's tables and a text table ---------------------------------------------------------
def comparison_settings(names: Sequence[str], *, fit_coco: COCO | None = None, fit_max_images: int = 0,
                        fit_max_masks: int = FIT_MAX_MASKS, seed: int = 0,
                        baseline_resolution: int | None = 128) -> dict[str, Codec | None]:
    """Table 3a settings: {name: codec built from ``DEFAULT_SPECS[name]``, pca/sparse fitted on ``fit_coco``},
    plus "crop_paste" (no coding, crop at ``baseline_resolution``) first unless that is None."""
    unknown = [n for n in names if n not in DEFAULT_SPECS]
    if unknown:
        raise ValueError(f"unknown codec name(s) {unknown}; available: {sorted(DEFAULT_SPECS)}")
    settings: dict[str, Codec | None] = {"crop_paste": None} if baseline_resolution else {}
    for name in names:
        settings[name] = make_codec(DEFAULT_SPECS[name], fit_coco=fit_coco, fit_max_images=fit_max_images,
                                    fit_max_masks=fit_max_masks, seed=seed)
    return settings


def resolution_sweep_settings(resolutions: Sequence[int], num_coeffs: int = 256) -> dict[str, Codec]:
    """Table 3d: {"N<r>": DCTCodec(r, num_coeffs)} for each resolution r (n_k capped at r²)."""
    return {f"N{r}": build_codec("dct", resolution=int(r), num_coeffs=min(num_coeffs, int(r) ** 2))
            for r in resolutions}


def dimension_sweep_settings(dims: Sequence[int], resolution: int = 128) -> dict[str, Codec]:
    """Table 3e: {"nk<d>": DCTCodec(resolution, d)} for each dimension d."""
    return {f"nk{d}": build_codec("dct", resolution=resolution, num_coeffs=int(d)) for d in dims}


def format_table(metrics: Mapping[str, float], settings: Sequence[str], *,
                 columns: Sequence[str] = ("mask_iou", "mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm",
                                           "mask_APl"),
                 extra: Mapping[str, Mapping[str, Any]] | None = None, percent: bool = True) -> str:
    """A fixed-width text table: one row per setting, ``metrics["<setting>/<column>"]`` in percent
    ('-' when missing or -1), then the ``extra[setting][column]`` values as given (e.g. the paper's)."""
    extra_cols = list(dict.fromkeys(c for row in (extra or {}).values() for c in row))
    header = ["setting", *columns, *extra_cols]
    rows = []
    for s in settings:
        cells = [s]
        for c in columns:
            v = metrics.get(f"{s}/{c}")
            ok = v is not None and v == v and v >= 0
            cells.append(f"{100 * v:.1f}" if ok and percent else (f"{v:.4f}" if ok else "-"))
        for c in extra_cols:
            v = (extra or {}).get(s, {}).get(c)
            cells.append("-" if v is None else str(v))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])


_REPORT_NAMES = {"mask_iou": "miou", "mask_AP": "segm/AP", "mask_AP50": "segm/AP50", "mask_AP75": "segm/AP75",
                 "mask_APs": "segm/APs", "mask_APm": "segm/APm", "mask_APl": "segm/APl"}


def coding_metric_keys(settings: Mapping[str, Codec | None], metrics: Mapping[str, float], *,
                       resolution: int = 128) -> dict[str, float]:
    """The same numbers keyed by what was coded, for the results compiler
    (``experiments/mask_coding_upper_bound.yaml``): ``coding/<codec>/N<N>/k<n_k>/<miou|segm/AP|segm/APs|...>``.
    crop + paste alone (codec None) is ``crop_paste`` with n_k = N² (nothing dropped)."""
    out: dict[str, float] = {}
    for setting, codec in settings.items():
        name, n, k = ("crop_paste", resolution, resolution ** 2) if codec is None else (
            codec.name, codec.resolution, codec.dim)
        for src, dst in _REPORT_NAMES.items():
            if f"{setting}/{src}" in metrics:
                out[f"coding/{name}/N{n}/k{k}/{dst}"] = metrics[f"{setting}/{src}"]
    return out

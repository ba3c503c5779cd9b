"""Procedural COCO-format scenes of coloured shapes: the embedded default data (no download needed).

Each image holds 1..max_objects shapes from 8 categories, of small, medium and large COCO area, placed so that
they often overlap. Later objects occlude earlier ones; the annotated mask is the *visible* part (compressed
RLE, so ring holes and occlusion are exact), and objects left nearly fully occluded are removed from the scene
before painting, so every painted pixel belongs to an annotated object or to the background. Backgrounds and
fills are textured (gradients, stripes, checks, smooth blotches, pixel noise).

Everything is drawn with numpy on coordinate grids restricted to each object's window (no per-pixel loops), one
random generator per image seeded by (seed, split, index): same seed, same bytes, and the val split does not
depend on num_train. Files: ``out_dir/{train,val}/NNNNNN.png`` and ``out_dir/annotations/instances_{split}.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from solq.evaluation import masks_to_rle
from solq.files import write_text_atomic

__all__ = ["CATEGORIES", "FORMAT_VERSION", "Scene", "render_scene", "generate", "is_up_to_date",
           "add_arguments", "run_from_args", "main"]

CATEGORIES = ("circle", "ellipse", "rectangle", "triangle", "star", "ring", "cross", "crescent")
FORMAT_VERSION = 1  # bump whenever the drawing changes, so is_up_to_date() rejects older sets
SPLITS = {"train": 0, "val": 1}
# object radius / image size: a size class is drawn, then a log-uniform radius within it; the classes land
# on visible areas of about 37% small, 46% medium, 17% large (COCO: <32^2, <96^2, more) at any image size
RADIUS_CLASSES = ((0.35, 0.035, 0.1), (0.35, 0.1, 0.25), (0.3, 0.28, 0.55))  # (probability, low, high)
MIN_VISIBLE_FRACTION, MIN_VISIBLE_PIXELS = 0.25, 16  # below either, an occluded object is dropped
NEAR_PREVIOUS_PROB = 0.4  # chance to place an object next to an earlier one (overlap, occlusion)
MIN_CONTRAST = 70.0  # RGB distance between an object's colour and what lies under it


class Scene(NamedTuple):
    """One rendered scene.

    image: uint8 [S,S,3]; masks: bool [K,S,S] visible parts (pairwise disjoint); labels: int64 [K] category
    ids (1-based, see CATEGORIES); full_masks: bool [K,S,S] the unoccluded shapes (inside the image).
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    full_masks: np.ndarray


# ------------------------------------------------------------------------------------------- shape geometry
def _polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of grid points (u [h,1], v [1,w] or [h,w]) against verts [n,2] (u,v)."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    nxt = np.roll(verts, -1, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for (u0, v0), (u1, v1) in zip(verts, nxt):  # loop over edges (<= 10), vectorised over pixels
            crosses = (v0 > v) != (v1 > v)
            u_cross = u0 + (v - v0) * (u1 - u0) / (v1 - v0)
            inside ^= crosses & (u < u_cross)
    return inside


def _regular(n: int, radii: Sequence[float], phase: float = 0.0) -> np.ndarray:
    """Vertices [n*len(radii),2] at angles phase + 2*pi*k/(n*len(radii)), radii cycling (stars)."""
    m = n * len(radii)
    ang = phase + 2 * np.pi * np.arange(m) / m
    rad = np.resize(np.asarray(radii, float), m)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _sample_shape_params(rng: np.random.Generator, category: str) -> dict:
    if category == "ellipse":
        return {"b": rng.uniform(0.35, 0.6)}
    if category == "rectangle":
        return {"b": rng.uniform(0.35, 0.9)}
    if category == "triangle":
        ang = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        return {"verts": np.stack([np.cos(ang), np.sin(ang)], 1)}
    if category == "star":
        return {"verts": _regular(int(rng.integers(5, 7)), [1.0, rng.uniform(0.4, 0.55)])}
    if category == "ring":
        return {"inner": rng.uniform(0.45, 0.7)}
    if category == "cross":
        return {"w": rng.uniform(0.22, 0.36)}
    if category == "crescent":
        return {"d": rng.uniform(0.35, 0.6), "rho": rng.uniform(0.75, 0.95)}
    return {}


def _shape_mask(category: str, u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    """Inside test in the object's rotated unit frame (radius 1); u [h,w] or broadcastable, v likewise."""
    rr = u * u + v * v
    if category == "circle":
        return rr <= 1.0
    if category == "ellipse":
        return u * u + (v / p["b"]) ** 2 <= 1.0
    if category == "rectangle":
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9 * p["b"])
    if category in ("triangle", "star"):
        return _polygon(u, v, p["verts"])
    if category == "ring":
        return (rr <= 1.0) & (rr >= p["inner"] ** 2)
    if category == "cross":
        return ((np.abs(u) <= 0.95) & (np.abs(v) <= p["w"])) | ((np.abs(v) <= 0.95) & (np.abs(u) <= p["w"]))
    if category == "crescent":
        return (rr <= 1.0) & ((u - p["d"]) ** 2 + v * v > p["rho"] ** 2)
    raise ValueError(f"unknown shape category '{category}'")


def _draw_object(rng: np.random.Generator, size: int, placed: list[dict]) -> dict | None:
    """Sample one object; returns {label, window (y0,y1,x0,x1), mask bool [h,w] in the window, cx, cy, r}."""
    label = int(rng.integers(len(CATEGORIES))) + 1
    category = CATEGORIES[label - 1]
    probs, lows, highs = zip(*RADIUS_CLASSES)
    k = int(rng.choice(len(probs), p=probs))
    r_low = max(4.0, lows[k] * size)
    r = float(np.exp(rng.uniform(np.log(r_low), np.log(max(r_low, highs[k] * size)))))
    if placed and rng.random() < NEAR_PREVIOUS_PROB:
        other = placed[int(rng.integers(len(placed)))]
        ang = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(0.3, 1.1) * (other["r"] + r)
        cx, cy = other["cx"] + dist * np.cos(ang), other["cy"] + dist * np.sin(ang)
        cx, cy = float(np.clip(cx, 0, size - 1)), float(np.clip(cy, 0, size - 1))
    else:
        cx, cy = rng.uniform(0, size, 2).tolist()
    theta = rng.uniform(0, 2 * np.pi)
    params = _sample_shape_params(rng, category)
    y0, y1 = max(0, math.floor(cy - r)), min(size, math.ceil(cy + r) + 1)
    x0, x1 = max(0, math.floor(cx - r)), min(size, math.ceil(cx + r) + 1)
    dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]  # pixel centres
    dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
    c, s = math.cos(theta), math.sin(theta)
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    mask = _shape_mask(category, u, v, params)
    if not mask.any():
        return None
    return {"label": label, "window": (y0, y1, x0, x1), "mask": mask, "cx": cx, "cy": cy, "r": r}


def _owner_map(objects: list[dict], size: int) -> np.ndarray:
    """int16 [S,S]: index of the top-most object covering each pixel, -1 for background."""
    owner = np.full((size, size), -1, np.int16)
    for i, obj in enumerate(objects):
        y0, y1, x0, x1 = obj["window"]
        owner[y0:y1, x0:x1][obj["mask"]] = i
    return owner


# ------------------------------------------------------------------------------------------------ textures
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _pattern(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, kind: str) -> np.ndarray:
    """Blend weights in [0,1], shape [h,w], for pixel coordinates ys [h,1], xs [1,w]."""
    ang = rng.uniform(0, np.pi)
    t = xs * np.cos(ang) + ys * np.sin(ang)
    if kind == "stripes":
        return (np.floor(t / rng.uniform(2.0, 7.0)) % 2).astype(np.float32)
    if kind == "checks":
        t2 = -xs * np.sin(ang) + ys * np.cos(ang)
        cell = rng.uniform(3.0, 10.0)
        return ((np.floor(t / cell) + np.floor(t2 / cell)) % 2).astype(np.float32)
    if kind == "gradient":
        return ((t - t.min()) / max(float(np.ptp(t)), 1e-6)).astype(np.float32)
    if kind == "blotches":  # a few random low-frequency waves: smooth noise without any resampling
        acc = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), np.float32)
        for _ in range(4):
            f, a, ph = rng.uniform(0.01, 0.06), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
            acc += np.sin(f * (xs * np.cos(a) + ys * np.sin(a)) + ph).astype(np.float32)
        return 0.5 + acc / 8.0
    raise ValueError(kind)


def _fill(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, base: np.ndarray, spread: float,
          kinds: Sequence[str]) -> np.ndarray:
    """Texture float32 [h,w,3]: base colour, optionally blended with a second one through a pattern."""
    kind = kinds[int(rng.integers(len(kinds)))]
    h, w = np.broadcast_shapes(ys.shape, xs.shape)
    if kind == "solid":
        return np.broadcast_to(base, (h, w, 3)).copy()
    other = np.clip(base + rng.uniform(-spread, spread, 3).astype(np.float32), 0, 255)
    return base + _pattern(rng, ys, xs, kind)[..., None] * (other - base)  # float32 throughout


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.arange(size, dtype=np.float32)[:, None], np.arange(size, dtype=np.float32)[None, :]
    canvas = _fill(rng, ys, xs, _colour(rng), 120.0, ("gradient",))
    extra = ("none", "stripes", "checks", "blotches")[int(rng.integers(4))]
    if extra != "none":  # a lower-contrast second layer
        canvas += _pattern(rng, ys, xs, extra)[..., None] * rng.uniform(-45, 45, 3).astype(np.float32)
    return canvas


def render_scene(rng: np.random.Generator, size: int, max_objects: int = 10) -> Scene:
    """Draw one scene of 1..max_objects shapes on a size x size textured background (see module docstring)."""
    while True:  # re-sample in the rare case that nothing survives (e.g. one tiny object cut by the border)
        placed: list[dict] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            obj = _draw_object(rng, size, placed)
            if obj is not None:
                placed.append(obj)
        if not placed:
            continue
        visible = np.bincount(_owner_map(placed, size).ravel().astype(np.int64) + 1,
                              minlength=len(placed) + 1)[1:]
        full = np.array([o["mask"].sum() for o in placed])
        kept = [o for o, vis, tot in zip(placed, visible, full)
                if vis >= MIN_VISIBLE_PIXELS and vis >= MIN_VISIBLE_FRACTION * tot]
        if kept:
            break
    owner = _owner_map(kept, size)  # removing objects only uncovers the ones below, so all kept stay valid

    canvas = _background(rng, size)
    full_masks = np.zeros((len(kept), size, size), bool)
    for i, obj in enumerate(kept):
        y0, y1, x0, x1 = obj["window"]
        full_masks[i, y0:y1, x0:x1] = obj["mask"]
        region = owner[y0:y1, x0:x1] == i
        under = canvas[y0:y1, x0:x1][obj["mask"]].mean(0)
        for _ in range(20):  # keep the object distinguishable from what lies beneath it
            base = _colour(rng)
            if np.linalg.norm(base - under) >= MIN_CONTRAST:
                break
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        xs = np.arange(x0, x1, dtype=np.float32)[None, :]
        tex = _fill(rng, ys, xs, base, 90.0, ("solid", "solid", "stripes", "gradient", "checks"))
        canvas[y0:y1, x0:x1][region] = tex[region]
    noise = rng.standard_normal(canvas.shape, dtype=np.float32)  # sensor-like pixel noise
    noise *= rng.uniform(1.0, 6.0)
    canvas += noise
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    masks = owner[None] == np.arange(len(kept), dtype=np.int16)[:, None, None]
    labels = np.array([o["label"] for o in kept], np.int64)
    return Scene(image, masks, labels, full_masks)


# ------------------------------------------------------------------------------------------------- writing
def _info(split: str, num_images: int, image_size: int, seed: int, max_objects: int) -> dict:
    return {"description": "solq procedural shapes (solq.data.synthetic)", "version": str(FORMAT_VERSION),
            "split": split, "num_images": num_images, "image_size": image_size, "seed": seed,
            "max_objects": max_objects}


def _write_split(root: Path, split: str, num_images: int, image_size: int, seed: int, max_objects: int,
                 progress: bool) -> tuple[Path, Path]:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"synth {split}", disable=not progress, unit="img"):
        scene = render_scene(np.random.default_rng([seed, SPLITS[split], index]), image_size, max_objects)
        image_id, file_name = index + 1, f"{index + 1:06d}.png"
        # fixed PNG parameters and no metadata chunks: byte-identical output for a given seed
        Image.fromarray(scene.image).save(image_dir / file_name, format="PNG", compress_level=1, optimize=False)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size,
                       "license": 1})
        rles = masks_to_rle(scene.masks)
        boxes = mask_utils.toBbox(rles).tolist()
        areas = scene.masks.sum((1, 2)).tolist()
        for label, rle, box, area in zip(scene.labels.tolist(), rles, boxes, areas):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "segmentation": rle, "area": float(area), "bbox": box, "iscrowd": 0})
    for stale in image_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # left by an earlier, larger run
        if int(stale.stem) > num_images:
            stale.unlink()
    dataset = {"info": _info(split, num_images, image_size, seed, max_objects),
               "licenses": [{"id": 1, "name": "Public Domain (procedurally generated)", "url": ""}],
               "images": images, "annotations": annotations,
               "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)]}
    ann_file = root / "annotations" / f"instances_{split}.json"
    # written last and atomically: its presence means the split is complete
    write_text_atomic(ann_file, json.dumps(dataset, separators=(",", ":")), what="annotation file")
    return image_dir, ann_file


def generate(out_dir: str | Path, num_train: int, num_val: int, image_size: int, seed: int, *,
             max_objects: int = 10, progress: bool = True, val_seed: int | None = None) -> dict[str, Path]:
    """Write the synthetic COCO-format dataset and print how long it took.

    Args:
        out_dir: root folder (created). num_train / num_val: images per split (>= 0). image_size: side S in
            pixels of the square images (>= 32). seed: same seed, same bytes. max_objects: objects per image
            are drawn uniformly from 1..max_objects (a few may be dropped when nearly fully occluded).
            val_seed: the val split's seed when it should differ from ``seed`` (None: ``seed``; the splits'
            scenes differ either way, since each image's generator is seeded by (seed, split, index)).
    Returns:
        {"root", "train_images", "train_annotations", "val_images", "val_annotations"} paths.
    """
    if image_size < 32:
        raise ValueError(f"synthetic: image_size must be >= 32, got {image_size}")
    if num_train < 0 or num_val < 0 or max_objects < 1:
        raise ValueError(f"synthetic: need num_train, num_val >= 0 and max_objects >= 1, "
                         f"got {num_train}, {num_val}, {max_objects}")
    root = Path(out_dir)
    paths: dict[str, Path] = {"root": root}
    start = time.perf_counter()
    seeds = {"train": seed, "val": seed if val_seed is None else val_seed}
    for split, n in (("train", num_train), ("val", num_val)):
        paths[f"{split}_images"], paths[f"{split}_annotations"] = _write_split(
            root, split, n, image_size, seeds[split], max_objects, progress)
    if progress:
        print(f"synthetic: {num_train} + {num_val} scenes of {image_size} px (seed {seeds['train']}/{seeds['val']}) "
              f"generated into {root} in {time.perf_counter() - start:.1f} s", flush=True)
    return paths


def is_up_to_date(out_dir: str | Path, num_train: int, num_val: int, image_size: int, seed: int, *,
                  max_objects: int = 10, val_seed: int | None = None) -> bool:
    """True when out_dir holds a complete set generated with exactly these parameters (and this version)."""
    root = Path(out_dir)
    for split, n in (("train", num_train), ("val", num_val)):
        split_seed = val_seed if split == "val" and val_seed is not None else seed
        ann_file = root / "annotations" / f"instances_{split}.json"
        try:
            with open(ann_file) as f:
                info = json.load(f).get("info", {})
        except (OSError, ValueError):
            return False
        if info != _info(split, n, image_size, split_seed, max_objects):
            return False
        if n and not (root / split / f"{n:06d}.png").exists():
            return False
    return True


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `solq synth`."""
    parser.add_argument("--out", required=True, help="output folder (gets train/, val/, annotations/)")
    parser.add_argument("--num-train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--num-val", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images in px (256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (0)")
    parser.add_argument("--val-seed", type=int, default=None, help="seed of the val split (default: --seed)")
    parser.add_argument("--max-objects", type=int, default=10, help="at most this many objects per image (10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    paths = generate(args.out, args.num_train, args.num_val, args.image_size, args.seed,
                     max_objects=args.max_objects, progress=not args.no_progress, val_seed=args.val_seed)
    for key in ("train_annotations", "val_annotations"):
        print(f"{key}: {paths[key]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="solq synth", description=(
        "Write a COCO-format dataset of procedural shape scenes (8 categories, occlusion, textures).")))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job behind ``make demo`` (``solq demo``): a small reproduction, end to end, on a CPU without network.

1. synthetic scenes (COCO format) are generated under ``out_dir/synthetic``: 2,000 training scenes (seed 0)
   and 100 validation scenes of 256 px from another seed (1), those of ``solq synth``'s default generator;
2. the SQR baseline and the SOLQ (UQR) smoke models are trained side by side on one thread each (the smoke
   recipe: the small backbone pretrained on synthetic scenes, as the paper starts from ImageNet weights;
   two-stage queries, IoU-aware classification, warm-up + cosine; batch 8) and evaluated on those 100 scenes: the ``mode=sqr`` and
   ``mode=uqr`` points of ``experiments/table2_uqr_vs_sqr.yaml`` (the UQR point also draws Figures 3/5, its
   masks beside SQR's on the same images);
3. Table 4's Boundary AP of that UQR model (``experiments/table4_boundary_ap.yaml`` with its ``checkpoint`` set to
   the Table 2 UQR point; the experiment alone reads the shipped ``smoke-uqr``);
4. the training-free mask-coding study (Tables 3a/3d/3e upper bounds) on the shipped COCO sample images
   (``experiments/mask_coding_upper_bound.yaml``);
5. ``solq report``: the tables in the paper's layout beside the paper's numbers, with the figures, in
   ``out_dir/report/report.html``.

Every part is an experiment point run through papermill by ``solq.workbench.runner.run_experiment`` at the
``smoke`` scale into ``out_dir/runs`` (executed notebooks, metrics.json, figures and logs are kept there), so the
report compiles them like any other run and a second ``solq demo`` skips what is complete. A failing part is
reported (with its notebook and log) and the others go on.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from solq.coding.study import image_ground_truth
from solq.config import DEMO_STEPS
from solq.data import samples_dir
from solq.data.synthetic import generate, is_up_to_date
from solq.workbench.notebook import project_root
from solq.workbench.report import build_report
from solq.workbench.runner import PointResult, run_experiment

__all__ = ["DEMO_STEPS", "demo_root", "run_demo", "ground_truth_as_predictions"]

DEMO_VAL_SEED = 1  # the scored scenes come from a seed the training scenes do not use


def demo_root() -> Path:
    """The project folder holding ``experiments/`` and ``notebooks/`` (the demo runs its notebooks).
    Raises FileNotFoundError when solq is installed without them (e.g. a wheel): run from a clone."""
    root = project_root(Path(__file__).resolve().parent)
    if not (root / "experiments").is_dir() or not (root / "notebooks").is_dir():
        raise FileNotFoundError(f"solq demo needs the project's experiments/ and notebooks/ folders, which are not "
                                f"beside the installed package ({Path(__file__).resolve().parent}); run it from a "
                                f"clone of the repository (pip install -e .)")
    return root


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _last_progress(log: Path) -> str:
    """The last progress line (a tqdm bar of the training or evaluation) written into a point's log."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [_ANSI.sub("", x).strip() for x in re.split(r"[\r\n]+", tail)]
    lines = [x for x in lines if "it/s" in x or "s/it" in x or "img/s" in x]
    return lines[-1] if lines else ""


@contextmanager
def _watch_logs(folder: Path, every: float = 20.0, enabled: bool = True) -> Iterator[None]:
    """While the block runs, print every ``every`` seconds where each running point's notebook is (its
    latest progress bar), since papermill sends the notebook's output to the point's log.txt; points run in
    parallel each get a line."""
    stop = threading.Event()

    def watch() -> None:
        shown: dict[Path, str] = {}
        while not stop.wait(every):
            now = time.time()
            for log in sorted(folder.glob("*/log.txt")):
                if now - log.stat().st_mtime > 2 * every:  # finished or not started
                    continue
                line = _last_progress(log)
                if line and line != shown.get(log):
                    print(f"    {log.parent.name}: {line}", flush=True)
                    shown[log] = line

    thread = threading.Thread(target=watch, daemon=True) if enabled else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()


def _stage(i: int, n: int, text: str, start: float) -> None:
    print(f"\n[{i}/{n}] {text}  (t = {time.perf_counter() - start:.0f} s)", flush=True)


def run_demo(out_dir: str | Path = "demo_output", *, steps: int = DEMO_STEPS, image_size: int = 256,
             num_train: int = 2000, num_val: int = 100, model_overrides: Sequence[str] = (),
             coding_parameters: Optional[Mapping] = None, boundary: bool = True, progress: bool = True,
             jobs: int = 2) -> Path:
    """Run the demo into ``out_dir`` and return the path of the HTML report.

    Args:
        steps: optimiser steps of each trained model (SQR and UQR, batch 8).
        image_size / num_train / num_val: the synthetic scenes (square images of that side); the val scenes
            use seed ``DEMO_VAL_SEED``, the training scenes seed 0.
        model_overrides: extra config overrides ("a.b=c") for both models, e.g. a smaller width in tests.
        coding_parameters: notebook parameters replacing the mask-coding study's (e.g. fewer codecs).
        boundary: also compute Table 4 (Boundary AP of the UQR model).
        progress: progress bars across the experiment points.
        jobs: the two models train at once (each on half the cores: on 2 cores that makes about twice the steps
            per minute of training them one after the other); 1 trains them in turn.
    Returns the path of ``out_dir/report/report.html``. Raises RuntimeError naming the failed parts (after
    the report is written) when every part failed.
    """
    start = time.perf_counter()
    root = demo_root()
    out = Path(out_dir).resolve()
    runs_dir, data_root = out / "runs", out / "synthetic"
    n = 5 if boundary else 4
    print(f"solq demo: outputs in {out}")

    _stage(1, n, f"synthetic scenes: {num_train} training (seed 0) and {num_val} validation images (seed "
                 f"{DEMO_VAL_SEED}) of {image_size} px", start)
    if not is_up_to_date(data_root, num_train, num_val, image_size, 0, val_seed=DEMO_VAL_SEED):
        generate(data_root, num_train, num_val, image_size, 0, progress=progress, val_seed=DEMO_VAL_SEED)
    print(f"  {data_root}")

    results: list = []

    def run(yaml_name: str, points, overrides: dict, jobs: int = 1) -> None:
        path = root / "experiments" / yaml_name
        try:
            with _watch_logs(runs_dir / path.stem / "smoke", enabled=progress):
                rs = run_experiment(path, "smoke", runs_dir=runs_dir, points=points, overrides=overrides,
                                    progress=progress, jobs=jobs)
        except ValueError as e:  # the experiment could not start (YAML, notebook parameters, requirements)
            print(f"  FAILED to start {yaml_name}: {e}", flush=True)
            results.append(PointResult(path.stem, "smoke", "*", "failed", runs_dir / path.stem / "smoke", error=str(e)))
            return
        for r in rs:
            note = f"{r.seconds:.0f} s" if r.status == "done" else r.status
            print(f"  {r.experiment}/{r.point}: {note}  ({r.output_dir})", flush=True)
        results.extend(rs)

    data = {"data_root": str(data_root)}
    budget = {**data, "max_steps": int(steps), "epochs": 1000, "overrides": list(model_overrides)}
    _stage(2, n, f"Table 2: the SQR baseline and SOLQ (UQR) side by side ({jobs} at once), {steps} steps each; then "
                 f"Figures 3/5 (logs: {runs_dir / 'table2_uqr_vs_sqr' / 'smoke'}/<point>/log.txt)", start)
    run("table2_uqr_vs_sqr.yaml", ["mode=sqr", "mode=uqr"], budget, jobs=jobs)
    if boundary:
        _stage(3, n, "Table 4: Boundary AP of the UQR model just trained", start)
        uqr_point = runs_dir / "table2_uqr_vs_sqr" / "smoke" / "mode=uqr"
        run("table4_boundary_ap.yaml", None, {**data, "checkpoint": str(uqr_point)})
    _stage(n - 1, n, f"Tables 3a/3d/3e without training: the mask-coding study on the shipped COCO samples "
                     f"({samples_dir()})", start)
    run("mask_coding_upper_bound.yaml", None, {"dataset": "samples", **(coding_parameters or {})})

    _stage(n, n, "report", start)
    paths = build_report(runs_dir, out / "report", scale="smoke", experiments_dir=root / "experiments")
    failed = [r for r in results if r.status == "failed"]
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{len(results) - len(failed)} of {len(results)} parts done in {minutes:.1f} min.")
    for r in failed:
        print(f"  FAILED {r.experiment}/{r.point}: " + (f"see {r.output_dir / 'log.txt'}" if r.point != "*"
                                                          else (r.error or "").splitlines()[0]))
    if failed and len(failed) == len(results):
        raise RuntimeError(f"every part of the demo failed; report (with the problems) at {paths['html']}")
    print(f"HTML report (tables and figures): {paths['html']}")
    return Path(paths["html"])


def ground_truth_as_predictions(coco) -> list[dict]:
    """The non-crowd annotations of a pycocotools ``COCO`` as per-image predictions with score 1 (a sanity
    check of the evaluation: they score AP 1). Returns dicts {image_id, boxes [K,4] xyxy, scores [K],
    labels [K], masks bool [K,H,W]} as numpy."""
    import numpy as np

    preds = []
    for image_id in coco.getImgIds():
        gt = image_ground_truth(coco, image_id)
        preds.append({"image_id": image_id, "boxes": gt["boxes"].numpy(), "scores": np.ones(len(gt["labels"])),
                      "labels": gt["labels"].numpy(), "masks": gt["masks"].numpy()})
    return preds

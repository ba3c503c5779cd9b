"""The ``solq run`` command: its options (:func:`add_run_arguments`), ``--set`` values (:func:`parse_overrides`)
and entry point (:func:`run_from_args`) around :func:`solq.workbench.runner.run_experiment`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import yaml

from solq.config_values import positive_int
from solq.workbench.experiment_file import SCALES, parse_seeds
from solq.workbench.runner import run_experiment

__all__ = ["add_run_arguments", "parse_overrides", "run_from_args"]


def add_run_arguments(parser) -> None:
    """Options of ``solq run EXPERIMENT.yaml --scale smoke`` (argparse)."""
    parser.add_argument("experiment", type=Path, help="experiment YAML, e.g. experiments/table3b_vector_loss_weight.yaml")
    parser.add_argument("--scale", required=True, choices=SCALES,
                        help="smoke: CPU, small data, minutes per point; paper: COCO 2017, the paper's recipe")
    parser.add_argument("--runs-dir", type=Path, default=Path("experiments/runs"),
                        help="where runs go: RUNS/<experiment>/<scale>/<point>/ (default experiments/runs)")
    parser.add_argument("--points", nargs="+", metavar="NAME",
                        help="run only these points (names, glob patterns or indices; default all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter (value parsed as YAML), e.g. --set coco_root=/data/coco")
    parser.add_argument("--seeds", type=_seed_list, default=None, metavar="0,1,2",
                        help="run every grid point once per seed (notebook parameter seed), each into "
                             "<point>__seed=N; replaces the YAML's seeds (default: the YAML's, else unseeded)")
    parser.add_argument("--force", action="store_true", help="rerun points that are already complete")
    parser.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                        help="run N points at once, each on cores/N threads (default 1)")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failing point")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their status, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _seed_list(text: str) -> list[int]:
    """argparse type of ``--seeds``: "0,1,2" -> [0, 1, 2] (ArgumentTypeError names the problem)."""
    try:
        seeds = parse_seeds(text, where="--seeds")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seeds is None:
        raise argparse.ArgumentTypeError("--seeds: give at least one seed, e.g. 0,1,2")
    return seeds


def parse_overrides(items: Iterable[str]) -> dict:
    """``["a=1", "b=[x, y]"]`` -> ``{"a": 1, "b": ["x", "y"]}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def run_from_args(args) -> int:
    """Run ``solq run`` from parsed arguments; prints a summary. Returns the exit code (1 on failures)."""
    results = run_experiment(args.experiment, args.scale, runs_dir=args.runs_dir, points=args.points,
                             force=args.force, progress=not args.no_progress, keep_going=not args.stop_on_error,
                             overrides=parse_overrides(args.overrides), dry_run=args.dry_run,
                             jobs=args.jobs, seeds=getattr(args, "seeds", None))
    for r in results:
        note = f"  ({r.error})" if args.dry_run and r.error else f"  {r.seconds:.1f} s" if r.seconds else ""
        print(f"{r.status:8s} {r.experiment}/{r.scale}/{r.point}{note}")
    failed = [r for r in results if r.status == "failed"]
    where = Path(args.runs_dir) / (results[0].experiment if results else Path(args.experiment).stem) / args.scale
    print(f"{len(results) - len(failed)} of {len(results)} points ok; runs in {where}")
    return 1 if failed else 0

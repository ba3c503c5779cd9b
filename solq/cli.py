"""The ``solq`` command. ``solq --help`` lists the subcommands; ``solq CMD --help`` explains each option.

Each subcommand parses its options here and calls one library function, so everything the command
line does is also reachable from Python and from the notebooks.

Each subcommand imports its library function when it runs (the one place in solq that imports lazily for
speed): ``solq --help`` and a mistyped option answer in 0.1 s instead of the 3.9 s that importing torch, the
engine and the workbench takes (measured on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from solq.config_values import positive_int  # light: no torch

EXAMPLES = {
    "synth": "solq synth --out data/synthetic --num-train 200 --num-val 50 --image-size 256 --seed 0",
    "demo": "solq demo --out demo_output\n  solq demo --out demo_quick --steps 200",
    "train": "solq train --config smoke --set train.epochs=2 data.root=data/synthetic --output runs/smoke\n"
             "  torchrun --nproc_per_node=8 -m solq.cli train --config release-r50 --set data.dataset=coco "
             "data.root=/data/coco --output runs/r50 --resume auto",
    "eval": "solq eval --checkpoint runs/smoke/checkpoint.pth --output runs/smoke/eval --dump runs/smoke/results\n"
            "  solq eval --checkpoint solq_r50_final.pth --set data.dataset=coco data.root=/data/coco",
    "predict": "solq predict --checkpoint runs/smoke/checkpoint.pth data/synthetic/val 'photos/*.jpg' "
               "--output predictions --score-threshold 0.5",
    "bench": "solq bench --config paper-r50 --modes uqr,sqr --size 512x852 --output bench/table5.json",
    "pretrain-backbone": "solq pretrain-backbone --out solq/models/weights/backbone_small_synthetic.pt --seed 0 "
                         "--threads 1",
    "run": "solq run experiments/table3b_vector_loss_weight.yaml --scale smoke",
    "report": "solq report --runs-dir experiments/runs --out experiments/report",
    "export": "solq export --checkpoint smoke-uqr --output smoke_uqr.onnx\n"
              "  solq export --checkpoint runs/r50/checkpoint.pth --output r50.onnx --height 800 --width 1088",
}


def _add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog="example:\n  " + EXAMPLES[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _config_options(q: argparse.ArgumentParser, default: str | None, what: str) -> None:
    q.add_argument("--config", default=default, metavar="PRESET|YAML",
                   help=f"preset (paper-r50, release-r50, smoke) or YAML file; {what}")
    q.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.epochs=3 model.num_queries=100 "
                        "(type-checked; repeatable)")


def _add_synth(sub) -> None:
    s = _add_command(sub, "synth", "Generate a COCO-format dataset of procedural scenes (same seed, same bytes).")
    s.add_argument("--out", required=True, type=Path, help="output folder (train/, val/, annotations/)")
    s.add_argument("--num-train", type=int, default=200, help="number of training images (default 200)")
    s.add_argument("--num-val", type=int, default=50, help="number of validation images (default 50)")
    s.add_argument("--image-size", type=int, default=256, help="side of the square images in px (default 256)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--val-seed", type=int, default=None, help="seed of the val split (default: --seed)")
    s.set_defaults(func=_cmd_synth)


def _add_demo(sub) -> None:
    from solq.config import DEMO_STEPS  # not from solq.workbench.demo: that imports torch

    d = _add_command(sub, "demo", "The main job on the embedded data (what `make demo` runs).")
    d.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    d.add_argument("--steps", type=positive_int, default=DEMO_STEPS, metavar="N",
                   help=f"optimiser steps of each trained model, SQR and UQR (default {DEMO_STEPS}); fewer is "
                        f"quicker and learns less")
    d.add_argument("--jobs", type=positive_int, default=2, metavar="N",
                   help="train the SQR and UQR models at once (2, the default, each on half the cores) or in turn (1)")
    d.set_defaults(func=_cmd_demo)


def _add_train(sub) -> None:
    t = _add_command(sub, "train", "Train a model (single process, or every process of a torchrun launch).")
    _config_options(t, "smoke", "default smoke")
    t.add_argument("--output", metavar="DIR", help="run folder (config.yaml, log.jsonl, checkpoints, metrics.json); "
                                                   "sets runtime.output_dir")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest valid checkpoint in the run "
                                                         "folder (auto) or from PATH; sets runtime.resume")
    t.add_argument("--save-every-steps", type=int, default=None, metavar="N",
                   help="also checkpoint every N optimiser steps, mid-epoch; sets train.save_every_steps "
                        "(default 0: per epoch only)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    t.add_argument("--exit-code-on-stop", type=int, default=0, metavar="N",
                   help="exit status after SIGTERM/SIGUSR1 stopped the run with a checkpoint of its last step "
                        "(default 0; e.g. a status your cluster script requeues on). A second signal, or "
                        "train.stop_grace_s running out, exits at once with 128 + the signal number")
    t.set_defaults(func=_cmd_train)


def _add_eval(sub) -> None:
    e = _add_command(sub, "eval", "Box and mask AP of a checkpoint (solq or the authors' release) on the val set.")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file (solq or release .pth) or a shipped name (smoke-uqr, smoke-sqr)")
    _config_options(e, None, "default: the checkpoint's own config (its model/codec sections always win)")
    e.add_argument("--output", metavar="DIR", help="write metrics.json here")
    e.add_argument("--dump", metavar="DIR", help="write bbox_results.json and segm_results.json (COCO results "
                                                 "format, e.g. for the test-dev server) here")
    e.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    e.set_defaults(func=_cmd_eval)


def _add_predict(sub) -> None:
    r = _add_command(sub, "predict", "Run a checkpoint on images; write overlays (PNG) and COCO-format predictions.")
    r.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file (solq or release .pth) or a shipped name (smoke-uqr, smoke-sqr)")
    r.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or glob patterns")
    r.add_argument("--output", default="predictions", metavar="DIR",
                   help="folder for overlays, predictions.json and images.json (default predictions)")
    r.add_argument("--score-threshold", type=float, default=0.4,
                   help="keep detections with at least this score (default 0.4)")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    r.add_argument("--no-overlays", action="store_true", help="only write the JSON files")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    _config_options(r, None, "default: the checkpoint's own config (its model/codec sections always win)")
    r.set_defaults(func=_cmd_predict)


def _add_bench(sub) -> None:
    b = _add_command(sub, "bench", "Speed, peak memory, parameters and FLOPs of a config (paper Table 5).")
    _config_options(b, "paper-r50", "default paper-r50")
    b.add_argument("--modes", default="", metavar="M1,M2",
                   help="model modes to compare, e.g. uqr,sqr (default: the config's model.mode)")
    b.add_argument("--size", default="512x852", metavar="HxW", help="input height x width (default 512x852)")
    b.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    b.add_argument("--iters", type=int, default=10,
                   help="timed inference iterations of the network, of network + post-processing and of the "
                        "inference-optimised network (folded norms, channels_last) each, alternating; FPS are "
                        "their medians with the min-max spread (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds of all three (default 2)")
    b.add_argument("--train-iters", type=int, default=3, help="timed training steps; 0 skips training (default 3)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: runtime.device)")
    b.add_argument("--output", default="bench.json", metavar="PATH", help="JSON results file (default bench.json)")
    b.set_defaults(func=_cmd_bench)


def _add_pretrain_backbone(sub) -> None:
    pb = _add_command(sub, "pretrain-backbone", "Pretrain the small backbone on synthetic-scene segmentation (the "
                                                "smoke scale's ImageNet); writes a file for model.backbone_weights.")
    pb.add_argument("--out", required=True, type=Path, help="output file (.pt, loadable with weights_only=True)")
    pb.add_argument("--data-root", default="data/pretrain_synthetic", help="scenes are generated (once) here")
    pb.add_argument("--num-train", type=int, default=4000, help="training scenes (default 4000)")
    pb.add_argument("--steps", type=positive_int, default=8000, help="optimiser steps (default 8000, as the shipped "
                    "synthetic-small)")
    pb.add_argument("--instance-weight", type=float, default=0.0,
                    help="weight of the centre-heatmap and box-size terms (default 0: segmentation only)")
    pb.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    pb.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the training (default 0)")
    pb.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    pb.set_defaults(func=_cmd_pretrain_backbone)


def _add_run(sub) -> None:
    from solq.workbench.run_command import add_run_arguments, run_from_args

    r = _add_command(sub, "run", "Run an experiment YAML through papermill, one notebook per grid point "
                                 "(resumable).")
    add_run_arguments(r)
    r.set_defaults(func=run_from_args)


def _add_report(sub) -> None:
    from solq.workbench.report import add_report_arguments, report_from_args

    rep = _add_command(sub, "report", "Compile runs into the paper's tables (Markdown, LaTeX, HTML) beside the "
                                      "paper's numbers.")
    add_report_arguments(rep)
    rep.set_defaults(func=report_from_args)


def _add_export(sub) -> None:
    x = _add_command(sub, "export", "Export a checkpoint's network (backbone to heads) to ONNX and check it with "
                                    "onnxruntime (needs: pip install -e '.[export]').")
    x.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file (solq or release .pth) or a shipped name (smoke-uqr, smoke-sqr)")
    x.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; at least 16 for GridSample)")
    x.add_argument("--height", type=positive_int, default=None, metavar="H",
                   help="height of the traced sample, the image padded into H x W (the file takes any height and "
                        "width; default: the evaluation transform's max_size)")
    x.add_argument("--width", type=positive_int, default=None, metavar="W", help="width of the traced sample "
                                                                                  "(as --height)")
    x.add_argument("--image", default=None, metavar="FILE",
                   help="sample image of the onnxruntime check (default: a shipped COCO sample)")
    x.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |onnxruntime - PyTorch| on the sample (default 1e-4)")
    x.set_defaults(func=_cmd_export)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="solq", description="SOLQ research workbench: data, training, evaluation, reproduction.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_synth, _add_demo, _add_train, _add_eval, _add_predict, _add_bench, _add_pretrain_backbone,
                _add_run, _add_report, _add_export):  # one function per verb, in the order --help lists them
        add(sub)
    return p


def _cmd_synth(args: argparse.Namespace) -> int:
    from solq.data.synthetic import generate

    paths = generate(args.out, args.num_train, args.num_val, args.image_size, args.seed, val_seed=args.val_seed)
    for key, value in paths.items():
        print(f"{key}: {value}")
    return 0


def _cmd_pretrain_backbone(args: argparse.Namespace) -> int:
    from solq.engine.pretrain import pretrain_backbone

    meta = pretrain_backbone(args.out, data_root=args.data_root, num_train=args.num_train, steps=args.steps,
                             batch_size=args.batch_size, seed=args.seed, num_threads=args.threads,
                             instance_weight=args.instance_weight)
    print(f"{args.out}: pixel accuracy {100 * meta['pixel_accuracy']:.1f}%, mean IoU {100 * meta['mean_iou']:.1f}% "
          f"on {meta['num_images']} val scenes ({meta['seconds']:.0f} s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from solq.workbench.demo import run_demo

    report = run_demo(args.out, steps=args.steps, jobs=args.jobs)
    print(f"report: {report}")
    return 0


def _load_config(args: argparse.Namespace):
    from solq.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from solq.engine.train import fit

    cfg = _load_config(args)
    if args.output:
        cfg.runtime.output_dir = args.output
    if args.resume:
        cfg.runtime.resume = args.resume
    result = fit(cfg, save_every_steps=args.save_every_steps, progress_bar=not args.no_progress)
    if _is_main_rank():
        _print_metrics(result["metrics"])
        print(f"run folder: {result['output_dir']} (epoch {result['epoch']}, step {result['step']})")
    return args.exit_code_on_stop if result["stopped"] else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from solq.engine.evaluate import run_evaluation

    metrics = run_evaluation(args.checkpoint, config=args.config, overrides=args.overrides,
                             output_dir=args.output, dump_dir=args.dump, progress_bar=not args.no_progress)
    if _is_main_rank():
        _print_metrics(metrics)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from solq.engine.predict import predict
    from solq.viz.draw import overlay

    out = predict(args.checkpoint, args.images, output_dir=args.output, score_threshold=args.score_threshold,
                  device=args.device, config=args.config, overrides=args.overrides,
                  draw=None if args.no_overlays else overlay, progress_bar=not args.no_progress)
    print(f"{out['detections']} detections on {out['images']} images -> {out['output_dir']}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from solq.config import ConfigError
    from solq.engine.bench import bench_modes, format_bench_table

    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected HxW such as 512x852, got {args.size!r}") from None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = bench_modes(_load_config(args), modes, json_path=args.output, height=height, width=width,
                          batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                          train_iters=args.train_iters, device=args.device)
    print(format_bench_table(results))
    print(f"written: {args.output}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from solq.engine.export import export_onnx

    r = export_onnx(args.checkpoint, args.output, opset=args.opset, height=args.height, width=args.width,
                    image=args.image, tolerance=args.tolerance)
    h, w = r["trace_size"]
    print(f"{r['path']}: inputs images [B,3,H,W] float32 and mask [B,H,W] bool (True on padding), any B, H, W "
          f"(traced at {h}x{w}); outputs {', '.join(r['outputs'])}; attention backend {r['backend']} (grid_sample), "
          f"opset {r['opset']}")
    for c in r["checks"]:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in c["max_abs_diff"].items())
        how = "padded" if c["padded"] else "unpadded"
        print(f"max |onnxruntime - PyTorch| on the sample image at {c['size'][0]}x{c['size'][1]} ({how}): "
              f"{c['max_diff']:.2e} (limit {args.tolerance:g}; {diffs})")
    return 0


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun launch (the process group is already gone when results are printed)."""
    return os.environ.get("RANK", "0") == "0"


def _print_metrics(metrics: dict) -> None:
    from solq.evaluation import format_table

    table = {k: v for k, v in metrics.items() if k in ("bbox", "segm", "boundary")}
    if table:
        print(format_table(table))


def main(argv: list[str] | None = None) -> int:
    from solq.config import ConfigError

    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # bad preset, YAML, --set key or value: a message, not a traceback
        print(f"solq {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"solq {args.command}: error: {e}", file=sys.stderr)
        return 1


def _user_errors() -> tuple:
    """Errors whose message says everything (no traceback): unreadable checkpoints, missing inputs, bad
    annotation files, unwritable outputs (full disk, read-only folder), a non-finite loss, an ONNX export that
    cannot be made or does not match PyTorch."""
    from solq.data.validation import DatasetError
    from solq.engine.checkpoint import CheckpointError
    from solq.engine.export import ExportError
    from solq.engine.train import NonFiniteLossError
    from solq.files import OutputWriteError

    return (CheckpointError, NonFiniteLossError, FileNotFoundError, DatasetError, OutputWriteError, ExportError)


if __name__ == "__main__":
    sys.exit(main())

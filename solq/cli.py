"""The ``solq`` command. ``solq --help`` lists the subcommands; ``solq CMD --help`` explains each option.

Each subcommand parses its options here and calls one library function, so everything the command
line does is also reachable from Python and from the notebooks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = {
    "synth": "solq synth --out data/synthetic --num-train 200 --num-val 50 --image-size 256 --seed 0",
    "demo": "solq demo --out demo_output",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="solq", description="SOLQ research workbench: data, training, evaluation, reproduction.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog="example:\n  " + EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = add("synth", "Generate a COCO-format dataset of procedural scenes (same seed, same bytes).")
    s.add_argument("--out", required=True, type=Path, help="output folder (train/, val/, annotations/)")
    s.add_argument("--num-train", type=int, default=200, help="number of training images (default 200)")
    s.add_argument("--num-val", type=int, default=50, help="number of validation images (default 50)")
    s.add_argument("--image-size", type=int, default=256, help="side of the square images in px (default 256)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=_cmd_synth)

    d = add("demo", "The main job on the embedded data (what `make demo` runs).")
    d.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    d.set_defaults(func=_cmd_demo)
    return p


def _cmd_synth(args: argparse.Namespace) -> int:
    from solq.data.synthetic import generate

    paths = generate(args.out, args.num_train, args.num_val, args.image_size, args.seed)
    for key, value in paths.items():
        print(f"{key}: {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from solq.workbench.demo import run_demo

    report = run_demo(args.out)
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Where the forward's time goes, by part of the model, with torch.profiler (issue 16).

    python benchmarks/profile_forward.py --config paper-r50 --size 512x852 --threads 2 --repeats 3 --out profile.json

Builds the model (random weights: time does not depend on them), labels each part with
``torch.profiler.record_function`` through forward hooks, profiles ``--repeats`` forwards (after a warm-up) and the
post-processing, and prints one row per part: milliseconds per forward (the median over the repeats) and its share
of the forward. Parts: the backbone, the position encoding, the input projections, then per encoder / decoder
layer kind: the linear layers of the deformable attention (value, offsets, weights, output), the deformable
sampling itself (the attention module's time minus those linears), the decoder's self-attention, the layer
norms and the FFN linears; the heads; everything else in the forward (reshapes, masks, two-stage proposals, the
ReLU of the FFNs: "other"); and the post-processing, outside the forward. A second table lists the aten operators
by self CPU time. ``--inference-opt`` profiles :func:`solq.models.inference.optimize_for_inference`'s copy.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from solq.config import load_config  # noqa: E402
from solq.engine.allocator import retain_freed_memory  # noqa: E402
from solq.models import build_model  # noqa: E402
from solq.models.inference import optimize_for_inference  # noqa: E402

# (regex on the module's name, label); the first match wins; modules matching none are not labelled
PARTS = [
    (r"backbone\.0$", "backbone"),
    (r"backbone\.1$", "position encoding"),
    (r"input_proj\.\d+$", "input projections"),
    (r"transformer\.encoder\.layers\.\d+\.self_attn$", "encoder: deformable attention (all)"),
    (r"transformer\.encoder\.layers\.\d+\.self_attn\.\w+$", "encoder: attention linears"),
    (r"transformer\.encoder\.layers\.\d+\.norm\d$", "encoder: layer norms"),
    (r"transformer\.encoder\.layers\.\d+\.linear\d$", "encoder: FFN linears"),
    (r"transformer\.decoder\.layers\.\d+\.cross_attn$", "decoder: deformable attention (all)"),
    (r"transformer\.decoder\.layers\.\d+\.cross_attn\.\w+$", "decoder: attention linears"),
    (r"transformer\.decoder\.layers\.\d+\.self_attn$", "decoder: self-attention"),
    (r"transformer\.decoder\.layers\.\d+\.norm\d$", "decoder: layer norms"),
    (r"transformer\.decoder\.layers\.\d+\.linear\d$", "decoder: FFN linears"),
    (r"(class_embed|bbox_embed|vector_embed)(\.\d+)?$|transformer\.(reference_points|enc_output\w*)$", "heads"),
]
# the rows of the table, in the model's order: the labelled parts less the attention modules' totals, the sampling
# derived from them, and what no label covers
ROWS = ("backbone", "position encoding", "input projections", "encoder: attention linears",
        "encoder: deformable sampling", "encoder: layer norms", "encoder: FFN linears", "decoder: attention linears",
        "decoder: deformable sampling", "decoder: self-attention", "decoder: layer norms", "decoder: FFN linears",
        "heads", "other")
DERIVED = {  # the sampling = the attention module minus its linears
    "encoder: deformable sampling": ("encoder: deformable attention (all)", "encoder: attention linears"),
    "decoder: deformable sampling": ("decoder: deformable attention (all)", "decoder: attention linears"),
}


def label_modules(model: torch.nn.Module) -> list:
    """Wrap each module whose name matches :data:`PARTS` in a ``record_function`` of its label; returns the hook
    handles (call ``.remove()`` on each to undo)."""
    handles = []
    for name, module in model.named_modules():
        label = next((lab for pattern, lab in PARTS if re.search(pattern, name)), None)
        if label is None:
            continue
        stack: list = []

        def enter(_m, _inputs, label=label, stack=stack):
            stack.append(record_function(label))
            stack[-1].__enter__()

        def leave(_m, _inputs, _output, stack=stack):
            stack.pop().__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def profile_parts(model, postprocessor, images, mask, repeats: int) -> tuple[dict, list]:
    """Milliseconds per forward of each labelled part (median over ``repeats`` profiled forwards), "forward",
    "other" and "post-processing"; and the aten operators of the last repeat by self CPU time (top 15)."""
    sizes = torch.tensor([list(images.shape[-2:])] * images.shape[0])
    per_part: dict[str, list[float]] = {}
    labels = {lab for _, lab in PARTS} | {"forward", "post-processing"}
    handles = label_modules(model)
    try:
        with torch.no_grad():
            model(images, mask)  # warm-up
            for _ in range(repeats):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    with record_function("forward"):
                        out = model(images, mask)
                    with record_function("post-processing"):
                        postprocessor(out, sizes, with_masks=model.predicts_masks, input_sizes=sizes)
                totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
                row = {lab: totals.get(lab, 0.0) for lab in labels}
                for name, (whole, part) in DERIVED.items():
                    row[name] = row[whole] - row[part]
                row["other"] = row["forward"] - sum(row[lab] for lab in ROWS[:-1])
                for k, v in row.items():
                    per_part.setdefault(k, []).append(v)
    finally:
        for h in handles:
            h.remove()
    ops = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
           for e in prof.key_averages() if e.key.startswith("aten::")]
    ops.sort(key=lambda r: -r["self_ms"])
    return {k: statistics.median(v) for k, v in per_part.items()}, ops[:15]


def format_parts(parts: dict) -> str:
    """Markdown table: part, ms per forward, % of the forward (post-processing: % of the forward too)."""
    fwd = parts["forward"]
    lines = ["| part | ms | % of forward |", "|---|---|---|"]
    lines += [f"| {lab} | {parts[lab]:.1f} | {100 * parts[lab] / fwd:.1f} |" for lab in ROWS]
    lines += [f"| **forward** | {fwd:.1f} | 100 |",
              f"| post-processing (after the forward) | {parts['post-processing']:.1f} | "
              f"{100 * parts['post-processing'] / fwd:.1f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper-r50")
    p.add_argument("--mode", default="uqr", choices=["uqr", "sqr", "det"])
    p.add_argument("--size", default="512x852", help="HxW of the one input image")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inference-opt", action="store_true", help="profile the folded, channels_last copy")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", help="write the tables as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as solq bench and solq eval run (runtime.keep_freed_memory)
    h, w = (int(v) for v in args.size.lower().split("x"))
    cfg = load_config(args.config, [f"model.mode={args.mode}", "model.num_classes=91", "model.backbone_weights=",
                                    *args.set])
    torch.manual_seed(0)
    model, _, postprocessor = build_model(cfg)
    model.eval()
    if args.inference_opt:
        model = optimize_for_inference(model, inplace=True)
    images, mask = torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool)
    parts, ops = profile_parts(model, postprocessor, images, mask, args.repeats)
    print(f"{args.config} {args.mode} {h}x{w}, {torch.get_num_threads()} threads, attention backend "
          f"{cfg.model.attention_backend}{', inference-opt' if args.inference_opt else ''}: median of "
          f"{args.repeats} profiled forwards (torch.profiler, CPU time)")
    print(format_parts(parts))
    print("\n| aten op (last repeat) | self ms | calls |\n|---|---|---|")
    print("\n".join(f"| {r['op']} | {r['self_ms']:.1f} | {r['calls']} |" for r in ops))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "mode": args.mode, "size": [h, w],
                                              "threads": torch.get_num_threads(), "parts_ms": parts, "ops": ops,
                                              "inference_opt": args.inference_opt}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

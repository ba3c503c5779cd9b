"""Whole-model speed of the deformable attention backends: forward and training step, ``reference`` vs ``auto``.

Release-shaped model (config ``paper-r50``: R50, width 256, 300 queries, 6+6 layers, 91 classes, random
init with a fixed seed so every backend gets the same weights), one 512x852 image, batch 1. Each backend
runs in a fresh subprocess, so that its peak resident set size (``ru_maxrss``) is its own:

- the all-zero parameters of the init (last box/vector layers, attention and offset weights) get small
  seeded random values, so boxes and vectors depend on the sampled features and the comparison means
  something;
- forward in eval mode under ``torch.no_grad``: 1 warm-up, ``--repeat`` timed runs; the outputs
  (pred_logits, pred_boxes, pred_vectors) are saved so the parent can report the max abs difference;
- training step in train mode (forward + criterion on a few synthetic box-shaped targets + backward,
  no optimizer step): 1 warm-up, ``--repeat`` timed runs; the first timed step's loss is compared too.

Prints a table with min and median times, speed-ups against ``reference`` (ratio of the minima) and peak
RSS; writes it all as JSON with ``--out``. ``--profile`` adds the top 10 ops of one forward of each
backend (torch.profiler, by self CPU time). Both backends run with freed memory kept in the process, as
``solq`` runs (``runtime.keep_freed_memory``, ``solq/engine/allocator.py``); ``--release-memory`` measures
glibc's default instead. ``--bf16`` also times each backend's forward under bfloat16 autocast (the opt-in
inference mode) and reports how far its outputs are from the same backend's float32 ones.

    python benchmarks/bench_forward.py [--threads 2] [--repeat 3] [--out forward.json] [--profile]
                                       [--release-memory] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_vectors")
TOLERANCE = 1e-4  # the issue's target for the max abs difference against ``reference``


def build(backend: str, seed: int):
    """(model, criterion) of the release-shaped config with ``backend``, weights drawn from ``seed``."""
    from solq.config import load_config
    from solq.models import build_model

    cfg = load_config("paper-r50", overrides=["model.num_classes=91", "model.pretrained_backbone=false",
                                              f"model.attention_backend={backend}"])
    torch.manual_seed(seed)
    model, criterion, _ = build_model(cfg)
    perturb_zero_parameters(model, seed)
    return model, criterion, cfg


@torch.no_grad()
def perturb_zero_parameters(model: torch.nn.Module, seed: int, std: float = 0.02) -> int:
    """Fill the all-zero parameters with N(0, std^2) draws from ``seed``; returns how many tensors changed.

    At init the last box and vector layers, the attention-weight and the offset weights are zero, so the
    boxes and vectors would not depend on the sampled features at all (and the attention would be
    uniform): comparing backends on such a model proves nothing for those outputs.
    """
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            changed += 1
    return changed


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _times(fn, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of fn() after one warm-up call."""
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def top_ops(fn, n: int = 10) -> list[dict]:
    """The n ops with the largest self CPU time in one call of fn(): [{name, self_cpu_ms, cpu_total_ms,
    calls}] (torch.profiler; times per call of fn, summed over the op's invocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [dict(name=e.key, self_cpu_ms=e.self_cpu_time_total / 1e3, cpu_total_ms=e.cpu_time_total / 1e3,
                 calls=e.count) for e in events]


def run_backend(backend: str, args, outputs_path: Path) -> dict:
    """Child-process entry: times, loss and peak RSS of one backend; saves the forward outputs."""
    from solq.engine.bench import _random_targets
    from solq.engine.evaluate import weighted_total

    model, criterion, cfg = build(backend, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(1, 3, args.height, args.width, generator=g)
    mask = torch.zeros(1, args.height, args.width, dtype=torch.bool)
    res = dict(backend=backend)

    model.eval()
    with torch.no_grad():
        res["forward_s"] = _times(lambda: model(images, mask), args.repeat)
        out = model(images, mask)
        saved = {k: out[k] for k in OUTPUT_KEYS if k in out}
        if args.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                res["forward_bf16_s"] = _times(lambda: model(images, mask), args.repeat)
                low = model(images, mask)
            res["bf16_max_abs_diff"] = {k: (low[k].float() - saved[k]).abs().max().item() for k in saved}
        torch.save(saved, outputs_path)
        if args.profile:
            res["profile_forward"] = top_ops(lambda: model(images, mask))
    res["peak_rss_forward_mib"] = _peak_rss_mib()
    del out

    model.train()
    targets = _random_targets(1, args.height, args.width, 5, cfg.model.num_classes, torch.device("cpu"), g)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)
        loss.backward()
        losses.append(loss.item())

    torch.manual_seed(args.seed + 1)  # same dropout draws for every backend
    res["train_step_s"] = _times(step, args.repeat)
    res["loss_first_step"] = losses[0]
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


def child(backend: str, args) -> tuple[dict, dict]:
    """Run one backend in a fresh interpreter; returns (its result dict, its forward outputs)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outputs.pt"
        cmd = [sys.executable, __file__, "--_child", backend, str(path), "--threads", str(args.threads),
               "--repeat", str(args.repeat), "--seed", str(args.seed), "--height", str(args.height),
               "--width", str(args.width)] + [f"--{flag.replace('_', '-')}" for flag in
                                              ("profile", "release_memory", "bf16") if getattr(args, flag)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"backend {backend!r} failed:\n{proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(path)


def format_table(rows: dict, ref: str = "reference") -> str:
    """Rows per backend: forward and train-step min (median) seconds, speed-up vs ``ref``, peak RSS GiB."""
    head = (f"{'backend':<10} {'forward s':>16} {'x ref':>6} {'train step s':>16} {'x ref':>6} "
            f"{'peak RSS GiB':>12}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        f, t = r["forward_s"], r["train_step_s"]
        fx = min(rows[ref]["forward_s"]) / min(f) if ref in rows else float("nan")
        tx = min(rows[ref]["train_step_s"]) / min(t) if ref in rows else float("nan")
        lines.append(f"{name:<10} {min(f):>7.2f} ({statistics.median(f):>6.2f}) {fx:>5.2f}x "
                     f"{min(t):>7.2f} ({statistics.median(t):>6.2f}) {tx:>5.2f}x {r['peak_rss_mib'] / 1024:>12.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--backends", nargs="+", default=["reference", "auto"])
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=852)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="list the top 10 ops of one forward per backend")
    ap.add_argument("--release-memory", action="store_true",
                    help="glibc's default of unmapping freed memory (solq keeps it: runtime.keep_freed_memory)")
    ap.add_argument("--bf16", action="store_true", help="also time the forward under bfloat16 autocast")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        if not args.release_memory:
            from solq.engine.allocator import retain_freed_memory
            retain_freed_memory()
        print(json.dumps(run_backend(args._child[0], args, Path(args._child[1]))))
        return {}

    from solq.engine.bench import matmul_gflops

    load_before = os.getloadavg()
    rows, outputs = {}, {}
    for name in args.backends:
        rows[name], outputs[name] = child(name, args)
    load_after = os.getloadavg()
    base = args.backends[0]
    diffs = {name: {k: (outputs[name][k] - outputs[base][k]).abs().max().item()
                    for k in outputs[base] if k in outputs[name]} for name in args.backends[1:]}
    for name in args.backends[1:]:
        diffs[name]["loss_first_step"] = abs(rows[name]["loss_first_step"] - rows[base]["loss_first_step"])
    matmul = matmul_gflops()

    print(f"# paper-r50 width 256, {args.height}x{args.width}, batch 1, threads={args.threads}, "
          f"repeat={args.repeat} (+1 warm-up), torch={torch.__version__}, "
          f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f}, fp32 matmul {matmul:.1f} GFLOP/s, freed memory "
          f"{'released (glibc default)' if args.release_memory else 'kept'}")
    print(format_table(rows, base))
    print(f"# times: min (median); x ref: ratio of the minima; peak RSS: ru_maxrss of the backend's process")
    for name, d in diffs.items():
        worst = max(v for k, v in d.items() if k in OUTPUT_KEYS)
        print(f"# {name} vs {base}: max abs diff " + ", ".join(f"{k} {v:.2e}" for k, v in d.items())
              + f" -> {'within' if worst <= TOLERANCE else 'ABOVE'} {TOLERANCE:g}")
    for name, r in rows.items():
        if "forward_bf16_s" in r:
            diff = ", ".join(f"{k} {v:.2e}" for k, v in r["bf16_max_abs_diff"].items())
            print(f"# {name} bf16 autocast forward: {min(r['forward_bf16_s']):.2f} s "
                  f"({min(r['forward_s']) / min(r['forward_bf16_s']):.2f}x its fp32), max abs diff {diff}")
    for name, r in rows.items():
        if "profile_forward" in r:
            print(f"# top ops of one {name} forward (self CPU ms, calls):")
            for op in r["profile_forward"]:
                print(f"#   {op['name']:<48} {op['self_cpu_ms']:>9.1f} {op['calls']:>6}")
    result = dict(threads=args.threads, repeat=args.repeat, freed_memory_kept=not args.release_memory,
                  input=[args.height, args.width], batch_size=1,
                  torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), load_avg_before=load_before[0], load_avg_after=load_after[0],
                  matmul_gflops=matmul, tolerance=TOLERANCE, backends=rows, max_abs_diff=diffs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

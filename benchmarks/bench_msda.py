"""Speed and memory of the multi-scale deformable attention backends (reference / fused / triton).

Shapes of a width-256 model at 512x852 (levels (64,107),(32,54),(16,27),(8,14); B=1, M=8 heads of D=32,
L=4 levels, P=4 points): the encoder (Q = S = 9120 queries) and the decoder (Q = 300). For each backend and
shape it times the forward (no grad, inference) and forward+backward (gradients for value, locations and
weights), repetitions interleaved across backends so that load from other processes hits all alike, and
reports the minimum and median. Peak memory is measured in a fresh subprocess per (backend, shape, mode):
on CPU the rise of the peak resident set size over the inputs, on CUDA ``max_memory_allocated``.

Freed memory is kept in the process, as ``solq`` runs (``runtime.keep_freed_memory``); ``--release-memory``
measures glibc's default instead.

    python benchmarks/bench_msda.py [--threads 2] [--repeat 5] [--device cpu] [--out msda.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = [(64, 107), (32, 54), (16, 27), (8, 14)]
SHAPES = {"encoder": sum(h * w for h, w in LEVELS), "decoder": 300}  # name -> Q


def backends(device: str) -> dict:
    """name -> sampling function available on this device."""
    from solq.models.deformable_attention import ms_deform_attn_reference
    from solq.models.msda_fused import ms_deform_attn_fused
    from solq.models.msda_triton import ms_deform_attn_triton, triton_unavailable_reason
    found = {"reference": ms_deform_attn_reference, "fused": ms_deform_attn_fused}
    if device.startswith("cuda"):
        reason = triton_unavailable_reason()
        if reason is None:
            found["triton"] = ms_deform_attn_triton
        else:
            print(f"# triton skipped: {reason}")
    return found


def make_inputs(Q: int, device: str, B: int = 1, M: int = 8, D: int = 32, P: int = 4, seed: int = 0):
    """(value [B,S,M,D], spatial_shapes, level_start_index, locations [B,Q,M,L,P,2], weights [B,Q,M,L,P]).

    Locations scatter a few pixels around a reference point per query, as the offset head does at init:
    the pixel centres of all levels when Q == S (encoder, queries are the tokens), random points otherwise.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(LEVELS)
    value = torch.randn(B, S, M, D, generator=g)
    if Q == S:
        ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                    indexing="xy"), -1).reshape(-1, 2) for h, w in LEVELS])
        ref = ref.view(1, Q, 1, 1, 1, 2).expand(B, Q, 1, 1, 1, 2)
    else:
        ref = torch.rand(B, Q, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(B, Q, M, L, P, 2, generator=g) * 3 / shapes.flip(-1).view(1, 1, 1, L, 1, 2)
    loc = ref + offsets
    aw = torch.randn(B, Q, M, L * P, generator=g).softmax(-1).view(B, Q, M, L, P)
    return [t.to(device) for t in (value, shapes, starts, loc, aw)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(fn, inputs, mode: str, device: str) -> float:
    """One forward (mode 'fwd', no grad) or forward+backward ('fwdbwd'); returns wall seconds."""
    value, shapes, starts, loc, aw = inputs
    if mode == "fwd":
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(value, shapes, starts, loc, aw)
        _sync(device)
        return time.perf_counter() - t0
    v, lo, a = (t.detach().requires_grad_() for t in (value, loc, aw))
    _sync(device)
    t0 = time.perf_counter()
    out = fn(v, shapes, starts, lo, a)
    out.backward(torch.ones_like(out))
    _sync(device)
    return time.perf_counter() - t0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_mib(backend: str, shape: str, mode: str, device: str) -> float:
    """Child-process entry: peak memory of one run above the inputs, in MiB."""
    fn = backends(device)[backend]
    inputs = make_inputs(SHAPES[shape], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(fn, inputs, mode, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    run_once(fn, inputs, mode, device)
    return (_rss_kib("VmHWM") - base) / 1024


def measure_memory(backend: str, shape: str, mode: str, device: str, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--_memory", backend, shape, mode, "--device", device,
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"# memory measurement failed for {backend}/{shape}/{mode}: {proc.stderr.strip()[-300:]}")
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions after one warm-up")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-run memory subprocesses")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--release-memory", action="store_true",
                    help="glibc's default of unmapping freed memory (solq keeps it: runtime.keep_freed_memory)")
    ap.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.release_memory:
        from solq.engine.allocator import retain_freed_memory
        retain_freed_memory()
    if args._memory:
        print(peak_memory_mib(*args._memory, args.device))
        return {}

    fns = backends(args.device)
    rows = []
    for shape in args.shapes:
        inputs = make_inputs(SHAPES[shape], args.device)
        for mode in ("fwd", "fwdbwd"):
            times = {name: [] for name in fns}
            for name, fn in fns.items():  # warm-up (and Triton compilation)
                run_once(fn, inputs, mode, args.device)
            for _ in range(args.repeat):  # interleaved, so transient load hits every backend
                for name, fn in fns.items():
                    times[name].append(run_once(fn, inputs, mode, args.device) * 1e3)
            for name in fns:
                mem = None if args.no_memory else measure_memory(name, shape, mode, args.device, args.threads)
                rows.append(dict(backend=name, shape=shape, Q=SHAPES[shape], mode=mode,
                                 min_ms=min(times[name]), median_ms=statistics.median(times[name]),
                                 peak_mib=mem))
    ref = {(r["shape"], r["mode"]): r["min_ms"] for r in rows if r["backend"] == "reference"}
    for r in rows:
        r["speedup_vs_reference"] = ref[(r["shape"], r["mode"])] / r["min_ms"]

    mem_kind = "peak alloc" if args.device.startswith("cuda") else "peak RSS rise"
    print(f"# device={args.device} threads={args.threads} repeat={args.repeat} torch={torch.__version__} "
          f"load={os.getloadavg()[0]:.2f} freed memory {'released' if args.release_memory else 'kept'}")
    print(f"{'backend':<10} {'shape':<8} {'Q':>5} {'fwd ms':>16} {'fwd+bwd ms':>16} "
          f"{'fwd MiB':>8} {'f+b MiB':>8} {'x ref fwd':>9} {'x ref f+b':>9}")
    by = {(r["backend"], r["shape"], r["mode"]): r for r in rows}
    for shape in args.shapes:
        for name in fns:
            f, fb = by[(name, shape, "fwd")], by[(name, shape, "fwdbwd")]
            mem = lambda r: "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"  # noqa: E731
            print(f"{name:<10} {shape:<8} {SHAPES[shape]:>5} "
                  f"{f['min_ms']:>7.1f} ({f['median_ms']:>6.1f}) {fb['min_ms']:>7.1f} ({fb['median_ms']:>6.1f}) "
                  f"{mem(f):>8} {mem(fb):>8} {f['speedup_vs_reference']:>8.2f}x {fb['speedup_vs_reference']:>8.2f}x")
    print(f"# times: min (median) over {args.repeat} runs; memory: {mem_kind} of one run above the inputs")
    result = dict(device=args.device, threads=args.threads, repeat=args.repeat, torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), load_avg=os.getloadavg()[0],
                  levels=LEVELS, heads=8, head_dim=32, points=4, memory=mem_kind, rows=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""One command for a CUDA machine: the Triton kernels checked on the GPU, forward FPS and AMP training speed.

Needs only the repository and torch, torchvision, triton, numpy, scipy, PyYAML, tqdm and pycocotools (imported by
``solq.engine``; on a machine without it carry its wheel). No network, no weights: every model is randomly
initialised (speed does not depend on the weights). Sections, each timed and reported even when another fails:

1. ``kernels``: ``ms_deform_attn_triton`` against ``ms_deform_attn_reference`` (grid_sample) run in float64 on
   the same inputs: the output and the gradients for value, sampling locations and attention weights, in
   float32, bfloat16 and float16 (all inputs in that dtype, and the autocast mix: value in half precision,
   locations and weights in float32), on odd shapes (1-4 levels, 1-8 heads, D not a power of two, points
   outside the maps, padding) and on the Table 5 shapes (encoder: 9,120 queries; decoder: 300). The error is
   max |got - want| / max |want| per tensor, against a tolerance per dtype. Also the time of one
   forward / forward+backward of each backend (reference, fused, triton) at the Table 5 shapes.
2. ``fps``: images/s of the network forward (backbone to heads, as the paper's Table 5 and the release's
   benchmark.py) of the ``paper-r50`` UQR and SQR models at 512x852, batch 1, float32 and bf16 autocast, with
   the triton backend (and the reference backend for UQR, for the kernel's share). The paper: UQR 24.1 FPS,
   SQR 19.3 FPS on a V100.
3. ``train``: AMP training steps (forward, loss, backward, AdamW step) of ``release-r50`` at batch 4 on random
   targets (800x1066 by default), bf16 and fp16 (with a GradScaler) and float32, with the peak GPU memory.

    python benchmarks/gpu_check.py [--out DIR] [--sections kernels fps train] [--quick]

Prints one table per section and writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. Exit status 0
when every check passed, 1 when a kernel check failed or a section raised, 2 without CUDA (nothing run).
``--device cpu`` with ``TRITON_INTERPRET=1`` runs the kernel section in Triton's CPU interpreter on small
shapes (what the test suite does to check this script).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from solq.engine.bench import timed_median  # noqa: E402

TABLE5_LEVELS = [(64, 107), (32, 54), (16, 27), (8, 14)]  # a width-256 model at 512x852 (strides 8..64)
# name: (level shapes, B, Q, M heads, D per head, P points, spread of the locations around [0,1], padded tokens)
ODD_CASES = {
    "3lvl_odd": ([(3, 5), (2, 3), (1, 1)], 2, 3, 2, 5, 2, 1.4, 0),
    "4lvl_D48": ([(4, 7), (2, 4), (1, 2), (1, 1)], 1, 2, 1, 48, 1, 1.4, 0),
    "8heads": ([(5, 3)], 1, 2, 8, 3, 1, 1.4, 0),
    "4points_far": ([(4, 6), (2, 3)], 2, 37, 2, 3, 4, 3.0, 3),
}
TABLE5_CASES = {
    "table5_decoder": (TABLE5_LEVELS, 1, 300, 8, 32, 4, 1.2, 0),
    "table5_encoder": (TABLE5_LEVELS, 1, sum(h * w for h, w in TABLE5_LEVELS), 8, 32, 4, 1.2, 0),
}
# max |got - want| / max |want|: float32 accumulation in every mode, so only the rounding of the inputs and
# outputs separates half precision from float64; the location gradient is scaled by the map sizes
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
PAPER_FPS = {"uqr": 24.1, "sqr": 19.3}  # Table 5, V100, 512x852


def make_inputs(case: tuple, device: torch.device, seed: int = 0) -> tuple:
    """Random float64 inputs of one case: (value [B,S,M,D], shapes [L,2], starts [L], locations [B,Q,M,L,P,2],
    weights [B,Q,M,L,P]); the last ``pad`` tokens of every level of image 0 are zero (padding)."""
    shapes, B, Q, M, D, P, spread, pad = case
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(B, int(sizes.sum()), M, D, generator=g, dtype=torch.float64)
    for st, n in zip(starts.tolist(), sizes.tolist()):
        if pad:
            value[0, st + max(n - pad, 0): st + n] = 0
    loc = torch.rand(B, Q, M, len(shapes), P, 2, generator=g, dtype=torch.float64) * spread - (spread - 1) / 2
    aw = torch.rand(B, Q, M, len(shapes), P, generator=g, dtype=torch.float64).softmax(-1)
    return tuple(t.to(device) for t in (value, spatial, starts, loc, aw))


def value_and_grads(fn: Callable, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[output, d/dvalue, d/dlocations, d/dweights] of <fn(*args), probe> for a fixed random probe."""
    ins = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*ins)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * probe.to(out.device, out.dtype)).sum(), [ins[0], ins[3], ins[4]])
    return [out.detach(), *grads]


def relative_errors(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> list[float]:
    """max |got - want| / max |want| for each pair (0 when both are zero)."""
    errs = []
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        diff = (a.double() - b.double()).abs().max().item()
        errs.append(diff / scale if scale > 0 else diff)
    return errs


def check_kernels(device: torch.device, cases: dict, dtypes: Sequence[torch.dtype]) -> list[dict]:
    """Triton against the float64 reference for every case, dtype and input mix (see the module docstring).
    Returns one row per (case, dtype, mix): errors of out / grad value / grad locations / grad weights,
    the tolerance and passed."""
    from solq.models.deformable_attention import ms_deform_attn_reference
    from solq.models.msda_triton import ms_deform_attn_triton

    rows = []
    for name, case in cases.items():
        exact = make_inputs(case, device)
        for dtype in dtypes:
            mixes = ["all"] if dtype == torch.float32 else ["all", "half value"]
            for mix in mixes:
                cast = [exact[0].to(dtype), exact[1], exact[2], exact[3].to(dtype if mix == "all" else torch.float32),
                        exact[4].to(dtype if mix == "all" else torch.float32)]
                # the truth: the rounded inputs, in float64
                want = value_and_grads(ms_deform_attn_reference,
                                       [t.double() if t.is_floating_point() else t for t in cast])
                row = {"case": name, "dtype": str(dtype).split(".")[1], "inputs": mix, "tolerance": TOLERANCE[dtype]}
                try:
                    got = value_and_grads(ms_deform_attn_triton, cast)
                    errs = relative_errors(got, want)
                    row.update(zip(("out", "grad_value", "grad_loc", "grad_weights"), errs))
                    row["dtypes_ok"] = got[0].dtype == dtype and got[1].dtype == dtype
                    row["passed"] = bool(row["dtypes_ok"] and max(errs[0], errs[1], errs[3]) <= TOLERANCE[dtype]
                                         and errs[2] <= 10 * TOLERANCE[dtype])
                except Exception as exc:  # a compile or launch failure is a failed check, reported
                    row.update(error=f"{type(exc).__name__}: {exc}", passed=False)
                rows.append(row)
    return rows


def time_kernels(device: torch.device, iters: int) -> list[dict]:
    """Milliseconds of one forward and one forward+backward of each backend at the Table 5 shapes, float32."""
    from solq.models.deformable_attention import ms_deform_attn_reference
    from solq.models.msda_fused import ms_deform_attn_fused
    from solq.models.msda_triton import ms_deform_attn_triton

    rows = []
    for name, case in TABLE5_CASES.items():
        value, shapes, starts, loc, aw = make_inputs(case, device)
        args = [value.float().requires_grad_(), shapes, starts, loc.float().requires_grad_(),
                aw.float().requires_grad_()]
        for backend, fn in (("reference", ms_deform_attn_reference), ("fused", ms_deform_attn_fused),
                            ("triton", ms_deform_attn_triton)):
            with torch.no_grad():
                fwd, _ = timed_median(lambda: fn(*args), iters, 3, device)

            def both():
                out = fn(*args)
                torch.autograd.grad(out.sum(), [args[0], args[3], args[4]])
            fb, _ = timed_median(both, iters, 3, device)
            rows.append({"shape": name, "backend": backend, "forward_ms": 1e3 * fwd, "forward_backward_ms": 1e3 * fb})
    return rows


def time_forward(device: torch.device, *, preset: str = "paper-r50", modes=("uqr", "sqr"), height: int = 512,
                 width: int = 852, iters: int = 50, warmup: int = 10, backend: str = "triton",
                 overrides: Sequence[str] = ()) -> list[dict]:
    """Forward images/s (median over ``iters`` synchronised batch-1 forwards and the spread) of each mode, with
    ``backend`` in float32 and under bf16 autocast, and UQR with the reference backend as well."""
    from solq.config import load_config
    from solq.engine.runtime import autocast
    from solq.models import build_model

    rows = []
    for mode in modes:
        variants = [(backend, "none"), (backend, "bf16")] + ([("reference", "none")] if mode == "uqr" else [])
        for attention, amp in variants:
            cfg = load_config(preset, [f"model.mode={mode}", "model.num_classes=91",
                                       f"model.attention_backend={attention}", "runtime.device=" + device.type,
                                       *overrides])
            torch.manual_seed(0)
            model = build_model(cfg)[0].to(device).eval()
            images = torch.randn(1, 3, height, width, device=device)
            mask = torch.zeros(1, height, width, dtype=torch.bool, device=device)

            def forward():
                with torch.no_grad(), autocast(device, amp):
                    return model(images, mask)
            med, spread = timed_median(forward, iters, warmup, device)
            rows.append({"mode": mode, "backend": attention, "amp": amp, "input": f"{height}x{width}",
                         "fps": 1.0 / med, "spread_ms": 1e3 * spread, "iters": iters,
                         "paper_fps_v100": PAPER_FPS.get(mode)})
            del model
    return rows


def time_training(device: torch.device, *, preset: str = "release-r50", batch: int = 4, height: int = 800,
                  width: int = 1066, steps: int = 10, warmup: int = 3, amps=("bf16", "fp16", "none"),
                  backend: str = "triton", overrides: Sequence[str] = ()) -> list[dict]:
    """Training steps/s (median of ``steps`` after ``warmup``) and peak memory of ``preset`` at ``batch`` images of
    height x width on random targets, for each autocast dtype (fp16 with a GradScaler, as ``solq train``)."""
    from solq.config import load_config
    from solq.engine.bench import _random_targets
    from solq.engine.evaluate import weighted_total
    from solq.engine.runtime import autocast, to_float32
    from solq.engine.optim import build_optimizer
    from solq.models import build_model

    rows = []
    for amp in amps:
        cfg = load_config(preset, ["model.num_classes=91", f"model.attention_backend={backend}",
                                   "runtime.device=" + device.type, *overrides])
        torch.manual_seed(0)
        model, criterion, _ = build_model(cfg)
        model.to(device).train()
        criterion.to(device)
        optimizer = build_optimizer(cfg, model)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        images = torch.randn(batch, 3, height, width, device=device)
        mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
        targets = _random_targets(batch, height, width, 8, 91, device, torch.Generator().manual_seed(0))
        losses = []

        def step():
            with autocast(device, amp):
                outputs = model(images, mask, targets=targets)
            loss, _ = weighted_total(criterion(to_float32(outputs), targets), criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        med, spread = timed_median(step, steps, warmup, device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        rows.append({"preset": preset, "backend": backend, "amp": amp, "batch": batch, "input": f"{height}x{width}",
                     "steps_per_s": 1.0 / med, "images_per_s": batch / med, "spread_ms": 1e3 * spread,
                     "steps": steps, "peak_gib": peak, "losses_finite": all(map(lambda v: v == v, losses))})
        del model, criterion, optimizer
    return rows


def markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (floats to 4 significant digits; missing keys blank)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable ({exc})"
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--sections", nargs="+", choices=["kernels", "fps", "train"], default=["kernels", "fps", "train"])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with TRITON_INTERPRET=1 for the "
                                                    "kernel section only (a check of this script)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (a first look; not for reporting)")
    p.add_argument("--train-size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}: "
              f"torch.cuda.is_available() is False); nothing was run. Run it on a machine with an NVIDIA GPU.",
              file=sys.stderr)
        return 2
    if device.type == "cpu":
        from solq.models.msda_triton import interpreting
        if not interpreting() or args.sections != ["kernels"]:
            print("gpu_check: --device cpu runs only '--sections kernels' under TRITON_INTERPRET=1 "
                  "(Triton's CPU interpreter, small shapes)", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "sections": {}}
    print("gpu_check:", ", ".join(f"{k} {v}" for k, v in report["environment"].items()), flush=True)
    shrink = 5 if args.quick else 1  # --quick divides the iteration counts
    plans = {
        "kernels": lambda: {"checks": check_kernels(device, ODD_CASES if device.type == "cpu" else
                                                    {**ODD_CASES, **TABLE5_CASES}, list(TOLERANCE)),
                            "timing": [] if device.type == "cpu" else time_kernels(device, 20 // shrink)},
        "fps": lambda: {"forward": time_forward(device, iters=50 // shrink, warmup=10 // shrink)},
        "train": lambda: {"training": time_training(device, height=args.train_size[0], width=args.train_size[1],
                                                    steps=10 // shrink, warmup=3 if not args.quick else 2)},
    }
    columns = {"checks": ["case", "dtype", "inputs", "out", "grad_value", "grad_loc", "grad_weights", "tolerance",
                          "passed", "error"],
               "timing": ["shape", "backend", "forward_ms", "forward_backward_ms"],
               "forward": ["mode", "backend", "amp", "input", "fps", "spread_ms", "iters", "paper_fps_v100"],
               "training": ["preset", "backend", "amp", "batch", "input", "steps_per_s", "images_per_s", "spread_ms",
                            "steps", "peak_gib", "losses_finite"]}
    failed = []
    md = [f"# gpu_check on {report['environment'].get('gpu', device)}", "",
          ", ".join(f"{k} {v}" for k, v in report["environment"].items())]
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            result = plans[name]()
        except Exception as exc:
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        result["seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        md += ["", f"## {name} ({result['seconds']:.0f} s)"]
        for key, rows in result.items():
            if isinstance(rows, list):
                table = markdown(rows, columns[key])
                md += ["", table]
                print(table, flush=True)
                if key == "checks" and not all(r["passed"] for r in rows):
                    failed.append(f"{name}: {sum(not r['passed'] for r in rows)} of {len(rows)} checks")
        if "error" in result:
            md += ["", f"FAILED: {result['error']}"]
        print(f"({name}: {result['seconds']:.0f} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))  # after every section: nothing lost
        (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print(f"\ngpu_check: {'FAILED: ' + '; '.join(failed) if failed else 'all checks passed'}; "
          f"{out / 'gpu_check.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

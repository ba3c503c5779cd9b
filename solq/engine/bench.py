"""``solq bench``: speed, memory, parameters and FLOPs of a config at a given input size (paper Table 5).

Measured per model mode (uqr, sqr, det):

- parameters: total, trainable, the D-DETR part and the mask branch (uqr: the vector MLP ``vector_embed``;
  sqr: everything outside the detector: attention map, FPN mask head, input reductions);
- FLOPs of one forward pass with ``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv ops; the
  deformable sampling ``grid_sample`` is not counted), split the same way; the uqr vector MLP runs on every
  decoder layer, so its last-layer share (what inference needs) is also given; and the FLOPs of decoding
  one mask vector (the inverse DCT). The paper's "FLOPs" follow the fvcore convention of one
  multiply-add = 1, i.e. our GMACs = GFLOPs / 2;
- inference images/s of the network forward alone (as the release's benchmark.py), with the
  post-processing (top-k, decode, paste at the input size), and of the forward of the inference-optimised copy
  (:func:`solq.models.inference.optimize_for_inference`: folded norms, channels_last backbone; its largest
  relative output difference is reported), all timed in one interleaved loop (they alternate call by call,
  after the same warm-up, so a machine that slows down or speeds up mid-run moves them alike): the median
  and the min-max spread of each over the same number of iterations;
- training steps/s (forward, loss, backward, AdamW step) on random targets;
- peak memory: ``max_memory_allocated`` on CUDA, else the process's peak RSS (Linux: VmHWM reset before
  each phase; elsewhere ``resource.ru_maxrss``, which covers the whole process);
- the machine's measured float32 matmul rate (GFLOP/s of a 2048x2048 product) beside the model's achieved
  rate (counted forward FLOPs / forward time), so the distance to the compute floor is visible.
"""
from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from solq.config import Config
from solq.engine.distributed import resolve_device
from solq.engine.evaluate import weighted_total
from solq.engine.optim import build_optimizer
from solq.engine.runtime import configure_runtime
from solq.models import build_model
from solq.models.inference import optimize_for_inference

__all__ = ["MASK_BRANCH", "mask_branch_names", "count_parameters", "count_flops", "matmul_gflops", "timed_median",
           "timed_interleaved", "benchmark", "bench_modes", "format_bench_table"]

# top-level submodules that form the mask branch, per model class
MASK_BRANCH = {"SOLQ": ("vector_embed",), "SQRModel": ("seg_input_proj", "attention", "mask_head")}


def mask_branch_names(model: torch.nn.Module) -> tuple[str, ...]:
    return MASK_BRANCH.get(type(model).__name__, ())


def count_parameters(model: torch.nn.Module) -> dict:
    """{"total", "trainable", "detector", "mask_branch"} parameter counts (shared tensors once)."""
    prefixes = tuple(p + "." for p in mask_branch_names(model))
    total = trainable = mask = 0
    for name, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        mask += p.numel() if name.startswith(prefixes) else 0
    return {"total": total, "trainable": trainable, "detector": total - mask, "mask_branch": mask}


def count_flops(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> dict:
    """FLOPs of one forward: {"total", "mask_branch", "detector"} (FlopCounterMode, 2 per multiply-add).

    Runs with autograd enabled: FlopCounterMode's module tracker fails on some no-grad views.
    """
    from torch.utils.flop_counter import FlopCounterMode

    root = type(model).__name__
    with FlopCounterMode(display=False) as counter:
        model(images, mask)
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}  # hierarchical per module
    total = counter.get_total_flops()
    mask_flops = 0
    for name in mask_branch_names(model):
        key = f"{root}.{name}"
        if key in flops:
            mask_flops += flops[key]
        else:  # a ModuleList is never called itself: add up its direct children
            mask_flops += sum(v for k, v in flops.items() if k.startswith(key + ".") and "." not in k[len(key) + 1:])
    return {"total": int(total), "mask_branch": int(mask_flops), "detector": int(total - mask_flops)}


def matmul_gflops(device: Optional[str | torch.device] = None, *, size: int = 2048, repeats: int = 5,
                  dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul rate in GFLOP/s: best of ``repeats`` timed [size,size] @ [size,size] products
    (2 * size**3 FLOPs each, after one warm-up), at the current ``torch.get_num_threads()``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g, dtype=dtype).to(dev)
    b = torch.randn(size, size, generator=g, dtype=dtype).to(dev)
    out = torch.empty(size, size, dtype=dtype, device=dev)
    torch.mm(a, b, out=out)  # warm-up: thread pool, allocator, kernel selection
    _sync(dev)
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


def _decode_flops(codec) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    if codec is None:
        return 0
    with FlopCounterMode(display=False) as counter:
        codec.decode(torch.zeros(1, codec.dim))
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    """Bytes: peak allocated on CUDA since the last reset; on the CPU the peak RSS of the process (Linux:
    VmHWM, which :func:`_reset_peak` resets; elsewhere ``ru_maxrss`` since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _random_targets(batch: int, height: int, width: int, num_objects: int, num_classes: int,
                    device: torch.device, generator: torch.Generator) -> list[dict]:
    """Training targets with random boxes and box-shaped masks, in the format of solq.data."""
    targets = []
    for _ in range(batch):
        c = torch.rand(num_objects, 2, generator=generator) * 0.6 + 0.2
        s = torch.rand(num_objects, 2, generator=generator) * 0.3 + 0.05
        boxes = torch.cat([c, s], 1)  # cx, cy, w, h normalised
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        xyxy = torch.cat([c - s / 2, c + s / 2], 1) * scale
        ys, xs = torch.arange(height)[None, :, None] + 0.5, torch.arange(width)[None, None, :] + 0.5
        masks = ((xs >= xyxy[:, 0, None, None]) & (xs <= xyxy[:, 2, None, None])
                 & (ys >= xyxy[:, 1, None, None]) & (ys <= xyxy[:, 3, None, None]))
        labels = torch.randint(1, num_classes, (num_objects,), generator=generator)
        targets.append({k: v.to(device) for k, v in {
            "boxes": boxes, "boxes_xyxy": xyxy, "masks": masks, "labels": labels,
            "size": torch.tensor([height, width]), "orig_size": torch.tensor([height, width])}.items()})
    return targets


def _timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of fn() (mean over iters after warmup)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / max(iters, 1)


def timed_interleaved(fns: Sequence[Callable[[], object]], iters: int, warmup: int, device: torch.device, *,
                      clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Time several callables in one interleaved loop.

    Each of ``warmup`` untimed rounds and ``iters`` timed rounds calls every fn once; the order rotates from round
    to round (round i starts at fn i mod len(fns)), so no fn always runs first or always after another. The device
    is synchronised around each timed call, and ``clock`` (seconds; ``time.perf_counter`` by default, injectable
    for tests) reads the time.

    Returns one dict per fn, in the order of ``fns``: {"median", "min", "max", "q1", "q3"} in seconds per call
    (q1/q3: the quartiles, ``statistics.quantiles`` inclusive method) and "iters", the number of timed calls.
    """
    if not fns:
        raise ValueError("timed_interleaved needs at least one callable")
    iters = max(iters, 1)
    n = len(fns)
    for r in range(warmup):
        for j in range(n):
            fns[(r + j) % n]()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(iters):
        for j in range(n):
            k = (r + j) % n
            _sync(device)
            t0 = clock()
            fns[k]()
            _sync(device)
            times[k].append(clock() - t0)
    stats = []
    for t in times:
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else (t[0], t[0], t[0])
        stats.append({"median": statistics.median(t), "min": min(t), "max": max(t), "q1": q1, "q3": q3,
                      "iters": len(t)})
    return stats


def timed_median(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(median, max - min) seconds of fn() over ``iters`` calls after ``warmup``, the device synchronised around
    each call (so one slow call shows as spread instead of moving a mean)."""
    (s,) = timed_interleaved([fn], iters, warmup, device)
    return s["median"], s["max"] - s["min"]


def _max_relative_difference(got: dict, want: dict) -> float:
    """max over the output tensors of max |got - want| / max |want| (the two models' outputs, same keys)."""
    worst = 0.0
    for key, ref in want.items():
        if torch.is_tensor(ref) and ref.is_floating_point() and ref.numel():
            scale = ref.abs().max().item() or 1.0
            worst = max(worst, (got[key].float() - ref.float()).abs().max().item() / scale)
    return worst


def _fps_stats(prefix: str, stats: dict, batch_size: int) -> dict:
    """FPS keys from one :func:`timed_interleaved` result: ``{prefix}`` (median images/s), ``{prefix}_min`` and
    ``{prefix}_max`` (from the slowest and the fastest call)."""
    return {prefix: batch_size / stats["median"], f"{prefix}_min": batch_size / stats["max"],
            f"{prefix}_max": batch_size / stats["min"]}


def benchmark(cfg: Config, *, height: int = 512, width: int = 852, batch_size: int = 1, iters: int = 10,
              warmup: int = 2, train_iters: int = 3, device: Optional[str] = None, seed: int = 0) -> dict:
    """Measure one config (see the module docstring). ``cfg.model.num_classes`` 0 means COCO's 91.

    Returns a flat dict: mode, input size, params_* (counts), gflops_* (and gmacs_*), fps_forward and
    fps_with_postprocess (medians of ``iters`` interleaved calls each after ``warmup`` rounds, see
    :func:`timed_interleaved`) with their _min/_max (the spread), timing_iters and timing_warmup, the seconds per
    call of each (time_forward_s, time_with_postprocess_s: median, min, max, q1, q3, iters), the same for the
    inference-optimised copy (fps_forward_inference_opt*, time_forward_inference_opt_s) with its largest relative
    output difference (inference_opt_max_rel_diff), achieved_gflops_forward and
    achieved_gflops_forward_inference_opt, machine_matmul_gflops, train_steps_per_s, peak_memory_*_mb
    (inference: one forward and post-processing of the model alone, before the optimised copy is made), device,
    torch version. With ``cfg.runtime.compile`` (a backend name) the model
    compiled by ``torch.compile`` joins the interleaved loop: compile_backend, compile_s (its first call, which
    compiles), compiled_max_rel_diff, fps_forward_compiled* and time_forward_compiled_s (inference only; the
    training steps stay eager).
    """
    cfg = copy.deepcopy(cfg)
    configure_runtime(cfg)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = 91
    dev = resolve_device(device or cfg.runtime.device)
    torch.manual_seed(seed)
    model, criterion, postprocessor = build_model(cfg)
    model.to(dev)
    criterion.to(dev)
    images = torch.randn(batch_size, 3, height, width, device=dev)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=dev)
    sizes = torch.tensor([[height, width]] * batch_size, device=dev)
    params = count_parameters(model)
    model.eval()
    flops = count_flops(model, images, mask)
    codec = getattr(postprocessor, "codec", None)
    mask_last = flops["mask_branch"] / cfg.model.dec_layers if type(model).__name__ == "SOLQ" else flops["mask_branch"]
    result = {"mode": cfg.model.mode, "backbone": cfg.model.backbone, "hidden_dim": cfg.model.hidden_dim,
              "input": [height, width], "batch_size": batch_size, "device": str(dev), "torch": torch.__version__,
              **{f"params_{k}": v for k, v in params.items()},
              **{f"gflops_{k}": v / 1e9 for k, v in flops.items()},
              "gflops_mask_branch_last_layer": mask_last / 1e9, "gflops_decode_one_mask": _decode_flops(codec) / 1e9}
    result.update({k.replace("gflops", "gmacs"): v / 2 for k, v in list(result.items()) if k.startswith("gflops")})

    _reset_peak(dev)
    with torch.no_grad():  # the inference peak: one model, forward and post-processing, before the copy below exists
        want = model(images, mask)
        postprocessor(want, sizes, with_masks=model.predicts_masks, input_sizes=sizes)
    result["peak_memory_inference_mb"] = _peak_memory(dev) / 2 ** 20
    fast = optimize_for_inference(model)  # a copy: folded norms, channels_last backbone
    fns = [lambda: model(images, mask),
           lambda: postprocessor(model(images, mask), sizes, with_masks=model.predicts_masks, input_sizes=sizes),
           lambda: fast(images, mask)]
    with torch.no_grad():
        result["inference_opt_max_rel_diff"] = _max_relative_difference(fast(images, mask), want)
        if cfg.runtime.compile:  # the eager model compiled (same weights); its first call compiles
            compiled = torch.compile(model, backend=cfg.runtime.compile)
            start = time.perf_counter()
            got = compiled(images, mask)
            _sync(dev)
            result["compile_s"] = time.perf_counter() - start
            result["compile_backend"] = cfg.runtime.compile
            result["compiled_max_rel_diff"] = _max_relative_difference(got, want)
            fns.append(lambda: compiled(images, mask))
        times = timed_interleaved(fns, iters, warmup, dev)
    del fast, want
    names = ["forward", "with_postprocess", "forward_inference_opt", "forward_compiled"]
    for name, t in zip(names, times):
        result.update(_fps_stats(f"fps_{name}", t, batch_size))
        result[f"time_{name}_s"] = t
    fwd = times[0]
    result.update({"timing_iters": fwd["iters"], "timing_warmup": warmup})
    result["achieved_gflops_forward"] = result["gflops_total"] / fwd["median"]  # FLOPs are per batch
    result["achieved_gflops_forward_inference_opt"] = result["gflops_total"] / times[2]["median"]  # same FLOPs
    result["machine_matmul_gflops"] = matmul_gflops(dev)

    if train_iters > 0:
        model.train()
        optimizer = build_optimizer(cfg, model)
        g = torch.Generator().manual_seed(seed)
        targets = _random_targets(batch_size, height, width, 5, cfg.model.num_classes, dev, g)

        def step():
            loss, _ = weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm or float("inf"))
            optimizer.step()

        _reset_peak(dev)
        result["train_steps_per_s"] = 1.0 / _timed(step, train_iters, 1, dev)
        result["peak_memory_train_mb"] = _peak_memory(dev) / 2 ** 20
    return result


def bench_modes(cfg: Config, modes: Sequence[str] = (), *, json_path: Optional[str | Path] = None,
                **kwargs) -> list[dict]:
    """Run :func:`benchmark` for each model mode in ``modes`` (default: the config's), write the list as
    JSON to ``json_path`` when given, and return it."""
    results = []
    for mode in modes or [cfg.model.mode]:
        c = copy.deepcopy(cfg)
        c.model.mode = mode
        results.append(benchmark(c, **kwargs))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def _rate(r: dict) -> str:
    """Achieved GFLOP/s of the network and of its inference-optimised copy / matmul GFLOP/s, with the
    percentages; n/a for results measured before these keys existed (older results lack the opt rate: then
    the network's alone)."""
    got, opt, floor = (r.get(k) for k in ("achieved_gflops_forward", "achieved_gflops_forward_inference_opt",
                                          "machine_matmul_gflops"))
    if got is None or not floor:
        return "n/a"
    if opt is None:
        return f"{got:.1f} / {floor:.1f} ({100 * got / floor:.0f}%)"
    return f"{got:.1f} / {opt:.1f} / {floor:.1f} ({100 * got / floor:.0f}% / {100 * opt / floor:.0f}%)"


def _fps(r: dict, key: str) -> str:
    """``median [min-max]`` of an FPS key, or the median alone for results measured before the spread existed."""
    if key not in r:
        return "n/a"
    lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
    return f"{r[key]:.2f}" if lo is None or hi is None else f"{r[key]:.2f} [{lo:.2f}-{hi:.2f}]"


def format_bench_table(results: Sequence[dict]) -> str:
    """Paper Table 5 layout: params (M) and GMACs as D-DETR + mask branch, FPS of the network, with the
    post-processing and of the inference-optimised network (median [min-max] of interleaved calls; n/a where a
    result lacks it), steps/s, peak memory, and the achieved forward GFLOP/s of the network and of its
    inference-optimised copy (what ``solq eval`` and ``solq predict`` run by default) against the machine's matmul
    GFLOP/s (n/a for results without them); a last line says how the FPS were timed (iterations, warm-up) when the
    results record it."""
    head = f"{'mode':5} {'params (M)':>22} {'GMACs (fvcore)':>28} {'FPS net':>18} {'FPS +post':>18} " \
           f"{'FPS net opt':>18} {'train it/s':>10} {'peak MB':>9} {'GFLOP/s net / opt / matmul':>38}"
    lines = [head, "-" * len(head)]
    for r in results:
        p = f"{r['params_detector'] / 1e6:.2f} + {r['params_mask_branch'] / 1e6:.2f}"
        f = f"{r['gmacs_detector']:.2f} + {r['gmacs_mask_branch_last_layer']:.3f}"
        if r["gmacs_decode_one_mask"]:
            f += f" + {r['gmacs_decode_one_mask']:.4f}"
        peak = max(r.get("peak_memory_inference_mb", 0), r.get("peak_memory_train_mb", 0))
        lines.append(f"{r['mode']:5} {p:>22} {f:>28} {_fps(r, 'fps_forward'):>18} "
                     f"{_fps(r, 'fps_with_postprocess'):>18} {_fps(r, 'fps_forward_inference_opt'):>18} "
                     f"{r.get('train_steps_per_s', float('nan')):10.2f} {peak:9.0f} {_rate(r):>38}")
    timed = [r for r in results if "timing_iters" in r]
    if timed:
        counts = sorted({(r["timing_iters"], r.get("timing_warmup", 0)) for r in timed})
        said = ", ".join(f"{n} iterations after {w} warm-up rounds" for n, w in counts)
        lines.append(f"FPS: median [min-max] of {said}; net, net + post-processing and net opt (folded norms, "
                     f"channels_last backbone) alternate call by call")
    for r in results:
        if "compile_s" in r:  # runtime.compile: the compiled network joined the same interleaved loop
            lines.append(f"{r['mode']}: torch.compile ({r['compile_backend']}): first call (compiling) "
                         f"{r['compile_s']:.1f} s, then FPS {_fps(r, 'fps_forward_compiled')} vs net "
                         f"{_fps(r, 'fps_forward')}; max relative output difference {r['compiled_max_rel_diff']:.1e}")
    return "\n".join(lines)

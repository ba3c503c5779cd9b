"""Throughput of the mask codecs and of crop/paste (issue 3 goal: >= 50,000 masks/s each way for the DCT at
N = 128, n_k = 256 on 2 CPU threads, at every batch size from 1 to 2,000 (issue 16); the reference decodes
~130 masks/s with a Python loop, one mask at a time).

    python benchmarks/bench_codecs.py --threads 2 1 --out bench_codecs.json

Measures the codec as a user calls it from a notebook: a plain Python process that imports solq.coding, with
glibc's default allocator behaviour (no mallopt: solq's ``runtime.keep_freed_memory`` is applied only by
``solq`` runs, never here; any MALLOC_* environment variables are recorded and printed).

Prints a DCT table (one row per batch size, default 1, 10, 100, 256, 1,000 and 2,000: encode, decode and
decode+binarize in masks per second, and the output floor: allocating a fresh [batch,128,128] float32 tensor as
the decode does and filling it, the least any decode returning a new tensor costs; glibc maps blocks above its
mmap threshold (at most 32 MiB: 512 masks) afresh on every call, so their pages fault in on each decode, which
the decode does on huge pages (``solq.memory.empty_huge``); "decode, plain pages" and "floor, plain pages" are
the same with ``torch.empty`` (what the huge pages buy, in the same run); each the median [min-max] of
``--repeats`` timing windows of ``--min-seconds`` each) for each thread count, then a table of the rest: PCA
and flatten for comparison, the time of crop_to_box and paste_in_image for 100 masks on an 800x1333 image
(with the process's peak memory growth around the paste), and the full post-processing of one 512x512 image
(issue 4 goal: well under 100 ms on 2 CPU threads): ``PostProcess`` top-100 over 300 queries x 91 classes,
batched DCT decode, binarise and paste into the predicted boxes, next to the paste alone. Writes everything as
JSON with ``--out``. The load average before/after each column is recorded: on a shared machine, 2-thread
numbers collapse when another process holds a core (OpenMP threads wait for each other), so compare with the
1-thread column.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

from solq.coding import DCTCodec, FlattenCodec, PCACodec, crop_to_box, paste_in_image
from solq.coding import dct as dct_module
from solq.memory import HUGE_MIN_BYTES, empty_huge
from solq.models.postprocess import PostProcess


def _rate(fn, batch: int, min_seconds: float) -> float:
    """Calls per second of fn() x batch (after a warm-up), timed over at least min_seconds."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return calls * batch / elapsed


def _rates(fn, batch: int, min_seconds: float, repeats: int) -> dict:
    """{"median", "min", "max", "repeats"}: masks/s of fn() x batch over ``repeats`` windows of :func:`_rate`."""
    rates = [_rate(fn, batch, min_seconds) for _ in range(max(repeats, 1))]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": len(rates)}


def _plain_pages_decode(codec: DCTCodec, vectors: torch.Tensor) -> torch.Tensor:
    """``codec.decode(vectors)`` with its output on plain pages (``torch.empty``), as before huge pages: what
    :func:`solq.memory.empty_huge` buys, measured in the same run."""
    saved = dct_module.empty_huge
    dct_module.empty_huge = lambda *size, dtype, device: torch.empty(*size, dtype=dtype, device=device)
    try:
        return codec.decode(vectors)
    finally:
        dct_module.empty_huge = saved


def _best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _ellipses(k: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """k random ellipses, float32 {0,1} [k,n,n]."""
    yy, xx = torch.meshgrid(torch.arange(n, device=device) + 0.5, torch.arange(n, device=device) + 0.5,
                            indexing="ij")
    p = torch.rand(k, 4, generator=gen).to(device)
    cy, cx = (0.3 + 0.4 * p[:, 0]) * n, (0.3 + 0.4 * p[:, 1]) * n
    ry, rx = (0.2 + 0.3 * p[:, 2]) * n, (0.2 + 0.3 * p[:, 3]) * n
    d = ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2 + ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2
    return (d <= 1).float()


def _coco_like_boxes(k: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """k boxes with log-uniform sides in [16, 0.9 * image side], inside an h x w image: [k,4] xyxy."""
    r = torch.rand(k, 4, generator=gen)
    bw = torch.exp(torch.log(torch.tensor(16.0)) + r[:, 0] * torch.log(torch.tensor(0.9 * w / 16)))
    bh = torch.exp(torch.log(torch.tensor(16.0)) + r[:, 1] * torch.log(torch.tensor(0.9 * h / 16)))
    x0, y0 = r[:, 2] * (w - bw), r[:, 3] * (h - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], 1)


def _detector_outputs(codec, queries: int, classes: int, h: int, w: int, gen: torch.Generator, device):
    """UQR detector outputs for one h x w image: ``pred_logits`` [1,Q,C], ``pred_boxes`` [1,Q,4] (COCO-like
    sizes, normalised cxcywh), ``pred_vectors`` [1,Q,n_k] (codes of random ellipses); and orig_sizes [1,2]."""
    xyxy = _coco_like_boxes(queries, h, w, gen)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
    outputs = {"pred_logits": torch.randn(1, queries, classes, generator=gen).to(device),
               "pred_boxes": cxcywh[None].to(device),
               "pred_vectors": codec.encode(_ellipses(queries, codec.resolution, gen, device))[None]}
    return outputs, torch.tensor([[h, w]], device=device)


def measure(threads: int, batches: list[int], min_seconds: float, device: torch.device,
            repeats: int = 3) -> dict:
    """All measurements with ``threads`` torch CPU threads: {name: value}; "dct" holds {batch: {"encode",
    "decode", "decode_binarize": :func:`_rates` dicts}} (masks/s over ``repeats`` windows of min_seconds)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results: dict = {}

    # paste / crop first, so that the peak-RSS growth is the paste's own (on the first thread count)
    h, w, k = 800, 1333, 100
    boxes = _coco_like_boxes(k, h, w, gen).to(device)
    maps = _ellipses(k, 128, gen, device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pasted = paste_in_image(maps, boxes, (h, w))
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results["paste_100_masks_800x1333_ms"] = 1e3 * _best_time(lambda: (paste_in_image(maps, boxes, (h, w)), sync()), 5)
    results["paste_peak_rss_growth_mb"] = (rss1 - rss0) / 1024  # ru_maxrss is in KiB on Linux
    results["crop_100_masks_800x1333_ms"] = 1e3 * _best_time(lambda: (crop_to_box(pasted, boxes, 128), sync()), 3)
    del pasted

    dct = DCTCodec(128, 256)
    outputs, sizes = _detector_outputs(dct, 300, 91, 512, 512, gen, device)
    post = PostProcess(codec=dct, topk=100)
    results["postprocess_100_masks_512x512_ms"] = 1e3 * _best_time(lambda: (post(outputs, sizes), sync()), 10)
    top = post(outputs, sizes)[0]
    maps = dct.binarize(dct.decode(outputs["pred_vectors"][0, top["query_index"]]))
    results["paste_100_masks_512x512_ms"] = 1e3 * _best_time(
        lambda: (paste_in_image(maps, top["boxes"], (512, 512)), sync()), 10)
    results["dct"] = {}
    for b in batches:
        alloc = empty_huge if b * 128 * 128 * 4 >= HUGE_MIN_BYTES else torch.empty  # as the decode chooses
        masks = _ellipses(b, 128, gen, device)
        vectors = dct.encode(masks)
        results["dct"][b] = {
            "encode": _rates(lambda: (dct.encode(masks), sync()), b, min_seconds, repeats),
            "decode": _rates(lambda: (dct.decode(vectors), sync()), b, min_seconds, repeats),
            "decode_plain_pages": _rates(lambda: (_plain_pages_decode(dct, vectors), sync()), b, min_seconds, repeats),
            "decode_binarize": _rates(lambda: (dct.binarize(dct.decode(vectors)), sync()), b, min_seconds, repeats),
            # the floor of any decode that returns a new tensor: allocating its [b,128,128] output as the decode
            # does (huge pages from 32 MiB) and writing it once; "plain" with torch.empty
            "output_floor": _rates(lambda: (alloc(b, 128, 128, device=device).fill_(0.5), sync()), b,
                                   min_seconds, repeats),
            "output_floor_plain": _rates(lambda: (torch.empty(b, 128, 128, device=device).fill_(0.5), sync()), b,
                                         min_seconds, repeats)}

    b = 256
    masks = _ellipses(b, 128, gen, device)
    pca = PCACodec(128, 256).fit(_ellipses(512, 128, gen, device))
    codes = pca.encode(masks)
    results[f"pca_encode_masks_per_s@{b}"] = _rate(lambda: (pca.encode(masks), sync()), b, min_seconds)
    results[f"pca_decode_masks_per_s@{b}"] = _rate(lambda: (pca.decode(codes), sync()), b, min_seconds)
    flat = FlattenCodec()
    small = _ellipses(b, 28, gen, device)
    results[f"flatten_encode_masks_per_s@{b}"] = _rate(lambda: (flat.encode(small), sync()), b, min_seconds)
    return results


def _span(r: dict) -> str:
    """``median [min-max]`` of a :func:`_rates` dict, in masks/s."""
    return f"{r['median']:,.0f} [{r['min']:,.0f}-{r['max']:,.0f}]"


def format_dct_table(results: dict, rows: list[str]) -> str:
    """One line per (thread count, batch size): encode, decode, decode with its output on plain pages,
    decode+binarize, and the output floor (allocating and filling the decoded [batch,128,128] float32 tensor
    alone) on huge and on plain pages, in masks/s as median [min-max]."""
    head = f"{'threads':>7} {'batch':>6} {'encode masks/s':>26} {'decode masks/s':>26} {'decode, plain pages':>26} " \
           f"{'decode+binarize':>26} {'output floor':>26} {'floor, plain pages':>26}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for b, m in results[r]["dct"].items():
            more = [_span(m[k]) if k in m else "n/a"
                    for k in ("decode_plain_pages", "output_floor", "output_floor_plain")]
            lines.append(f"{r.split('=')[1]:>7} {b:>6} {_span(m['encode']):>26} {_span(m['decode']):>26} {more[0]:>26} "
                         f"{_span(m['decode_binarize']):>26} {more[1]:>26} {more[2]:>26}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch CPU thread counts to measure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100, 256, 1000, 2000],
                        help="DCT batch sizes (default 1 10 100 256 1000 2000)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing window per repeat (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timing windows per DCT measurement (default 3)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k.startswith("GLIBC_TUNABLES")}
    results: dict = {"torch": torch.__version__, "device": str(device),
                     "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "N": 128,
                     "n_k": 256, "repeats": args.repeats, "min_seconds": args.min_seconds,
                     "allocator": "glibc default (no mallopt)", "malloc_environment": malloc_env}
    for threads in args.threads:
        # other processes share the CPU: record the load around each measurement
        load_before = os.getloadavg()[0]
        row = measure(threads, args.batches, args.min_seconds, device, args.repeats)
        row["load_average_before"], row["load_average_after"] = load_before, os.getloadavg()[0]
        results[f"threads={threads}"] = row

    rows = [r for r in results if r.startswith("threads=")]
    print(f"DCT N=128 n_k=256, torch {results['torch']}, {results['device']}, {results['cpu_count']} CPUs, "
          f"allocator: {results['allocator']}, MALLOC_* environment: {malloc_env or 'none'}")
    print(f"masks/s: median [min-max] of {args.repeats} windows of >= {args.min_seconds} s each")
    print(format_dct_table(results, rows))
    names = [n for n in results[rows[0]] if n != "dct"]
    width = max(len(n) for n in names)
    print()
    print(f"{'':<{width}}" + "".join(f"{r:>14}" for r in rows))
    for name in names:
        print(f"{name:<{width}}" + "".join(f"{results[r][name]:>14,.1f}" for r in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

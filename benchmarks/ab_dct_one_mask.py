"""A/B/C of the DCT codec at a batch of one mask, in alternating timing windows so all see the same machine
state: the batched path (``torch.matmul`` on [1,N,N], what every batch took before), the first one-mask path
(two 2-D ``torch.mm`` with views, index_copy/index_select around them) and ``DCTCodec``'s one-mask path today
(``bmm`` on [1,...] operands, ``put_``/``take``: no view ops).

    python benchmarks/ab_dct_one_mask.py --threads 1 2

Prints masks/s, median [min-max] of ``--windows`` windows of ``--seconds`` each, per thread count (N = 128,
n_k = 256, float32).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from solq.coding import DCTCodec


def _rate(fn, x, seconds: float) -> float:
    """Calls per second of fn(x) over at least ``seconds`` (after one warm-up call)."""
    fn(x)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        calls += 1
    return calls / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()
    codec = DCTCodec(128, 256)
    du, dv_t, du_t, dv, flat = codec._bases(torch.device("cpu"), torch.float32)[:5]

    def decode_batched(v):
        v = codec._check_vectors(v)
        block = v.new_zeros(v.shape[0], codec.rows * codec.cols).index_copy(1, flat, v)
        return torch.matmul(du_t, torch.matmul(block.view(-1, codec.rows, codec.cols), dv))

    def encode_batched(m):
        m = codec._masks_as_float(m)
        return torch.matmul(torch.matmul(du, m), dv_t).flatten(1).index_select(1, flat)

    def decode_mm(v):
        v = codec._check_vectors(v)
        block = v.new_zeros(1, codec.rows * codec.cols).index_copy(1, flat, v)
        return torch.mm(du_t, torch.mm(block.view(codec.rows, codec.cols), dv)).unsqueeze(0)

    def encode_mm(m):
        m = codec._masks_as_float(m)
        return torch.mm(torch.mm(du, m.squeeze(0)), dv_t).view(1, -1).index_select(1, flat)

    v = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    m = (torch.rand(1, 128, 128, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    for fn in (decode_batched, decode_mm):
        assert torch.allclose(fn(v), codec.decode(v), atol=1e-5)
    for fn in (encode_batched, encode_mm):
        assert torch.allclose(fn(m), codec.encode(m), atol=1e-4)
    cases = [("decode, batched path", decode_batched, v), ("decode, 2-D mm path", decode_mm, v),
             ("decode, codec today", codec.decode, v), ("encode, batched path", encode_batched, m),
             ("encode, 2-D mm path", encode_mm, m), ("encode, codec today", codec.encode, m)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates = {name: [] for name, _, _ in cases}
        for _ in range(args.windows):
            for name, fn, x in cases:
                rates[name].append(_rate(fn, x, args.seconds))
        print(f"threads {threads}, batch 1, masks/s: median [min-max] of {args.windows} alternating windows "
              f"of {args.seconds} s")
        for name, r in rates.items():
            print(f"  {name:22s} {statistics.median(r):9,.0f} [{min(r):,.0f}-{max(r):,.0f}]")


if __name__ == "__main__":
    main()

"""Process memory helpers that PyTorch does not offer: the C library, and large CPU outputs on huge pages.

glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh ``mmap``
and unmaps it on free, so a large output is page-faulted in 4 KiB at a time on every call: a fresh
[2000,128,128] float32 tensor (128 MB) fills at about 2.4 GB/s on one core of the machine we measure on, slower
than the DCT decode that writes it. :func:`empty_huge` asks the kernel for transparent huge pages on such a
block (``madvise(MADV_HUGEPAGE)``, honoured where ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``), one fault per 2 MiB instead of 512, without touching the process-wide allocator
settings (which :func:`solq.engine.allocator.retain_freed_memory` changes for ``solq`` runs only).

After ``retain_freed_memory`` large blocks come from the heap, and the advice stays on a heap range after its
block is freed: a later ordinary allocation that reuses the range gets huge pages too. That only changes how
its pages fault in, never values (and is what those runs want: warm, large pages).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

__all__ = ["glibc", "empty_huge", "HUGE_MIN_BYTES"]

_MADV_HUGEPAGE = 14  # asm-generic/mman-common.h (x86-64, arm64, riscv, ppc)
# glibc's largest dynamic mmap threshold: smaller blocks are reused from the heap, warm, after the first call
HUGE_MIN_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def glibc():
    """The process's glibc as a ``ctypes.CDLL``, or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") and hasattr(libc, "madvise")):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def empty_huge(*size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               min_bytes: int = HUGE_MIN_BYTES) -> torch.Tensor:
    """``torch.empty(*size, dtype=dtype, device=device)``, with its pages advised as huge when it is a CPU tensor
    of at least ``min_bytes`` on Linux (glibc); otherwise exactly ``torch.empty``.

    The advice applies to the whole pages inside the block and only changes how fast its first writes fault in;
    it never changes values. Use it for outputs that are written once right after (``out=`` of a product).
    """
    out = torch.empty(*size, dtype=dtype, device=device)
    if out.device.type != "cpu" or out.nbytes < min_bytes:
        return out
    libc = glibc()
    if libc is None:
        return out
    page = mmap.PAGESIZE
    start = -(-out.data_ptr() // page) * page
    end = (out.data_ptr() + out.nbytes) // page * page
    if end > start:
        libc.madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal (EINVAL) leaves normal pages
    return out

"""Keep freed CPU memory inside the process instead of handing it back to the kernel (glibc malloc).

By default glibc serves every allocation above a threshold (128 KiB, adapting up to 32 MiB) with its own
``mmap`` and unmaps it on free, and trims the heap top above 128 KiB. A forward pass at 512x852 frees and
re-allocates tensors of tens of MB hundreds of times, so each of them page-faults its memory in afresh: on
the 2-core machine we measure on, an out-of-place ReLU of [9120,1024] takes 15.6 ms on fresh memory and
6.8 ms on reused memory, and the whole forward is 15-25% faster with the memory kept (README, "Attention
backends"). :func:`retain_freed_memory` raises both thresholds with ``mallopt``, which is what the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables do at start-up, but from
inside the process. The cost: the resident set no longer shrinks after a peak (the peak itself is about the
same). Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes

from solq.memory import glibc as _libc

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers of glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 62) -> bool:
    """Serve allocations up to ``mmap_threshold`` bytes from the heap and never trim below
    ``trim_threshold`` bytes of free heap top. Returns True when glibc took both settings (a glibc that
    caps the mmap threshold lower gets its cap, 32 MiB), False where this is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    int_max = 2**31 - 1
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, int_max)) == 1
    if not ok_mmap:
        ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, int_max)) == 1
    return ok_mmap and ok_trim

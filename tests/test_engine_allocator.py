"""Keeping freed CPU memory in the process: large tensors come from the heap, not from fresh mmaps."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from solq.config import load_config
from solq.engine import allocator, runtime

# Runs in a fresh interpreter: mallopt changes the whole process. mallinfo2 (glibc >= 2.33) reports the
# bytes held in separately mmapped blocks (hblkhd) and in the heap (arena).
_PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from solq.engine.allocator import _libc, retain_freed_memory

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = _libc()
    libc.mallinfo2.restype = Info

    def grows():
        before = libc.mallinfo2()
        x = torch.empty(10 * 2**20)  # 40 MiB: above glibc's default mmap threshold (at most 32 MiB)
        after = libc.mallinfo2()
        del x
        return after.hblkhd - before.hblkhd, after.arena - before.arena

    mapped_default, _ = grows()
    ok = retain_freed_memory()
    mapped_kept, heap_kept = grows()
    print(ok, mapped_default, mapped_kept, heap_kept)
""")


@pytest.mark.skipif(allocator._libc() is None or not hasattr(allocator._libc(), "mallinfo2"),
                    reason="glibc >= 2.33 only")
def test_large_tensors_come_from_the_heap_once_retained():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    ok, mapped_default, mapped_kept, heap_kept = out.stdout.split()
    assert ok == "True"
    assert int(mapped_default) >= 40 * 2**20  # glibc's default: its own mmap
    assert int(mapped_kept) == 0 and int(heap_kept) >= 32 * 2**20  # retained: the heap (part may be free)


def test_configure_runtime_applies_the_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config("smoke")
    runtime.configure_runtime(cfg)
    assert calls == [1]
    cfg.runtime.keep_freed_memory = False
    runtime.configure_runtime(cfg)
    assert calls == [1]


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.retain_freed_memory() is False

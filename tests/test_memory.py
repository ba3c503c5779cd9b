"""Large CPU outputs on transparent huge pages (solq.memory.empty_huge).

The mapping checks run in a fresh interpreter: once a test in this process has called
``retain_freed_memory`` (every in-process ``solq`` run does), large blocks come from the heap, and a heap range
advised by an earlier ``empty_huge`` keeps its advice after free, so a later plain ``torch.empty`` may land on
it. In a fresh process the layout is known: by default each large block is its own mmap.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from solq import memory

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from solq import memory
    from solq.engine.allocator import retain_freed_memory

    def hg(t):
        # VmFlags of the mapping holding the middle of t: 'hg' is VM_HUGEPAGE, set by MADV_HUGEPAGE
        address = t.data_ptr() + t.nbytes // 2
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
        raise AssertionError(hex(address))

    if sys.argv[1] == "heap":
        assert retain_freed_memory()
    big = memory.empty_huge(1000, 128, 128)  # 62.5 MiB
    plain = torch.empty(1000, 128, 128)
    real = memory.glibc
    memory.glibc = lambda: None
    unadvised = memory.empty_huge(600, 128, 128)
    memory.glibc = real
    big.fill_(2.0)
    print(json.dumps({"big": hg(big), "plain": hg(plain), "no_glibc": hg(unadvised),
                      "sum_ok": big.sum().item() == 2.0 * big.numel()}))
""")


def test_small_blocks_are_plain_empty_tensors():
    t = memory.empty_huge(3, 4, dtype=torch.float64)
    assert t.shape == (3, 4) and t.dtype == torch.float64 and t.device.type == "cpu"


def test_without_glibc_it_is_torch_empty(monkeypatch):
    monkeypatch.setattr(memory, "glibc", lambda: None)
    t = memory.empty_huge(600, 128, 128, dtype=torch.float16)
    assert t.shape == (600, 128, 128) and t.dtype == torch.float16


@pytest.mark.skipif(memory.glibc() is None or not _THP.exists(), reason="needs Linux glibc with transparent huge pages")
@pytest.mark.parametrize("blocks", ["mmap", "heap"])  # glibc's default, and after retain_freed_memory
def test_only_large_advised_blocks_get_huge_page_advice(blocks):
    out = subprocess.run([sys.executable, "-c", _PROBE, blocks], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"big": True, "plain": False, "no_glibc": False, "sum_ok": True}

"""Large CPU outputs on transparent huge pages (solq.memory.empty_huge)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from solq import memory

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_small_blocks_are_plain_empty_tensors():
    t = memory.empty_huge(3, 4, dtype=torch.float64)
    assert t.shape == (3, 4) and t.dtype == torch.float64 and t.device.type == "cpu"


@pytest.mark.skipif(memory.glibc() is None or not _THP.exists(), reason="needs Linux glibc with transparent huge pages")
def test_large_block_is_advised_as_huge_and_small_block_is_not():
    big = memory.empty_huge(1000, 128, 128)  # 62.5 MiB
    assert big.shape == (1000, 128, 128) and big.dtype == torch.float32
    middle = big.data_ptr() + big.numel() * 2
    assert "hg" in _vma_flags(middle)  # VM_HUGEPAGE: MADV_HUGEPAGE took effect on this mapping
    plain = torch.empty(1000, 128, 128)
    assert "hg" not in _vma_flags(plain.data_ptr() + plain.numel() * 2)
    big.fill_(2.0)
    assert big.sum().item() == 2.0 * big.numel()


def test_without_glibc_it_is_torch_empty(monkeypatch):
    monkeypatch.setattr(memory, "glibc", lambda: None)
    t = memory.empty_huge(600, 128, 128)
    assert t.shape == (600, 128, 128)
    if _THP.exists():  # no advice was given: the block's mapping has no VM_HUGEPAGE flag
        assert "hg" not in _vma_flags(t.data_ptr() + t.nbytes // 2)

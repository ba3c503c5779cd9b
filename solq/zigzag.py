"""The JPEG zig-zag order of DCT coefficients, in numpy only: shared by the DCT codec (``solq.coding.dct``) and the
torch-free deployment code (``solq.deploy``), which must not import torch."""
from __future__ import annotations

import numpy as np

__all__ = ["zigzag_order"]


def zigzag_order(n: int) -> np.ndarray:
    """JPEG zig-zag order of an n x n grid: int64 [n*n, 2] of (u, v) = (row, col).

    Diagonals s = u+v in increasing order; odd s runs from (0,s) down to (s,0) (u increasing),
    even s from (s,0) up to (0,s) (u decreasing). Starts (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), ...
    """
    u, v = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    u, v = u.ravel(), v.ravel()
    s = u + v
    within = np.where(s % 2 == 1, u, n - 1 - u)  # position along the diagonal
    order = np.lexsort((within, s))
    return np.stack([u[order], v[order]], axis=1).astype(np.int64)

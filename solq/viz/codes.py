"""Mask codes (paper §3.2, Tables 3a/3e): a query's DCT coefficients and what they reconstruct.

A DCT mask vector holds the first n_k coefficients of the 2-D DCT of the N x N mask crop in JPEG
zig-zag order. :func:`coefficient_grid` scatters a vector back into that grid (using the codec's own
zig-zag positions), :func:`progressive_reconstructions` decodes its first k entries for growing k (the
low frequencies carry the shape, the rest refine the outline), and :func:`plot_mask_code` shows both.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from solq.coding.dct import zigzag_order

from .draw import as_numpy

__all__ = ["code_positions", "coefficient_grid", "progressive_reconstructions", "reconstruction_iou",
           "plot_mask_code", "DEFAULT_STEPS"]

DEFAULT_STEPS = (1, 4, 16, 64, 256)


def code_positions(codec) -> np.ndarray:
    """(u, v) = (row, column) in the DCT grid of each vector entry: int64 [n_k, 2] (the codec's zig-zag)."""
    if getattr(codec, "positions", None) is not None:
        return as_numpy(codec.positions).astype(np.int64)
    if getattr(codec, "name", "") != "dct":
        raise ValueError(f"coefficient maps need a DCT codec, got {getattr(codec, 'name', type(codec).__name__)!r}")
    return zigzag_order(codec.resolution)[: codec.dim]


def coefficient_grid(vector: Any, codec, size: Optional[int] = None) -> np.ndarray:
    """Scatter a code vector [n_k] into its DCT grid: float [S,S] with NaN at frequencies it does not
    hold. S = ``size`` or just enough to hold the kept frequencies (1 + max(u, v))."""
    v = as_numpy(vector).astype(np.float64).reshape(-1)
    uv = code_positions(codec)
    if len(v) != len(uv):
        raise ValueError(f"vector has {len(v)} entries but the codec keeps {len(uv)} coefficients")
    s = int(size or uv.max() + 1)
    grid = np.full((s, s), np.nan)
    inside = (uv[:, 0] < s) & (uv[:, 1] < s)
    grid[uv[inside, 0], uv[inside, 1]] = v[inside]
    return grid


def progressive_reconstructions(vector: Any, codec,
                                steps: Sequence[int] = DEFAULT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Decode the first k coefficients of ``vector`` [n_k] for each k in ``steps`` (capped at n_k),
    the others set to zero, in one batched ``codec.decode``.

    Returns (continuous maps float [S,N,N], binary masks bool [S,N,N] with the codec's threshold).
    """
    v = torch.as_tensor(as_numpy(vector), dtype=torch.float32).reshape(1, -1)
    n = v.shape[1]
    ks = torch.tensor([min(int(k), n) for k in steps])
    keep = torch.arange(n)[None, :] < ks[:, None]  # [S, n_k]
    decoded = codec.decode(v * keep)
    return decoded.cpu().numpy(), codec.binarize(decoded).cpu().numpy()


def reconstruction_iou(masks: Any, codec, steps: Sequence[int] = DEFAULT_STEPS) -> np.ndarray:
    """Mean IoU between masks [K,N,N] and their reconstructions from the first k coefficients, for each
    k in ``steps``: float [S] (an upper bound for what a query's vector of that length can express)."""
    m = torch.as_tensor(as_numpy(masks)).float()
    codes = codec.encode(m)  # [K,n_k]
    n = codes.shape[1]
    out = []
    truth = m.flatten(1) > 0.5
    for k in steps:  # S decodes of K masks each; S is a handful
        keep = torch.arange(n) < min(int(k), n)
        rec = codec.binarize(codec.decode(codes * keep)).flatten(1)
        inter = (rec & truth).sum(1).double()
        union = (rec | truth).sum(1).double()
        out.append(float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean()))
    return np.array(out)


def plot_mask_code(vector: Any, codec, *, steps: Sequence[int] = DEFAULT_STEPS, target: Any = None,
                   title: str = "", axes: Optional[Sequence] = None):
    """The coefficient map of a code vector (signed, symmetric log colour scale, DC top-left), then its
    reconstructions from the first k coefficients for k in ``steps`` (continuous map, binary outline in
    orange), and the ``target`` crop [N,N] when given (e.g. the matched ground truth).

    Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import SymLogNorm

    grid = coefficient_grid(vector, codec)
    maps, binary = progressive_reconstructions(vector, codec, steps)
    n_panels = 1 + len(steps) + (target is not None)
    if axes is None:
        fig, axes = plt.subplots(1, n_panels, figsize=(2.3 * n_panels, 2.6), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    finite = np.abs(grid[np.isfinite(grid)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = axes[0].imshow(grid, cmap="RdBu_r", norm=SymLogNorm(linthresh=max(vmax * 1e-3, 1e-6), vmin=-vmax, vmax=vmax))
    axes[0].set_title(f"DCT coefficients (n_k={len(as_numpy(vector).reshape(-1))})", fontsize=7)
    axes[0].set_xlabel("horizontal frequency v", fontsize=6)
    axes[0].set_ylabel("vertical frequency u", fontsize=6)
    axes[0].tick_params(labelsize=5)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04).ax.tick_params(labelsize=5)
    n = len(as_numpy(vector).reshape(-1))
    for ax, k, m, b in zip(axes[1:], steps, maps, binary):
        ax.imshow(m, cmap="gray", vmin=0, vmax=1)
        ax.contour(b.astype(float), levels=[0.5], colors="orange", linewidths=0.8)
        ax.set_title(f"first {min(int(k), n)} coefficients", fontsize=7)
        ax.set_axis_off()
    if target is not None:
        axes[len(steps) + 1].imshow(as_numpy(target).astype(float), cmap="gray", vmin=0, vmax=1)
        axes[len(steps) + 1].set_title("target", fontsize=7)
        axes[len(steps) + 1].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig

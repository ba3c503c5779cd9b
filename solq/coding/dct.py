"""DCT mask coding (paper §3.2, the authors' release): orthonormal 2-D DCT-II, low frequencies in zig-zag order.

For a mask M [N,N], C = D·M·Dᵀ with D[k,n] = sqrt(α_k/N)·cos(π(2n+1)k/(2N)), α_0 = 1, α_k = 2 otherwise
(identical to ``scipy.fft.dctn(norm="ortho")``); row index u is vertical frequency, column v horizontal.
The vector holds C at the first n_k positions of the JPEG zig-zag (as in the authors' release), unscaled.

Only the kept frequencies are ever computed: with U = 1 + max u and V = 1 + max v over the kept set
(23 and 23 for n_k = 256), encode is T = D[:U]·M·D[:V]ᵀ ([K,U,V], two matmuls) followed by a gather,
and decode scatters the vector into [K,U,V] and computes D[:U]ᵀ·Ĉ·D[:V]. That is the exact inverse
restricted to the kept coefficients (zeros elsewhere). Outside autograd a decoded batch of 32 MiB or more
(512 masks at N = 128) is written into huge pages (:func:`solq.memory.empty_huge`): 2.1-2.5x faster at
1,000 and 2,000 masks in a plain process (README, "Mask coding"). A single mask is dominated by per-op dispatch
(about 1 µs an op on this machine, even for a view), so its path uses ``bmm`` on [1,...] operands, ``take`` and
``put_`` (flat indexing on both sides): four torch ops each way (benchmarks/ab_dct_one_mask.py).
"""
from __future__ import annotations

import math

import torch

from solq.memory import HUGE_MIN_BYTES, empty_huge
from solq.zigzag import zigzag_order

from .base import Codec, register_codec

__all__ = ["DCTCodec", "zigzag_order", "dct_matrix"]


def dct_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n,n]: D[k,j] = sqrt(α_k/n)·cos(π(2j+1)k/(2n)); D·Dᵀ = I."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    alpha = torch.where(k == 0, 1.0, 2.0).to(torch.float64)
    d = torch.sqrt(alpha / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))
    return d.to(dtype=dtype, device=device)


@register_codec
class DCTCodec(Codec):
    """DCT codec: ``encode`` [K,N,N] -> [K,n_k]; ``decode`` [K,n_k] -> [K,N,N] (continuous, unclamped).

    Args:
        resolution: N, side of the mask crop (128 in the paper).
        num_coeffs: n_k, kept zig-zag coefficients (256 in the paper); 1 <= n_k <= N².
        threshold: "midrange" (the authors' release: strict ``>`` (max+min)/2 per mask) or "0.5" (``>= 0.5``).
    """

    name = "dct"
    loss_type = "l1"

    @classmethod
    def config_params(cls, c) -> dict:
        return dict(resolution=c.resolution, num_coeffs=c.num_coeffs, threshold=c.threshold)

    def __init__(self, resolution: int = 128, num_coeffs: int = 256, threshold: str = "midrange"):
        super().__init__(resolution, num_coeffs, threshold)
        if self.dim > self.resolution ** 2:
            raise ValueError(f"dct codec: num_coeffs ({self.dim}) exceeds resolution² ({self.resolution ** 2})")
        uv = zigzag_order(self.resolution)[: self.dim]
        self.positions = torch.from_numpy(uv)  # int64 [n_k, 2], (u, v) of each vector entry
        self.rows = int(uv[:, 0].max()) + 1  # U
        self.cols = int(uv[:, 1].max()) + 1  # V
        # flat index of each kept coefficient in the [U,V] block of low frequencies
        self._flat = torch.from_numpy(uv[:, 0] * self.cols + uv[:, 1])
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, num_coeffs={self.dim}, threshold={self.threshold!r}"

    def _bases(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(D[:U] [U,N], D[:V]ᵀ [N,V], D[:U]ᵀ [N,U], D[:V] [V,N], flat index [n_k]) on device/dtype, cached,
        followed by the same four matrices as [1,...] views for the one-mask path and the index as [1,n_k]."""
        key = (device, dtype)
        try:  # one dict lookup on the hot path: the one-mask path costs about 20 µs in all
            return self._cache[key]
        except KeyError:
            d = dct_matrix(self.resolution)  # built in float64, then cast once
            du, dv = d[: self.rows], d[: self.cols]
            mats = tuple(t.to(device=device, dtype=dtype).contiguous() for t in (du, dv.T, du.T, dv))
            flat = self._flat.to(device)
            bases = self._cache[key] = mats + (flat,) + tuple(t.unsqueeze(0) for t in mats) + (flat.view(1, -1),)
            return bases

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks float/bool [K,N,N] -> coefficients [K,n_k] (dtype of float masks, else float32)."""
        m = self._masks_as_float(masks)
        du, dv_t, _, _, flat, du1, dv_t1, _, _, flat1 = self._bases(m.device, m.dtype)
        if m.shape[0] == 1:  # one mask: bmm on [1,...] operands and a take, no view or broadcast ops (see below)
            return torch.bmm(torch.bmm(du1, m), dv_t1).take(flat1)
        # rows first: [U,N] @ [K,N,N] -> [K,U,N] is the costly product; the second one is small
        t = torch.matmul(torch.matmul(du, m), dv_t)  # [K,U,V]
        return t.flatten(1).index_select(1, flat)

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [K,n_k] -> reconstruction [K,N,N] (same dtype), differentiable."""
        v = self._check_vectors(vectors)
        _, _, du_t, dv, flat, _, _, du_t1, dv1, _ = self._bases(v.device, v.dtype)
        k = v.shape[0]
        # one mask: put_ indexes both tensors as flat, so no view op is needed around it; PyTorch lists put_ as
        # nondeterministic (it is not, with distinct indices), so deterministic mode takes the batched path
        if k == 1 and not torch.are_deterministic_algorithms_enabled():
            block = v.new_zeros(1, self.rows, self.cols)
            block.put_(flat, v)  # zeros at dropped frequencies
            return torch.bmm(du_t1, torch.bmm(block, dv1))
        block = v.new_zeros(k, self.rows * self.cols).index_copy(1, flat, v)  # zeros at dropped frequencies
        x = torch.matmul(block.view(k, self.rows, self.cols), dv)  # [K,U,N]
        n = self.resolution
        if k * n * n * v.element_size() < HUGE_MIN_BYTES or (torch.is_grad_enabled() and v.requires_grad):
            return torch.matmul(du_t, x)  # [K,N,N]; out= is not differentiable
        # a large output on fresh pages faults in slower than the product writes it: give it huge pages
        return torch.matmul(du_t, x, out=empty_huge(k, n, n, dtype=v.dtype, device=v.device))

"""Sparse coding of masks (paper §3.2 eq. 3): Lasso codes over a learned dictionary.

    v* = argmin_v  ½‖m − v·D‖² + β‖v‖₁,   D [n_k, N²] with unit-norm atoms,   m̂ = v·D

Encoding runs in torch, batched on any device: a fixed number of FISTA iterations (accelerated
proximal gradient; each step is one [K,n_k]x[n_k,n_k] matmul and a soft threshold).

The dictionary is learned from training crops by alternating minimisation of the same objective:
codes by FISTA (warm-started), then the dictionary by least squares with atoms rescaled to unit norm
(the method of optimal directions, Engan et al. 1999), from an SVD start. scikit-learn's
``MiniBatchDictionaryLearning`` solves the same problem but, at N² = 16384 features, its
coordinate-descent Lasso does not converge and a few epochs over 700 masks take minutes.
"""
from __future__ import annotations

import warnings

import torch

from .base import FittedCodec, register_codec

__all__ = ["SparseCodec", "lasso_fista"]


def lasso_fista(b: torch.Tensor, gram: torch.Tensor, alpha: float, lipschitz: float,
                num_iters: int, init: torch.Tensor | None = None) -> torch.Tensor:
    """Solve min_v ½‖m − vD‖² + α‖v‖₁ for a batch, given b = m·Dᵀ [K,n] and gram = D·Dᵀ [n,n].

    ``lipschitz`` >= the largest eigenvalue of gram. Returns v [K,n] after ``num_iters`` FISTA steps from
    ``init`` [K,n] (zeros by default).
    """
    step = 1.0 / lipschitz
    v = torch.zeros_like(b) if init is None else init
    y = v
    t = 1.0
    for _ in range(num_iters):
        z = y - (torch.matmul(y, gram) - b) * step
        v_next = torch.sign(z) * (z.abs() - alpha * step).clamp(min=0)  # soft threshold
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = v_next + (v_next - v) * ((t - 1) / t_next)
        v, t = v_next, t_next
    return v


def _update_atoms(codes: torch.Tensor, x: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dictionary step: least squares D = argmin ‖x − vD‖² (MOD), then atoms scaled to unit norm.

    codes [K,n], x [K,D] -> (dictionary [n,D] with unit rows, the least-squares row norms [n]).
    Atoms no code uses are restarted as random unit directions.
    """
    # normal equations in float64 with a tiny ridge: A is singular when fewer masks than atoms (or unused atoms)
    a = (codes.T @ codes).double()  # [n,n]
    ridge = 1e-8 * a.diagonal().mean().clamp(min=1e-12)
    rhs = (codes.T @ x).double()  # [n,D]
    dictionary = torch.linalg.solve(a + ridge * torch.eye(a.shape[0], dtype=a.dtype), rhs).to(x.dtype)
    norms = dictionary.norm(dim=1)
    dead = (a.diagonal() < 1e-10) | (norms < 1e-10)
    if dead.any():  # random directions (as scikit-learn): nearly orthogonal to the rest, harmless if unused
        dictionary[dead] = torch.randn(int(dead.sum()), x.shape[1], generator=generator, dtype=x.dtype)
        norms = dictionary.norm(dim=1)
    norms = norms.clamp(min=1e-12)
    return dictionary / norms[:, None], norms


@register_codec
class SparseCodec(FittedCodec):
    """Sparse codec: ``encode`` [K,N,N] -> Lasso codes [K,n_k]; ``decode`` [K,n_k] -> v·D [K,N,N] (unclamped).

    Args:
        resolution: N, side of the box crop.
        num_coeffs: n_k, number of dictionary atoms (= code length).
        alpha: β of eq. 3, the L1 penalty (config ``codec.sparse_alpha``).
        num_iters: FISTA iterations per encode.
        threshold: binarisation of the reconstruction, "0.5" (default) or "midrange".
        fit_epochs: alternating rounds (codes, atoms) when fitting.
    """

    name = "sparse"
    loss_type = "l1"
    _state_names = ("dictionary",)
    _fit_settings = ("alpha",)

    @classmethod
    def config_params(cls, c) -> dict:
        return dict(resolution=c.resolution, num_coeffs=c.num_coeffs, alpha=c.sparse_alpha, file=c.file)

    def __init__(self, resolution: int = 128, num_coeffs: int = 256, alpha: float = 0.1, num_iters: int = 200,
                 threshold: str = "0.5", fit_epochs: int = 5):
        super().__init__(resolution, num_coeffs, threshold)
        if alpha < 0:
            raise ValueError(f"sparse codec: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.num_iters = int(num_iters)
        self.fit_epochs = int(fit_epochs)

    def extra_repr(self) -> str:
        return (f"resolution={self.resolution}, num_coeffs={self.dim}, alpha={self.alpha}, "
                f"num_iters={self.num_iters}, fitted={self.is_fitted}")

    def fit(self, masks: torch.Tensor, *, seed: int = 0) -> "SparseCodec":
        """Learn the dictionary from training crops masks [K,N,N] in {0,1} (CPU; float64 if they are). Returns self.

        Atoms start from the top right singular vectors of the data (as scikit-learn; random unit directions
        beyond the rank), then ``fit_epochs`` rounds of (codes by FISTA, least-squares dictionary, unit atoms).
        """
        x = self._fit_matrix(masks)  # [K,D]
        k, d = x.shape
        if k < self.dim:
            warnings.warn(f"sparse codec: fitting {self.dim} atoms on only {k} masks; the dictionary is degenerate")
        g = torch.Generator().manual_seed(seed)
        q = min(self.dim, k, d)
        if min(k, d) <= 4096:
            atoms = torch.linalg.svd(x, full_matrices=False)[2][:q]
        else:
            with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
                torch.manual_seed(seed)
                atoms = torch.svd_lowrank(x, q=q, niter=4)[2].T
        if q < self.dim:  # fewer samples than atoms: fill with random unit directions
            extra = torch.randn(self.dim - q, d, generator=g, dtype=x.dtype)
            atoms = torch.cat([atoms, extra / extra.norm(dim=1, keepdim=True)])
        dictionary = atoms.clone()
        codes = None
        for _ in range(self.fit_epochs):
            gram = dictionary @ dictionary.T
            lip = float(torch.linalg.eigvalsh(gram)[-1]) * 1.001 + 1e-12
            codes = lasso_fista(x @ dictionary.T, gram, self.alpha, lip, self.num_iters, init=codes)
            dictionary, norms = _update_atoms(codes, x, g)
            codes = codes * norms  # same product v·D with unit atoms: a good warm start
        self._set_state({"dictionary": dictionary}, k)
        return self

    def _tensors(self, device, dtype):
        t = super()._tensors(device, dtype)
        if "gram" not in t:
            d64 = self._state["dictionary"]
            gram = d64 @ d64.T
            t["gram"] = gram.to(device=device, dtype=dtype)
            t["lipschitz"] = float(torch.linalg.eigvalsh(gram)[-1]) * 1.001 + 1e-12
        return t

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [K,N,N] -> codes [K,n_k] (FISTA, ``num_iters`` steps)."""
        m = self._masks_as_float(masks)
        t = self._tensors(m.device, m.dtype)
        b = torch.matmul(m.flatten(1), t["dictionary"].T)  # [K,n_k]
        return lasso_fista(b, t["gram"], self.alpha, t["lipschitz"], self.num_iters)

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """codes [K,n_k] -> reconstruction v·D [K,N,N]; differentiable."""
        v = self._check_vectors(vectors)
        t = self._tensors(v.device, v.dtype)
        return torch.matmul(v, t["dictionary"]).reshape(v.shape[0], self.resolution, self.resolution)

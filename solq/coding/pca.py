"""PCA mask coding (paper §3.2 eq. 4, the authors' release): project box crops on the top principal components.

Fitted on training masks cropped to their boxes. With ``jitter=True`` the data are the reference's
logit-jittered targets: each pixel of the binary mask moves into (0,1) by r ~ U(0, 0.05) clipped to
>= 0.01 (1 -> 1-r, 0 -> r), then logit; decode applies a sigmoid. Without jitter the data are the 0/1
pixels and decode clamps to [0,1]. ``whiten`` divides codes by sqrt(explained variance).

    v = (x - mean) · Pᵀ [/ sqrt(var)]        x̂ = v [· sqrt(var)] · P + mean
"""
from __future__ import annotations

import warnings

import torch

from .base import FittedCodec, register_codec

__all__ = ["PCACodec"]

JITTER_MAX = 0.05  # the authors' release: r ~ U(0, 0.05) ...
JITTER_MIN = 0.01  # ... clipped to >= 0.01
EXACT_SVD_MAX = 4096  # exact SVD up to this min(K, N²); randomized (torch.svd_lowrank) above


def _jitter_logit(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary x [K,D] -> logit of the jittered values (stochastic, the authors' release)."""
    r = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    r = (r * JITTER_MAX).clamp_(min=JITTER_MIN)
    p = torch.where(x >= 0.5, 1 - r, r)
    return torch.logit(p)


@register_codec
class PCACodec(FittedCodec):
    """PCA codec: ``encode`` [K,N,N] -> [K,n_k]; ``decode`` [K,n_k] -> probabilities [K,N,N] in [0,1].

    Args:
        resolution: N, side of the box crop.
        num_coeffs: n_k, number of principal components kept.
        whiten: scale codes to unit variance (the authors' release uses whitening).
        jitter: fit/encode logit-jittered targets and decode with a sigmoid (as in the authors' release).
        threshold: binarisation of the decoded probabilities, "0.5" (default) or "midrange".
    """

    name = "pca"
    loss_type = "mse_dice"
    _state_names = ("mean", "components", "variance", "total_variance")
    _fit_settings = ("jitter",)

    @classmethod
    def config_params(cls, c) -> dict:
        return dict(resolution=c.resolution, num_coeffs=c.num_coeffs, whiten=c.whiten, jitter=c.jitter,
                    file=c.file)

    def __init__(self, resolution: int = 128, num_coeffs: int = 256, whiten: bool = True, jitter: bool = False,
                 threshold: str = "0.5"):
        super().__init__(resolution, num_coeffs, threshold)
        if self.dim > self.resolution ** 2:
            raise ValueError(f"pca codec: num_coeffs ({self.dim}) exceeds resolution² ({self.resolution ** 2})")
        self.whiten = bool(whiten)
        self.jitter = bool(jitter)

    def extra_repr(self) -> str:
        return (f"resolution={self.resolution}, num_coeffs={self.dim}, whiten={self.whiten}, "
                f"jitter={self.jitter}, fitted={self.is_fitted}")

    def fit(self, masks: torch.Tensor, *, seed: int = 0) -> "PCACodec":
        """Fit on training crops masks [K,N,N] in {0,1} (on the CPU; float64 for float64 masks). Returns self.

        Exact SVD when min(K, N²) <= 4096, else randomized SVD (torch.svd_lowrank, 6 power iterations).
        With fewer than n_k samples the missing components are zero (their codes are always 0).
        """
        x = self._fit_matrix(masks)
        g = torch.Generator().manual_seed(seed)
        if self.jitter:
            x = _jitter_logit(x, g)
        mean = x.mean(0)
        xc = x - mean
        del x
        k, d = xc.shape
        if min(k, d) <= EXACT_SVD_MAX:
            _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        else:
            with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
                torch.manual_seed(seed)
                _, s, v = torch.svd_lowrank(xc, q=min(self.dim + 16, k, d), niter=6)
            vh = v.T
        n = min(self.dim, vh.shape[0])
        comps = xc.new_zeros(self.dim, d)
        comps[:n] = vh[:n]
        var = xc.new_zeros(self.dim)
        var[:n] = s[:n] ** 2 / (k - 1)
        if n < self.dim:
            warnings.warn(f"pca codec: {k} training masks give only {n} components; "
                          f"the last {self.dim - n} of {self.dim} are zero")
        total = torch.linalg.vector_norm(xc) ** 2 / (k - 1)
        self._set_state({"mean": mean, "components": comps, "variance": var, "total_variance": total}, k)
        return self

    def explained_variance_ratio(self) -> torch.Tensor:
        """float64 [n_k]: variance along each kept component over the total variance of the fit data."""
        t = self._tensors(torch.device("cpu"), torch.float64)
        return t["variance"] / t["total_variance"]

    def _tensors(self, device, dtype):
        t = super()._tensors(device, dtype)
        if "scale" not in t:  # whitening scale; floored so zero-variance components stay finite
            t["scale"] = t["variance"].clamp(min=1e-12).sqrt()
        return t

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [K,N,N] in {0,1} -> codes [K,n_k]. Stochastic when jitter=True (as the reference's targets)."""
        m = self._masks_as_float(masks)
        t = self._tensors(m.device, m.dtype)
        x = m.flatten(1)
        if self.jitter:
            x = _jitter_logit(x)
        v = torch.matmul(x - t["mean"], t["components"].T)
        return v / t["scale"] if self.whiten else v

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """codes [K,n_k] -> probabilities [K,N,N] (sigmoid with jitter, else clamp to [0,1]); differentiable."""
        v = self._check_vectors(vectors)
        t = self._tensors(v.device, v.dtype)
        if self.whiten:
            v = v * t["scale"]
        x = torch.addmm(t["mean"], v, t["components"])  # [K,N²]
        x = torch.sigmoid(x) if self.jitter else x.clamp(0, 1)
        return x.reshape(v.shape[0], self.resolution, self.resolution)

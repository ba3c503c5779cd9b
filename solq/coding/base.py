"""The codec interface shared by every mask compression coding, and the name -> factory table.

A codec turns binary masks cropped to their boxes, float [K,N,N] in {0,1}, into vectors [K,n_k]
(``encode``) and back into continuous maps [K,N,N] (``decode``); ``binarize`` makes the final bool
masks. Codecs are plain objects, not ``nn.Module``s: their fixed bases are cached per (device, dtype)
and never enter a model's state dict.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

__all__ = ["Codec", "FittedCodec", "CODECS", "register_codec", "build_codec", "build_codec_from_config",
           "THRESHOLDS"]

THRESHOLDS = ("midrange", "0.5")


class Codec:
    """Base class: attributes ``name``, ``resolution`` (N), ``dim`` (n_k), ``loss_type`` ("l1" | "mse_dice").

    Subclasses implement ``encode(masks [K,N,N]) -> [K,dim]`` and ``decode(vectors [K,dim]) -> [K,N,N]``.
    ``threshold`` picks the binarisation: "midrange" = strict ``> (max+min)/2`` per mask (the authors' release;
    a constant map, which the release turns into an empty mask, uses ``>= 0.5`` instead), "0.5" = ``>= 0.5``.
    """

    name: str = "codec"
    loss_type: str = "l1"
    requires_fit: bool = False

    def __init__(self, resolution: int, dim: int, threshold: str = "0.5"):
        if int(resolution) < 1:
            raise ValueError(f"{self.name} codec: resolution must be >= 1, got {resolution}")
        if int(dim) < 1:
            raise ValueError(f"{self.name} codec: dimension (num_coeffs) must be >= 1, got {dim}")
        threshold = str(threshold)
        if threshold not in THRESHOLDS:
            raise ValueError(f"{self.name} codec: threshold {threshold!r} is not one of {list(THRESHOLDS)}")
        self.resolution = int(resolution)
        self.dim = int(dim)
        self.threshold = threshold

    @classmethod
    def config_params(cls, codec_cfg) -> dict:
        """The constructor keyword arguments that a ``solq.config.CodecConfig`` describes for this codec."""
        raise NotImplementedError

    # ---- interface -------------------------------------------------------------------------------
    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return True

    def binarize(self, decoded: torch.Tensor) -> torch.Tensor:
        """decoded float [K,N,N] -> bool [K,N,N] with this codec's threshold rule."""
        if decoded.dim() != 3:
            raise ValueError(f"{self.name} codec: binarize expects [K,N,N], got shape {tuple(decoded.shape)}")
        if self.threshold == "0.5":
            return decoded >= 0.5
        if decoded.shape[0] == 0:
            return decoded.new_zeros(decoded.shape, dtype=torch.bool)
        flat = decoded.flatten(1)
        hi, lo = flat.amax(1), flat.amin(1)
        mid = (hi + lo) / 2
        # A constant map (e.g. the exact code of a mask filling its whole box: only the DC term) would be
        # empty under the strict mid-range rule, as in the reference; there the 0.5 rule decides (all or none).
        constant = (hi - lo) <= 1e-6 * hi.abs().clamp(min=1)
        threshold = torch.where(constant, torch.where(mid >= 0.5, lo - 1, hi + 1), mid)
        return (flat > threshold[:, None]).view(decoded.shape)  # 2-D compare: faster than [K,1,1] broadcast

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, dim={self.dim}, threshold={self.threshold!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # ---- helpers for subclasses ------------------------------------------------------------------
    def _masks_as_float(self, masks: torch.Tensor) -> torch.Tensor:
        """Check masks are [K,N,N] with N = resolution; bool/integer -> float32, floats kept as they are."""
        if not isinstance(masks, torch.Tensor):
            raise TypeError(f"{self.name} codec: encode expects a torch.Tensor, got {type(masks).__name__}")
        n, shape = self.resolution, masks.shape
        if len(shape) != 3 or shape[1] != n or shape[2] != n:
            raise ValueError(f"{self.name} codec: encode expects masks [K,{n},{n}] (resolution {n}), "
                             f"got shape {tuple(masks.shape)}")
        return masks if masks.is_floating_point() else masks.float()

    def _check_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        if not isinstance(vectors, torch.Tensor):
            raise TypeError(f"{self.name} codec: decode expects a torch.Tensor, got {type(vectors).__name__}")
        shape = vectors.shape
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"{self.name} codec: decode expects vectors [K,{self.dim}], "
                             f"got shape {tuple(vectors.shape)}")
        return vectors if vectors.is_floating_point() else vectors.float()


class FittedCodec(Codec):
    """A codec with state learned from training masks (pca, sparse): ``fit``, ``save``, ``load``.

    Subclasses list their learned tensors in ``_state_names`` and fit-time settings that must match on
    load in ``_fit_settings``; learned tensors live on the CPU in float64 and are cast per (device, dtype).
    """

    requires_fit = True
    _state_names: tuple[str, ...] = ()
    _fit_settings: tuple[str, ...] = ()

    def __init__(self, resolution: int, dim: int, threshold: str = "0.5"):
        super().__init__(resolution, dim, threshold)
        self._state: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.num_fit_samples = 0

    @property
    def is_fitted(self) -> bool:
        return bool(self._state)

    def _set_state(self, state: dict[str, torch.Tensor], num_samples: int) -> None:
        self._state = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in state.items()}
        self._cache = {}
        self.num_fit_samples = int(num_samples)

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The learned tensors on ``device`` in ``dtype`` (cached); raises if the codec is not fitted."""
        if not self.is_fitted:
            raise RuntimeError(f"{self.name} codec is not fitted: call fit(masks [K,{self.resolution},"
                               f"{self.resolution}]) or load(path) first (config: codec.file)")
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._state.items()}
        return self._cache[key]

    def fit(self, masks: torch.Tensor) -> "FittedCodec":
        raise NotImplementedError

    def save(self, path) -> None:
        """Write the fitted codec to ``path`` (torch.save of tensors + plain metadata)."""
        if not self.is_fitted:
            raise RuntimeError(f"{self.name} codec: nothing to save, the codec is not fitted")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"codec": self.name, "resolution": self.resolution, "dim": self.dim,
                "num_fit_samples": self.num_fit_samples}
        meta.update({k: getattr(self, k) for k in self._fit_settings})
        torch.save({"meta": meta, "state": {k: v.float() for k, v in self._state.items()}}, str(path))

    def load(self, path) -> "FittedCodec":
        """Load a file written by ``save`` into this codec (returns self).

        Raises ValueError naming the file and the key when it was fitted with another codec, resolution,
        dimension or fit-time setting.
        """
        try:
            blob = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.name} codec file not found: {path}") from None
        if not isinstance(blob, dict) or "meta" not in blob or "state" not in blob:
            raise ValueError(f"{path}: not a solq codec file (expected keys 'meta' and 'state')")
        meta = blob["meta"]
        expected = {"codec": self.name, "resolution": self.resolution, "dim": self.dim}
        expected.update({k: getattr(self, k) for k in self._fit_settings})
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(f"{path}: codec file has {key}={meta.get(key)!r}, but this codec has {value!r}")
        missing = [k for k in self._state_names if k not in blob["state"]]
        if missing:
            raise ValueError(f"{path}: codec file lacks tensors {missing}")
        self._set_state({k: blob["state"][k] for k in self._state_names}, meta.get("num_fit_samples", 0))
        return self

    def _fit_matrix(self, masks: torch.Tensor) -> torch.Tensor:
        """Training masks [K,N,N] -> CPU matrix [K,N²], float64 for float64 masks, else float32 (memory:
        20,000 crops at N = 128 are 1.3 GB in float32). Checks the shape and K >= 2."""
        m = self._masks_as_float(masks)
        if m.shape[0] < 2:
            raise ValueError(f"{self.name} codec: fit needs at least 2 masks, got {m.shape[0]}")
        dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
        return m.detach().reshape(m.shape[0], -1).to("cpu", dtype)


CODECS: dict[str, type["Codec"]] = {}  # plain name -> codec class, filled by @register_codec


def register_codec(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: make a codec class buildable by its ``name`` (``build_codec``, ``codec.name`` in configs).
    Each codec module registers its own class, so this module imports none of them."""
    if cls.name in CODECS and CODECS[cls.name] is not cls:
        raise ValueError(f"codec name {cls.name!r} is taken by {CODECS[cls.name].__name__}")
    CODECS[cls.name] = cls
    return cls


def build_codec(name: str, **params) -> Codec:
    """Build a codec by name ("dct" | "pca" | "sparse" | "flatten") with constructor keyword arguments.

    Fitted codecs (pca, sparse) come back unfitted unless ``file=...`` is given (then loaded from it).
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; available: {sorted(CODECS)}")
    file = params.pop("file", "") or ""
    try:
        codec = CODECS[name](**params)
    except TypeError as e:  # unknown keyword: name the codec and its accepted parameters
        accepted = [p for p in inspect.signature(CODECS[name]).parameters if p != "self"]
        raise ValueError(f"codec {name!r}: bad parameters {sorted(params)} ({e}); accepted: {accepted}") from None
    if file:
        if not codec.requires_fit:
            raise ValueError(f"codec {name!r} has no fitted state; 'file' ({file}) only applies to pca/sparse")
        codec.load(file)
    return codec


def build_codec_from_config(codec_cfg) -> Codec:
    """Build the codec described by a ``solq.config.CodecConfig``: the class registered as ``codec_cfg.name``
    reads its own fields (``Codec.config_params``); pca/sparse are loaded from ``file`` when it is set, else
    come back unfitted (``fit`` them before use)."""
    if codec_cfg.name not in CODECS:
        raise ValueError(f"codec.name: unknown codec {codec_cfg.name!r}; available: {sorted(CODECS)}")
    return build_codec(codec_cfg.name, **CODECS[codec_cfg.name].config_params(codec_cfg))

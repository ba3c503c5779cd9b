"""Mask compression coding (paper §3.2, Tables 3a/3d/3e).

- ``crop_to_box(masks [K,H,W], boxes_xyxy [K,4], size) -> float {0,1} [K,size,size]``
- ``paste_in_image(maps [K,n,n], boxes_xyxy [K,4], (H, W), threshold=0.5) -> bool [K,H,W]``
- ``build_codec(name, **params)`` / ``build_codec_from_config(cfg.codec)``; codecs ``DCTCodec``,
  ``PCACodec``, ``SparseCodec``, ``FlattenCodec`` with ``encode``, ``decode``, ``binarize``
  (pca/sparse also ``fit``, ``save``, ``load``, ``is_fitted``).
- ``solq.coding.study``: the training-free reconstruction study (upper bound of each coding).
"""
from .base import CODECS, Codec, FittedCodec, build_codec, build_codec_from_config, register_codec
from .dct import DCTCodec, dct_matrix, zigzag_order
from .flatten import FlattenCodec
from .geometry import crop_to_box, paste_in_image
from .pca import PCACodec
from .sparse import SparseCodec

__all__ = [
    "Codec", "FittedCodec", "CODECS", "register_codec", "build_codec", "build_codec_from_config", "DCTCodec",
    "PCACodec", "SparseCodec", "FlattenCodec", "crop_to_box", "paste_in_image", "dct_matrix", "zigzag_order",
]

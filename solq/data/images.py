"""Reading image files as 8-bit RGB: :func:`load_rgb` and :class:`ImageLoadError`.

Images are decoded to RGB whatever their mode: grayscale, 16-bit, CMYK, palette, images with alpha
(composited on black), and EXIF orientation applied with ``PIL.ImageOps.exif_transpose``. COCO's
``width``/``height`` describe the displayed (rotated) image, so sizes are compared after rotation;
when only the stored, unrotated size matches the JSON, the stored pixels are used (with a warning),
since the annotations were then evidently drawn on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from .validation import DatasetError

__all__ = ["ImageLoadError", "load_rgb"]


class ImageLoadError(DatasetError):
    """An image file is missing or unreadable, or its size differs from the annotation file.

    ``reason`` is the short category used in reports ("image file missing", ...)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def load_rgb(path: Path | str, expected_wh: Optional[tuple[int, int]] = None, *, decode: bool = True):
    """Open an image as 8-bit RGB with EXIF orientation applied.

    Takes ``expected_wh`` = (width, height) from the JSON. Returns ``(PIL RGB image or None if not decode,
    note)`` where note is '' or says that the stored (unrotated) pixels were used. Raises
    :class:`ImageLoadError` when the file is missing, unreadable or of another size.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            raw = im.size
            shown = raw[::-1] if orientation in (5, 6, 7, 8) else raw
            note = ""
            if expected_wh is not None and shown != tuple(expected_wh):
                if raw != tuple(expected_wh):
                    raise ImageLoadError(f"{path}: image is {shown[0]}x{shown[1]} (w x h, after EXIF orientation) "
                                         f"but the annotation file says {expected_wh[0]}x{expected_wh[1]}",
                                         "image size differs from the JSON")
                note = (f"{path}: EXIF orientation {orientation} would give {shown[0]}x{shown[1]} but the "
                        f"annotation file gives the stored size {raw[0]}x{raw[1]}; using the stored pixels")
            if not decode:
                return None, note
            im.load()  # decode now, inside the try: corrupt data raises here, and the file can close
            return _to_rgb(im if note else ImageOps.exif_transpose(im)), note
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: image file missing", "image file missing") from None
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{path}: unreadable image file ({type(exc).__name__}: {exc})",
                             "unreadable image file") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: rescale instead of clipping
        arr = np.asarray(im)
        if arr.max() > 255:
            arr = arr.astype(np.float32) / 257.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")

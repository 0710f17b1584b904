"""Reading 8-bit images for super-resolution: one reader for the CLI (``tvm-lut sr upscale``) and training.

Pillow decodes; what a lookup-table upscaler cannot use (16-bit or float pixels, an alpha channel, an
unknown mode) is refused with an ``OptionError`` naming the file and why, rather than silently converted.
"""

from __future__ import annotations

import numpy as np

from tvm_lut.errors import OptionError


def read_image(path: str) -> np.ndarray:
    """An 8-bit grayscale or RGB image file as uint8, or an ``OptionError`` saying why it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise OptionError(f"{path}: a {mode} ({'16-bit' if '16' in mode else '32-bit'}) image; "
                                  "give an 8-bit grayscale or RGB image")
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                raise OptionError(f"{path}: the image has an alpha channel ({mode}); give it without transparency "
                                  "(e.g. flattened onto a background)")
            if mode not in ("L", "RGB", "P", "CMYK", "YCbCr"):
                raise OptionError(f"{path}: image mode {mode} is not supported; give an 8-bit grayscale or RGB image")
            return np.asarray(im.convert("L" if mode == "L" else "RGB"))
    except FileNotFoundError:
        raise OptionError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise OptionError(f"{path}: not an image file") from None

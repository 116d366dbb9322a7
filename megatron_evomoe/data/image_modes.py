"""Any PIL image mode -> 8-bit RGB, the same way for files and in-memory images.

`Image.convert("RGB")` alone is wrong for two kinds of images a real dataset holds:

- 16-bit greyscale (PNG opens as "I;16"/"I;16B"; older Pillow and TIFF give 32-bit "I"): convert
  clips every sample above 255 to white, so a 16-bit scan comes out almost entirely white. The
  samples are scaled instead, v -> round(v / 257), which maps 0..65535 onto 0..255 exactly
  (257 * k -> k, the inverse of the usual 8 -> 16 bit expansion k -> 257 * k). "I;16*" is always
  scaled; 32-bit "I" only when a sample exceeds 255: an "I" image holding 8-bit values (an "L"
  image converted to "I", many TIFFs) goes through PIL's conversion and keeps its values, as
  HF's processors (which call convert("RGB")) keep them;
- transparency (RGBA, LA, PA, premultiplied RGBa/La, and P/L/RGB with a `transparency` key):
  convert drops the alpha and keeps whatever colour the invisible pixels happen to hold. Every
  such image is composited on white, the background of LLaVA-style loaders and of the page the
  image was made for.

Everything else (CMYK, YCbCr, 1-bit, palette without transparency) goes through PIL's own
conversion: for CMYK, R = (255 - C) * (255 - K) / 255, rounded, and likewise G (M) and B (Y).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
BACKGROUND = (255, 255, 255, 255)  # white, opaque


def has_transparency(img: Image.Image) -> bool:
    return any(band in ("A", "a") for band in img.getbands()) or "transparency" in img.info


def is_sixteen_bit(img: Image.Image) -> bool:
    """16-bit greyscale: an "I;16*" mode, or 32-bit "I" with a sample above the 8-bit range."""
    if img.mode in SIXTEEN_BIT_GREY:
        return True
    return img.mode == "I" and (img.getextrema()[1] or 0) > 255


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as a new 8-bit RGB image (a copy: the caller may close the file `img` was read from)."""
    if is_sixteen_bit(img):
        samples = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)  # "I" is 32-bit: keep 16-bit range
        return Image.fromarray(np.rint(samples / 257.0).astype(np.uint8)).convert("RGB")
    if has_transparency(img):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
    return img.convert("RGB")

"""Image loading and preprocessing for the vision tower.

file or PIL image -> RGB (any mode, image_modes.py) -> (optionally padded to a square) -> bicubic
resize to image_size x image_size -> float [3, H, W] in [0, 1] -> (x - mean) / std per channel.  CLIP's mean/std are the
defaults, as the vision towers the recipes use (CLIP, SigLIP via config) expect them.

A file that PIL cannot decode (corrupt, truncated, not an image) raises `DataError`
naming the file; a training run never sees a half-decoded image.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile

from .errors import DataError
from .image_modes import to_rgb

CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open and fully decode an image file as RGB (any mode: `to_rgb`), or raise DataError naming the file."""
    path = os.fspath(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched PIL to padding truncated files with grey; we would train on that silently.
        raise DataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; unset it so truncated images are reported",
                        file=path, reason="corrupt_image")
    try:
        with Image.open(path) as img:
            img.load()  # Image.open is lazy: decoding errors only appear here
            return to_rgb(img)
    except FileNotFoundError as e:
        raise DataError("image file not found", file=path, field="image", reason="missing_image") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image ({type(e).__name__}: {e})", file=path, reason="corrupt_image") from e


def expand_to_square(img: Image.Image, fill: Sequence[float]) -> Image.Image:
    """Pad the short side symmetrically with `fill` (0..1 RGB), as LLaVA-1.5's 'pad' mode."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    colour = tuple(int(round(255 * c)) for c in fill)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class ImageProcessor:
    """Callable: path or PIL image -> normalised float tensor [3, image_size, image_size]."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        pad_to_square: bool = False,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {tuple(std)}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad_to_square = pad_to_square
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Union[str, os.PathLike, Image.Image]) -> torch.Tensor:
        img = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)  # files: RGB already
        if self.pad_to_square:
            img = expand_to_square(img, self.mean)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [H, W, 3]
        pixels = pixels.permute(2, 0, 1).contiguous()  # [3, H, W]
        return (pixels - self._mean_t) / self._std_t


def process_image(path: Union[str, os.PathLike], image_size: int,
                  mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One-off form of ImageProcessor(image_size, mean, std)(path)."""
    return ImageProcessor(image_size, mean, std)(path)

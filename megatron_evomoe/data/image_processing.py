"""Image loading and preprocessing for the vision tower, as the tower's Hugging Face processor does it.

file or PIL image -> 8-bit RGB (`image_modes.to_rgb`, the one path for files and in-memory images)
-> geometry by `vision.image_mode` -> uint8 [H, W, 3] -> x * (1/255) in float64, cast to float32
-> (x - mean) / std in float32 -> [3, image_size, image_size].

Modes (S = vision.image_size, the resize filter = vision.resample, PIL's):

- ``crop`` (CLIP, `CLIPImageProcessor` with size {"shortest_edge": S}, crop_size S): the short side
  is resized to S and the long side to ``int(S * long / short)`` (truncated, as HF computes it), then
  a centre crop S x S whose offsets are ``(side - S) // 2``;
- ``pad`` (LLaVA-1.5's ``image_aspect_ratio: pad``): LLaVA's ``expand2square`` first, the short side
  padded symmetrically (offset ``(long - short) // 2``) with the colour ``int(255 * mean)`` per channel
  (truncated, as LLaVA's train.py writes it), then the ``crop`` pipeline on the square (transformers'
  `LlavaImageProcessor` with ``do_pad`` true does the same);
- ``resize`` (SigLIP, `SiglipImageProcessor`): straight to S x S.

A square image of S x S pixels is left as it is by all three (PIL's resize to the same size is a copy).

Transparency. LLaVA's and MoE-LLaVA's loaders (``Image.open(path).convert('RGB')``, also what
transformers 4.x's ``convert_to_rgb`` did) drop the alpha and keep whatever colour the transparent
pixels store; transformers 5's ``convert_to_rgb`` (every slow/PIL and fast processor) composites
RGBA / LA / P-with-transparency on white. We composite on white (`to_rgb`): the colour under a
transparent pixel is not part of the image (encoders store anything there, often black), white is
what the image looks like when shown, and it is what an exported model gets from transformers 5's
`AutoProcessor`. The two agree on every pixel whose alpha is 255, so this matters only for
translucent PNGs (rare in LLaVA's training mix: COCO, GQA, VG, OCR-VQA and TextVQA are JPEG). A
16-bit greyscale image ("I;16*", or 32-bit "I" with a sample above 255) is scaled to 8 bits
(`to_rgb`) where PIL's convert, and so both of the above, clip it to white; an "I" image of 8-bit
values keeps them, as in both.

Equality with transformers 5.24's PIL-backend processors (`CLIPImageProcessorPil`,
`SiglipImageProcessorPil`, `LlavaImageProcessorPil`; in 5.x the plain `CLIPImageProcessor` / `SiglipImageProcessor` names and
`AutoImageProcessor`'s default are the torchvision "fast" processors): within float32 rounding
(tests: max |difference| <= 1e-5). The fast processors resize tensors with torchvision's
antialiased bicubic, which differs from PIL's by a few of 255 levels on downscaled images.

A file that PIL cannot decode (corrupt, truncated, not an image) raises `DataError` naming the file;
a training run never sees a half-decoded image.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile

from ..config.schema import CLIP_MEAN, CLIP_STD, VisionConfig, check_choice
from .errors import DataError
from .image_modes import to_rgb

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageProcessor", "expand_to_square", "llava_pad_colour", "load_image",
           "shortest_edge_size"]

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
ImageInput = Union[str, os.PathLike, Image.Image]


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


def llava_pad_colour(mean: Sequence[float]) -> Tuple[int, int, int]:
    """LLaVA's fill colour for `pad`: each mean channel times 255, truncated (CLIP's mean -> (122, 116, 104))."""
    return tuple(int(m * 255) for m in mean)


def expand_to_square(img: Image.Image, colour: Tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: the short side padded with `colour` (0..255 RGB), the image at offset (long - short) // 2."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """(width, height) with the short side `size` and the long side int(size * long / short), as HF's
    `get_resize_output_image_size(default_to_square=False)` rounds it."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class ImageProcessor:
    """Callable: path or PIL image -> normalised float32 tensor [3, image_size, image_size]."""

    def __init__(self, image_size: int, mode: str = "crop", mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, resample: str = "bicubic"):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        check_choice(VisionConfig, "image_mode", mode, "image mode")
        check_choice(VisionConfig, "resample", resample, "resample")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {tuple(std)}")
        self.image_size = int(image_size)
        self.mode = mode
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = resample
        # float32 like HF's normalise, which casts mean/std to the image's dtype
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_config(cls, vision: VisionConfig) -> "ImageProcessor":
        """The processor of a config's `vision` section (the one every consumer builds)."""
        return cls(vision.image_size, vision.image_mode, vision.image_mean, vision.image_std, vision.resample)

    def __repr__(self) -> str:
        return (f"ImageProcessor(image_size={self.image_size}, mode={self.mode!r}, mean={self.mean}, "
                f"std={self.std}, resample={self.resample!r})")

    def geometry(self, img: Image.Image) -> Image.Image:
        """An RGB image -> the RGB image_size x image_size image the tower sees (before rescaling)."""
        s, filt = self.image_size, RESAMPLE[self.resample]
        if self.mode == "resize":
            return img.resize((s, s), filt)
        if self.mode == "pad":
            img = expand_to_square(img, llava_pad_colour(self.mean))
        img = img.resize(shortest_edge_size(*img.size, s), filt)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        return img.crop((left, top, left + s, top + s))

    def __call__(self, image: ImageInput) -> torch.Tensor:
        img = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)  # files: RGB already
        rgb = np.asarray(self.geometry(img))  # [S, S, 3] uint8
        # HF's rescale: float64 product, then float32; normalisation in float32
        pixels = torch.from_numpy((rgb.astype(np.float64) * (1 / 255)).astype(np.float32))
        pixels = pixels.permute(2, 0, 1).contiguous()  # [3, S, S]
        return (pixels - self._mean_t) / self._std_t

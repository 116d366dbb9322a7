"""Image loading and normalisation."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.image_processing import CLIP_MEAN, CLIP_STD, ImageProcessor, load_image


def test_constant_image_normalises_to_exact_values(tmp_path):
    Image.new("RGB", (50, 30), (255, 128, 0)).save(tmp_path / "a.png")
    x = ImageProcessor(8)(str(tmp_path / "a.png"))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    for c, v in enumerate((255, 128, 0)):
        expected = (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(x[c], torch.full((8, 8), expected), atol=1e-5)


def test_custom_mean_std_and_grey_and_rgba_inputs(tmp_path):
    Image.new("L", (10, 10), 51).save(tmp_path / "g.png")
    x = ImageProcessor(4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(str(tmp_path / "g.png"))
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.full((3, 4, 4), 0.2))
    Image.new("RGBA", (6, 6), (0, 0, 0, 0)).save(tmp_path / "t.png")  # fully transparent -> white
    rgb = load_image(tmp_path / "t.png")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_bicubic_resize_and_pad_to_square(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))  # right half white
    plain = ImageProcessor(8, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert plain[0, :, 0].max() < 0.05 and plain[0, :, -1].min() > 0.95  # left black, right white
    resized = np.asarray(img.resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy(resized).permute(2, 0, 1)
    assert torch.allclose(plain, expected)
    padded = ImageProcessor(8, mean=(0.5, 0.5, 0.5), std=(1, 1, 1), pad_to_square=True)(img)
    # Top and bottom quarters are padding filled with the mean colour, which normalises to ~0.
    assert padded[:, 0].abs().max() < 0.01 and padded[:, -1].abs().max() < 0.01


def test_unreadable_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"x\.png: cannot decode image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"missing\.png.*not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="std"):
        ImageProcessor(8, std=(1, 0, 1))

"""Image loading and preprocessing: the three modes by hand, and against transformers' PIL processors."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.config.schema import VisionConfig
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.image_processing import (CLIP_MEAN, CLIP_STD, ImageProcessor, expand_to_square,
                                                   llava_pad_colour, load_image, shortest_edge_size)

SIGLIP = ([0.5] * 3, [0.5] * 3)
SIZES = [(37, 23), (23, 37), (50, 50)]
IMAGE_MODES = ["RGB", "L", "RGBA", "P", "LA"]


def noise_image(w, h, mode, seed=0):
    """Random pixels in `mode`; P carries a transparent palette index, RGBA/LA random alpha."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "P":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 3
        return img
    return img if mode == "RGBA" else img.convert(mode)


def unit(size, mode="crop", resample="bicubic"):
    """A processor whose output is the pixels on the 0..1 scale (mean 0, std 1)."""
    return ImageProcessor(size, mode, (0, 0, 0), (1, 1, 1), resample)


def as_unit_tensor(img):
    return torch.from_numpy((np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)).permute(2, 0, 1)


def test_constant_image_normalises_to_exact_values(tmp_path):
    Image.new("RGB", (50, 30), (255, 128, 0)).save(tmp_path / "a.png")
    x = ImageProcessor(8)(str(tmp_path / "a.png"))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    for c, v in enumerate((255, 128, 0)):
        expected = (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(x[c], torch.full((8, 8), expected), atol=1e-6)


def test_custom_mean_std_and_grey_and_rgba_inputs(tmp_path):
    Image.new("L", (10, 10), 51).save(tmp_path / "g.png")
    x = ImageProcessor(4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(str(tmp_path / "g.png"))
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.full((3, 4, 4), 0.2))
    Image.new("RGBA", (6, 6), (0, 0, 0, 0)).save(tmp_path / "t.png")  # fully transparent -> white
    rgb = load_image(tmp_path / "t.png")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_shortest_edge_sizes_truncate_as_hf():
    # long side = int(S * long / short): 32 * 37 / 23 = 51.48 -> 51; 24 * 33 / 31 = 25.55 -> 25
    assert shortest_edge_size(37, 23, 32) == (51, 32)
    assert shortest_edge_size(23, 37, 32) == (32, 51)
    assert shortest_edge_size(33, 31, 24) == (25, 24)
    assert shortest_edge_size(50, 50, 24) == (24, 24)


def test_crop_resizes_the_short_side_then_centre_crops():
    img = noise_image(37, 23, "RGB")
    # 37x23 -> 51x32, then the columns (51 - 32) // 2 = 9 .. 41
    expected = as_unit_tensor(img.resize((51, 32), Image.Resampling.BICUBIC).crop((9, 0, 41, 32)))
    assert torch.equal(unit(32)(img), expected)
    tall = noise_image(23, 37, "RGB")
    expected = as_unit_tensor(tall.resize((32, 51), Image.Resampling.BILINEAR).crop((0, 9, 32, 41)))
    assert torch.equal(unit(32, resample="bilinear")(tall), expected)


def test_resize_is_a_straight_resize_and_a_square_image_of_the_size_is_untouched():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))  # right half white
    straight = unit(8, "resize")(img)
    assert torch.equal(straight, as_unit_tensor(img.resize((8, 8), Image.Resampling.BICUBIC)))
    assert straight[0, :, 0].max() < 0.05 and straight[0, :, -1].min() > 0.95  # left black, right white
    square = noise_image(16, 16, "RGB")
    for mode in ("crop", "pad", "resize"):  # the bundled demo's images: every mode gives the pixels as they are
        assert torch.equal(unit(16, mode)(square), as_unit_tensor(square)), mode


def test_pad_fills_with_llavas_truncated_mean_colour_then_crops():
    assert llava_pad_colour(CLIP_MEAN) == (122, 116, 104)  # int(255 * m): 122.77, 116.74, 104.09 truncated
    img = noise_image(40, 8, "RGB")
    by_hand = Image.new("RGB", (40, 40), (122, 116, 104))
    by_hand.paste(img, (0, 16))  # (40 - 8) // 2 rows above
    assert expand_to_square(img, (122, 116, 104)).tobytes() == by_hand.tobytes()
    x = ImageProcessor(8, "pad")(img)
    assert torch.equal(x, ImageProcessor(8, "crop")(by_hand))
    corner = [(v / 255 - m) / s for v, m, s in zip((122, 116, 104), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x[:, 0, 0], torch.tensor(corner), atol=1e-6)  # row 0 of 8 reads input rows < 13: padding
    odd = noise_image(7, 10, "RGB")  # (10 - 7) // 2 = 1 column on the left, 2 on the right
    padded = np.asarray(expand_to_square(odd, (1, 2, 3)))
    assert (padded[:, 0] == (1, 2, 3)).all() and (padded[:, 8:] == (1, 2, 3)).all()
    assert (padded[:, 1:8] == np.asarray(odd)).all()


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_in_memory_images_lose_alpha_as_files_do(tmp_path, mode):
    img = noise_image(9, 6, mode, seed=2)
    img.save(tmp_path / "x.png")
    proc = ImageProcessor(4, "resize")
    assert torch.equal(proc(img), proc(tmp_path / "x.png"))


def test_processor_from_config_and_bad_settings():
    v = VisionConfig(image_size=24, patch_size=8, image_mode="resize", image_mean=SIGLIP[0], image_std=SIGLIP[1],
                     resample="bilinear")
    p = ImageProcessor.from_config(v)
    assert (p.image_size, p.mode, p.mean, p.std, p.resample) == (24, "resize", (0.5,) * 3, (0.5,) * 3, "bilinear")
    with pytest.raises(ConfigError, match="image mode: 'square' is not one of crop, pad, resize"):
        ImageProcessor(8, "square")
    with pytest.raises(ValueError, match="std"):
        ImageProcessor(8, std=(1, 0, 1))
    one = "--stages=[{name: s}]"
    assert load_config(None, [one]).vision.image_mode == "crop"
    for override, field in (("--vision.image_mode=square", "vision.image_mode"),
                            ("--vision.image_mean=[0.5, 0.5]", "vision.image_mean"),
                            ("--vision.image_std=[0.5, 0, 0.5]", "vision.image_std"),
                            ("--vision.resample=nearest", "vision.resample")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, [one, override])


def test_unreadable_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"x\.png: cannot decode image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"missing\.png.*not found"):
        load_image(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- against transformers

@pytest.fixture(scope="module")
def hf_pil():
    pytest.importorskip("transformers", reason="the HF processor comparison needs `transformers` (pip install .[test])")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    return CLIPImageProcessorPil, SiglipImageProcessorPil


def max_diff(hf_processor, img, ours) -> float:
    ref = hf_processor(img, return_tensors="np")["pixel_values"][0]  # [3, S, S] float32
    return float(np.abs(ref - ours(img).numpy()).max())


@pytest.mark.parametrize("size", [32, 24])
@pytest.mark.parametrize("w,h", SIZES)
def test_crop_and_resize_equal_clip_and_siglip_processors(hf_pil, size, w, h):
    clip_cls, siglip_cls = hf_pil
    clip = clip_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    siglip = siglip_cls(size={"height": size, "width": size})
    clip_bilinear = clip_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=2)
    for mode in IMAGE_MODES:
        img = noise_image(w, h, mode, seed=w + size)
        assert max_diff(clip, img, ImageProcessor(size, "crop")) <= 1e-5, mode
        assert max_diff(siglip, img, ImageProcessor(size, "resize", *SIGLIP)) <= 1e-5, mode
        assert max_diff(clip_bilinear, img, ImageProcessor(size, "crop", resample="bilinear")) <= 1e-5, mode


@pytest.mark.parametrize("w,h", SIZES)
def test_pad_equals_expand2square_then_the_clip_processor(hf_pil, w, h):
    clip = hf_pil[0](size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    for mode in IMAGE_MODES:
        img = noise_image(w, h, mode, seed=h)
        side = max(w, h)
        square = Image.new("RGB", (side, side), (122, 116, 104))  # LLaVA's int(255 * CLIP mean)
        square.paste(load_rgb(img), ((side - w) // 2, (side - h) // 2))
        ref = clip(square, return_tensors="np")["pixel_values"][0]
        assert float(np.abs(ref - ImageProcessor(24, "pad")(img).numpy()).max()) <= 1e-5, mode



def test_32_bit_grey_with_8_bit_values_keeps_them_as_the_clip_processor(hf_pil):
    """An "I" image holding 8-bit values (L converted to I, many TIFFs) is not scaled as 16-bit: = CLIP's."""
    clip = hf_pil[0](size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    img = noise_image(37, 23, "L", seed=5).convert("I")
    assert img.mode == "I" and img.getextrema()[1] > 200
    assert max_diff(clip, img, ImageProcessor(24, "crop")) <= 1e-5
    # with a sample above 255 the image is 16-bit: v -> round(v / 257) (documented in data/image_modes.py)
    wide = Image.fromarray(np.array([[257 * 100]], dtype=np.int32))
    assert wide.mode == "I"
    assert float((unit(1, "resize")(wide) - 100 / 255).abs().max()) <= 1e-6


def load_rgb(img):
    """RGB as transformers 5's convert_to_rgb makes it (transparency composited on white)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")

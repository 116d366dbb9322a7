"""Hugging Face image-processor settings (``preprocessor_config.json``) <-> our `vision` image fields.

Import (`image_fields_from_hf`): a processor that centre-crops (CLIP's, ``do_center_crop`` true, the
default of ``CLIPImageProcessor``) -> ``image_mode: crop``; one that does not (SigLIP's) ->
``resize``; a ``LlavaImageProcessor`` with ``do_pad`` true, or a LLaVA config with LLaVA-1.5's
``image_aspect_ratio: pad`` -> ``pad``. The HF LLaVA-1.5 checkpoints record neither (their processor is
CLIP's), so for them ``pad`` is the user's choice: ``vision.image_mode: pad`` in the training config
(pad is compatible with a CLIP processor, `training.restore` accepts it).
Mean, std and the resize filter are read as stored; without a ``preprocessor_config.json`` the
tower family's defaults apply (CLIP: OpenAI's mean/std; SigLIP: 0.5). Settings our `ImageProcessor`
cannot reproduce (no rescale or normalisation, a resize to one size then a crop to another, a
filter other than bicubic/bilinear) are a ConversionError naming the file and the field.

Export (`preprocessor_config`): the file HF's processors read for our settings, a
``CLIPImageProcessor`` for crop, a ``SiglipImageProcessor`` for resize and, for pad, a
``LlavaImageProcessor`` with ``do_pad`` true: it pads to a square with ``int(255 * mean)`` per
channel, the short side centred at offset ``(long - short) // 2`` (LLaVA's expand2square), then
resizes and crops as CLIP's. Without torchvision, AutoProcessor / AutoImageProcessor pick its PIL
backend (``LlavaImageProcessorPil``), whose pixels equal ours within 1e-5; with torchvision installed
they pick the torchvision backend, which pads the same way but resizes with torchvision, not PIL, so
its pixels may differ from ours by resampling round-off.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ..config.schema import CLIP_MEAN, CLIP_STD
from .errors import ConversionError

SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
PIL_FILTERS = {3: "bicubic", 2: "bilinear"}  # PIL.Image.Resampling values, as HF stores `resample`
RESCALE = 1 / 255
FAMILY_DEFAULTS = {
    "clip": dict(image_mode="crop", image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample="bicubic"),
    "siglip": dict(image_mode="resize", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, resample="bicubic"),
}


def _square_side(value: Any, key: str, where: str) -> Optional[int]:
    """A size field as one side: an int, or {"height": n, "width": n}; None for {"shortest_edge": n}."""
    if isinstance(value, dict) and "shortest_edge" in value:
        return None
    if isinstance(value, dict) and value.get("height") == value.get("width") and isinstance(value.get("height"), int):
        return value["height"]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConversionError(f"{where}: {key}={value!r}: expected a square size (an int or equal height and width)")


def _shortest_edge(value: Any) -> Optional[int]:
    """The side a CLIP-style resize gives the short edge (an int size means that too), else None."""
    if isinstance(value, dict):
        return value.get("shortest_edge")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _triple(p: dict, key: str, default: list, where: str) -> list:
    value = p.get(key, default)
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
        raise ConversionError(f"{where}: {key}={value!r}: expected 3 numbers (R, G, B)")
    return [float(x) for x in value]


def _centre_crops(p: dict, family: str) -> bool:
    if "do_center_crop" in p:
        return bool(p["do_center_crop"])
    kind = str(p.get("image_processor_type") or p.get("feature_extractor_type") or "")
    return kind.startswith(("CLIP", "Llava")) or (not kind.startswith("Siglip") and family == "clip")


def image_fields_from_hf(family: str, image_size: int, preprocessor: Optional[dict], where: str,
                         aspect_ratio: Optional[str] = None) -> dict:
    """VisionConfig image fields (image_mode, image_mean, image_std, resample) for a tower of `family`
    taking image_size x image_size images, from its preprocessor_config.json (`where`), if any."""
    fields = dict(FAMILY_DEFAULTS[family])
    p = preprocessor or {}
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if p.get(key, True) is not True:
            raise ConversionError(f"{where}: {key}={p[key]!r}: only processors that resize, rescale and "
                                  "normalise are supported")
    if abs(float(p.get("rescale_factor", RESCALE)) - RESCALE) > 1e-12:
        raise ConversionError(f"{where}: rescale_factor={p['rescale_factor']!r}: only 1/255 is supported")
    if preprocessor is not None:
        fields["image_mode"] = "crop" if _centre_crops(p, family) else "resize"
    if fields["image_mode"] == "crop":
        if _square_side(p.get("crop_size", image_size), "crop_size", where) != image_size:
            raise ConversionError(f"{where}: crop_size={p.get('crop_size')!r}: the tower takes "
                                  f"{image_size}x{image_size} images")
        if _shortest_edge(p.get("size", image_size)) != image_size:
            raise ConversionError(f"{where}: size={p.get('size')!r}: only a shortest-edge resize to the crop size "
                                  f"{image_size} is supported (no resize to one size, then a crop to another)")
    elif _square_side(p.get("size", image_size), "size", where) != image_size:
        raise ConversionError(f"{where}: size={p.get('size')!r}: without a centre crop the resize must give the "
                              f"tower's {image_size}x{image_size}")
    resample = p.get("resample", 3)
    if resample not in PIL_FILTERS:
        raise ConversionError(f"{where}: resample={resample!r}: supported are 3 (bicubic) and 2 (bilinear)")
    fields["resample"] = PIL_FILTERS[resample]
    fields["image_mean"] = _triple(p, "image_mean", fields["image_mean"], where)
    fields["image_std"] = _triple(p, "image_std", fields["image_std"], where)
    if any(s <= 0 for s in fields["image_std"]):
        raise ConversionError(f"{where}: image_std={fields['image_std']!r}: values must be > 0")
    pads = p.get("do_pad") is True  # LlavaImageProcessor's pad-to-square before the resize
    if aspect_ratio == "pad" or pads:
        if fields["image_mode"] != "crop":
            what = "do_pad=true" if pads else "image_aspect_ratio 'pad'"
            raise ConversionError(f"{where}: {what} needs a centre-cropping (CLIP) processor")
        fields["image_mode"] = "pad"
    return fields


def preprocessor_config(vision_cfg) -> dict:
    """The preprocessor_config.json of HF's processor for our image settings (crop: CLIP, pad: LLaVA's,
    resize: SigLIP)."""
    v, s = vision_cfg, vision_cfg.image_size
    out = {"do_convert_rgb": True, "do_resize": True, "resample": {f: k for k, f in PIL_FILTERS.items()}[v.resample],
           "do_rescale": True, "rescale_factor": RESCALE, "do_normalize": True,
           "image_mean": [float(x) for x in v.image_mean], "image_std": [float(x) for x in v.image_std]}
    if v.image_mode == "resize":
        return {"image_processor_type": "SiglipImageProcessor", **out, "size": {"height": s, "width": s}}
    crop = {"size": {"shortest_edge": s}, "do_center_crop": True, "crop_size": {"height": s, "width": s}}
    if v.image_mode == "pad":
        return {"image_processor_type": "LlavaImageProcessor", **out, "do_pad": True, **crop}
    return {"image_processor_type": "CLIPImageProcessor", **out, **crop}

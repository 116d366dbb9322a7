"""The processor files of an exported LLaVA: what `AutoProcessor.from_pretrained` needs.

`LlavaProcessor` expands each `<image>` of a prompt into
``(crop_h // patch_size) * (crop_w // patch_size) + num_additional_image_tokens - 1`` image tokens
(the ``-1`` for ``vision_feature_select_strategy='default'``, which drops the class token), so its
``processor_config.json`` must carry the tower's patch size and whether it has a class token;
without it the processor has no patch size and fails on its first call. The files are written in
the layout transformers 4.x saves: ``processor_config.json`` with the processor's own fields,
``preprocessor_config.json`` with the image processor's (5.x nests the latter inside the former
when it saves, and still reads the separate file: tested with 5.24), and the chat template, if
the tokenizer has one, as ``chat_template.jinja``.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

from ..data.image_processing import CLIP_MEAN, CLIP_STD
from ..data.tokenizer import IMAGE as IMAGE_TOKEN  # every tokenizer of ours has it (added when absent)


def llava_processor_config(vision_cfg) -> dict:
    """processor_config.json of LlavaProcessor for our (CLIP-shaped) tower `vision_cfg`."""
    return {"processor_class": "LlavaProcessor", "patch_size": vision_cfg.patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1 if vision_cfg.cls_token else 0, "image_token": IMAGE_TOKEN}


def preprocessor_config(vision_cfg, recorded: Optional[dict]) -> dict:
    """preprocessor_config.json: CLIPImageProcessor with the mean/std the checkpoint recorded (else CLIP's).

    Resize of the shortest side to image_size, then a centre crop of image_size: on a square image
    this is the plain resize our ImageProcessor does. (The image-mode fields under `vision` will
    replace this function by `hf_vision.preprocessor_config(vision_cfg)`.)
    """
    recorded = recorded or {}
    size = vision_cfg.image_size
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(recorded.get("mean") or CLIP_MEAN), "image_std": list(recorded.get("std") or CLIP_STD),
            "do_convert_rgb": True}


def llava_processor_files(vision_cfg, recorded_image_processor: Optional[dict],
                          tokenizer_config: Optional[dict]) -> Dict[str, Union[dict, str]]:
    """{file name: JSON object or text} of the processor, given the exported tokenizer_config.json (or None)."""
    files: Dict[str, Union[dict, str]] = {
        "processor_config.json": llava_processor_config(vision_cfg),
        "preprocessor_config.json": preprocessor_config(vision_cfg, recorded_image_processor)}
    if tokenizer_config is not None:
        template = tokenizer_config.get("chat_template")
        if isinstance(template, str) and template:
            files["chat_template.jinja"] = template
        files["tokenizer_config.json"] = dict(tokenizer_config, processor_class="LlavaProcessor")
    return files

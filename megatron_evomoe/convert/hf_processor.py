"""The processor files of an exported LLaVA: what `AutoProcessor.from_pretrained` needs.

`LlavaProcessor` expands each `<image>` of a prompt into
``(crop_h // patch_size) * (crop_w // patch_size) + num_additional_image_tokens - 1`` image tokens
(the ``-1`` for ``vision_feature_select_strategy='default'``, which drops the class token), so its
``processor_config.json`` must carry the tower's patch size and whether it has a class token;
without it the processor has no patch size and fails on its first call. The files are written in
the layout transformers 4.x saves: ``processor_config.json`` with the processor's own fields,
``preprocessor_config.json`` with the image processor's (5.x nests the latter inside the former
when it saves, and still reads the separate file: tested with 5.24), and the chat template as
``chat_template.jinja``.

The chat template is the checkpoint's stage's conversation template (`conversation_templates.py`
`chat_template()`: what training rendered), written both as ``chat_template.jinja`` (the
processor's) and into ``tokenizer_config.json`` (the tokenizer's), replacing the tokenizer's own;
the stage's template ``tokenizer`` keeps the tokenizer's own.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

from .hf_image_processor import preprocessor_config
from ..data.tokenizer import IMAGE as IMAGE_TOKEN  # every tokenizer of ours has it (added when absent)


def llava_processor_config(vision_cfg) -> dict:
    """processor_config.json of LlavaProcessor for our (CLIP-shaped) tower `vision_cfg`."""
    return {"processor_class": "LlavaProcessor", "patch_size": vision_cfg.patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1 if vision_cfg.cls_token else 0, "image_token": IMAGE_TOKEN}


def chat_template_files(tokenizer_config: Optional[dict], chat_template: Optional[str]) -> Dict[str, Union[dict, str]]:
    """{file name: content} that make `chat_template` (None: the tokenizer's own) the export's chat template,
    given the exported tokenizer_config.json (or None: no Hugging Face tokenizer, only the .jinja file)."""
    files: Dict[str, Union[dict, str]] = {}
    if tokenizer_config is not None:
        if chat_template is None:
            chat_template = tokenizer_config.get("chat_template")
        else:
            files["tokenizer_config.json"] = dict(tokenizer_config, chat_template=chat_template)
    if isinstance(chat_template, str) and chat_template:
        files["chat_template.jinja"] = chat_template
    return files


def llava_processor_files(vision_cfg, tokenizer_config: Optional[dict],
                          chat_template: Optional[str] = None) -> Dict[str, Union[dict, str]]:
    """{file name: JSON object or text} of the processor, given the exported tokenizer_config.json (or None)
    and the chat template to carry (None: the tokenizer's own)."""
    files: Dict[str, Union[dict, str]] = {
        "processor_config.json": llava_processor_config(vision_cfg),
        "preprocessor_config.json": dict(preprocessor_config(vision_cfg), processor_class="LlavaProcessor")}
    files.update(chat_template_files(tokenizer_config, chat_template))
    if tokenizer_config is not None:
        files["tokenizer_config.json"] = dict(files.get("tokenizer_config.json", tokenizer_config),
                                              processor_class="LlavaProcessor")
    return files

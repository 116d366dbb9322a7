"""Hugging Face import/export (ARCHITECTURE 2: convert/).

    python -m megatron_evomoe.convert hf-to-evomoe --src HF_DIR --dst RUN_DIR [--vision-src CLIP_DIR]
    python -m megatron_evomoe.convert evomoe-to-hf --src RUN_OR_CKPT --dst HF_DIR [--format auto|...]

- `hf_to_evomoe` (llava.py): LLaMA / Mistral / Qwen2 / Qwen-1 / Mixtral / Qwen2-MoE / Phi / StableLM decoders
  (MoE experts per-expert or in transformers 5's fused layout), CLIP and SigLIP towers, LLaVA
  models and the project's own export format -> a run folder that
  `training.restore.load_trained_model`, `python -m megatron_evomoe.generate` and the eval
  CLI load.
- `evomoe_to_hf` (export.py): dense -> LLaMA/Qwen2/Phi/StableLM, linear-router MoE -> Mixtral/Qwen2-MoE,
  CLIP-shaped multimodal -> LLaVA; the DTR and anything else without a Hugging Face class
  -> the project's own safetensors format (docs/checkpoint_format.md).
Every problem is a `ConversionError` (a ValueError) naming the file, tensor or field.
"""
from .errors import ConversionError

__all__ = ["ConversionError", "hf_to_evomoe", "evomoe_to_hf"]


def __getattr__(name):
    # Lazy: `python -m megatron_evomoe.convert` and importing the error type stay cheap.
    if name == "hf_to_evomoe":
        from .llava import hf_to_evomoe
        return hf_to_evomoe
    if name == "evomoe_to_hf":
        from .export import evomoe_to_hf
        return evomoe_to_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

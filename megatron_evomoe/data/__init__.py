"""Data pipeline: LLaVA-format conversations + images, tokenizers, a resumable sampler,
and the bundled tiny dataset of drawn scenes.

Training loop usage:

    paths = build_bundled_dataset("data/bundled")            # or a real LLaVA json + image folder
    tok = load_tokenizer(paths["tokenizer"])
    ds = LlavaDataset(paths["instruct"], paths["images"], tok, seq_len=128,
                      num_image_tokens=16, image_size=32)
    sampler = ResumableSampler(len(ds), seed=0, rank=dp_rank, world_size=dp_size)
    batch = ds.collate([ds[next(sampler)] for _ in range(micro_batch_size)])

Names are imported lazily (PEP 562) so that `python -m megatron_evomoe.data.build_bundled`
neither pays for importing torch nor imports its own module twice.
"""
from ..lazy_exports import lazy_exports

_EXPORTS = {
    "build_bundled": ("build_bundled_dataset",),
    "conversation": ("DEFAULT_TEMPLATE", "IGNORE_INDEX", "IMAGE_TAG", "ConversationTemplate", "parse_conversations",
                     "render_conversation", "render_prompt"),
    "errors": ("DataError",),
    "image_processing": ("CLIP_MEAN", "CLIP_STD", "ImageProcessor", "load_image"),
    "llava_dataset": ("LlavaDataset", "PopeDataset", "PopeSample", "collate_llava", "read_records"),
    "sampler": ("ResumableSampler",),
    "scenes": ("Scene", "SceneGenerator", "SceneObject"),
    "tokenizer": ("HFTokenizer", "Tokenizer", "WordTokenizer", "load_tokenizer"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

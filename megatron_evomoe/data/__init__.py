"""Data pipeline: LLaVA-format conversations + images, tokenizers, the token index, the batch plan,
the loader, packing, and the bundled tiny dataset of drawn scenes.

Training loop usage (what training/stage_data.py does):

    paths = build_bundled_dataset("data/bundled")            # or a real LLaVA json + image folder
    tok = load_tokenizer(paths["tokenizer"])
    ds = LlavaDataset(paths["instruct"], paths["images"], tok, seq_len=128, num_image_tokens=16,
                      image_processor=32, template=get_template("vicuna_v1", tok),
                      index_dir="data/bundled/.token_index")   # built once, then memory-mapped
    plan = BatchPlan(SampleStream([len(ds)], seed=0), ds.lengths, 128, micro_batch_size=8,
                     dp_rank=dp_rank, dp_size=dp_size)             # packed=True: rows of several samples
    collate = lambda rows: ds.collate([row[0] for row in rows])     # unpacked: one sample per row
    for micro_plan, batch, bad in MicroBatchLoader(plan, ds.__getitem__, collate, num_workers=2):
        ...             # micro_plan.state_after: the plan's state to checkpoint after this batch

Names are imported lazily (PEP 562) so that `python -m megatron_evomoe.data.build_bundled`
neither pays for importing torch nor imports its own module twice.
"""
from ..lazy_exports import lazy_exports

_EXPORTS = {
    "build_bundled": ("build_bundled_dataset",),
    "conversation": ("IGNORE_INDEX", "conversation_text", "parse_conversations", "question_text",
                     "render_conversation", "render_prompt"),
    "conversation_templates": ("IMAGE_TAG", "NAMED_TEMPLATES", "get_template", "stage_template"),
    "errors": ("DataError",),
    "image_processing": ("CLIP_MEAN", "CLIP_STD", "ImageProcessor", "load_image"),
    "llava_dataset": ("LlavaDataset", "PopeDataset", "PopeSample", "collate_llava", "read_records"),
    "batch_plan": ("BatchPlan",),
    "loader": ("MicroBatchLoader", "MicroBatchPlan"),
    "mixture": ("SampleStream",),
    "packing": ("collate_packed", "pack_rows"),
    "sampler": ("ResumableSampler",),
    "scenes": ("Scene", "SceneGenerator", "SceneObject"),
    "tokenizer": ("HFTokenizer", "Tokenizer", "WordTokenizer", "load_tokenizer"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

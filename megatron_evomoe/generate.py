"""Generation CLI: answer prompts about images with a trained (or imported) checkpoint.

    python -m megatron_evomoe.generate --ckpt RUN_OR_CKPT --image PATH --prompt "What is in the image?"
        [--prompt ... (several: decoded as a batch)] [--image ... (one per prompt, or one for all)]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--stop STR ...]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16] [--data-root DIR] [--json]

The prompt goes through the conversation template of the checkpoint's stage (the one it was
trained with: `data.conversation.render_prompt`, e.g. vicuna_v1's "{system} USER: <image>\\n{prompt}
ASSISTANT:"; `<image>` is prepended when an image is given and the prompt has no tag)
and the image through the project's `ImageProcessor`, built from the checkpoint's `vision`
settings (an imported tower's: its HF processor's mode, mean/std and filter). Decoding is batched (prompts of equal
length together) with the KV cache of `generation.py`: greedy at temperature 0, else
sampling (temperature, nucleus `--top-p`) from a generator seeded by `--seed`. An answer
ends at EOS, at `--max-new-tokens`, or just before the first `--stop` string.
The library side is `load_for_inference`, `prompt_ids` and `generate_texts`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .data.conversation import question_text, render_prompt
from .data.conversation_templates import IMAGE_TAG, stage_template
from .data.image_processing import ImageProcessor
from .generation import decode, pick_next
from .checkpointing import resolve_checkpoint
from .cli import USER_ERRORS, ArgumentParser, finite_float, int_at_least, user_error


# =============================================================================== loading



def load_for_inference(path, device: str = "cpu", data_root: Optional[str] = None, dtype: str = "float32"):
    """`training.restore.load_trained_model`, plus: an imported checkpoint whose recorded data
    root is gone (the run folder was moved) reads its tokenizer from the run folder itself.
    Returns (model in eval mode, cfg, bundle, state)."""
    from .training.restore import IMPORTED_FORMAT, load_trained_model
    folder = resolve_checkpoint(path)
    if data_root is None:
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):  # not a complete checkpoint: load_trained_model names the folder
            meta = {}
        run_dir = folder.parent.parent
        if isinstance(meta, dict) and meta.get("format") == IMPORTED_FORMAT and (run_dir / "tokenizer").is_dir():
            data_root = str(run_dir)
    model, cfg, bundle, state = load_trained_model(folder, device=device, data_root=data_root)
    if dtype != "float32":
        model = model.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    return model, cfg, bundle, state


def image_processor_for(cfg) -> ImageProcessor:
    """The checkpoint's image preprocessing: its config's `vision` section (mode, size, mean/std, filter)."""
    return ImageProcessor.from_config(cfg.vision)


def _tagged(prompt: str, cfg, has_image: bool) -> str:
    """`prompt` with the `<image>` tag in front when an image is given and the prompt has none."""
    if has_image and not cfg.vision.enabled:
        raise ValueError("the checkpoint has no vision tower (vision.enabled=false): drop --image")
    if has_image and IMAGE_TAG not in prompt:
        prompt = f"{IMAGE_TAG}\n{prompt}"
    if not has_image and IMAGE_TAG in prompt:
        raise ValueError(f"the prompt holds an {IMAGE_TAG} tag but no image was given")
    return prompt


def prompt_ids(prompt: str, tokenizer, cfg, has_image: bool, stage_idx: int = -1) -> List[int]:
    """Token ids of the prompt in stage `stage_idx`'s template (a checkpoint's `state["stage_idx"]`: the
    template it was trained with); the `<image>` tag is added in front when an image is given."""
    n_img = cfg.vision.num_image_tokens if cfg.vision.enabled else 0
    return render_prompt(_tagged(prompt, cfg, has_image), tokenizer, n_img, stage_template(cfg, stage_idx, tokenizer))


def prompt_text(prompt: str, tokenizer, cfg, has_image: bool, stage_idx: int = -1) -> str:
    """The same prompt as text, `<image>` tag kept: what an exported LLaVA's HF processor is given
    to produce `prompt_ids`' ids."""
    return question_text(_tagged(prompt, cfg, has_image), stage_template(cfg, stage_idx, tokenizer))


# =============================================================================== decoding

def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _decode_group(model, tokenizer, batch: torch.Tensor, images, max_new_tokens: int, temperature: float,
                  top_p: float, generator, stop: Sequence[str], step=None) -> List[str]:
    """batch: [B, P] prompts of one length -> B answers (generation.decode, cut before a stop string)."""
    text = lambda row: tokenizer.decode(row, skip_special_tokens=True)  # noqa: E731
    ends = (lambda row: _cut_at_stop(text(row), stop)[1]) if stop else None
    choose = lambda logits: pick_next(logits, temperature, top_p, generator)  # noqa: E731
    rows = decode(model, batch, images, max_new_tokens, tokenizer.eos_id, choose, ends=ends, step=step)
    return [_cut_at_stop(text(row), stop)[0].strip() for row in rows]


def generate_texts(model, tokenizer, prompts: Sequence[Sequence[int]], images: Optional[torch.Tensor] = None, *,
                   max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   stop: Sequence[str] = (), generator: Optional[torch.Generator] = None,
                   step=None) -> List[str]:
    """Answers to templated prompts (lists of ids); image i (of `images` [N, 3, H, W]) belongs to prompt i.

    Prompts are batched by length (no attention padding needed); each answer stops at EOS,
    `max_new_tokens`, or before the first stop string. `step`: the decoding step function
    (`generation.decode`; a pipeline stage's: `parallel.pipeline_generation.decode_step_for`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:  # nan compares False
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    limit = model.llm.cfg.max_seq_len
    groups: dict = {}
    for i, p in enumerate(prompts):
        if len(p) >= limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens; model.max_seq_len={limit} leaves no room to answer")
        groups.setdefault(len(p), []).append(i)
    answers: List[str] = [""] * len(prompts)
    dtype = next(model.parameters()).dtype
    for length, idx in groups.items():
        batch = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
        imgs = images[idx].to(device=device, dtype=dtype) if images is not None else None
        steps = min(max_new_tokens, limit - length)
        for i, text in zip(idx, _decode_group(model, tokenizer, batch, imgs, steps, temperature, top_p,
                                              generator, stop, step)):
            answers[i] = text
    return answers


# =============================================================================== CLI

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megatron_evomoe.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", action="append", required=True, help="question; repeat for a batch")
    p.add_argument("--image", action="append", default=[], help="image file: one for all prompts or one each")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--temperature", type=finite_float(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    p.add_argument("--seed", type=int_at_least(0, 2 ** 64), default=0, help="seed of the sampling generator")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not part of the answer")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--data-root", default=None, help="folder with the tokenizer/ (if the run's data moved)")
    p.add_argument("--json", action="store_true", help='print one {"prompt", "image", "answer"} JSON per line')
    return p


def run(args) -> List[str]:
    from .training.trainer import resolve_device
    n, images = len(args.prompt), args.image
    if images and len(images) not in (1, n):
        raise ValueError(f"got {len(images)} --image for {n} --prompt: give one image, or one per prompt")
    device = resolve_device(args.device)
    model, cfg, bundle, state = load_for_inference(args.ckpt, device=str(device), data_root=args.data_root,
                                                   dtype=args.dtype)
    tok = bundle.tokenizer
    per_prompt = (images * n if len(images) == 1 else images) if images else [None] * n
    ids = [prompt_ids(p, tok, cfg, img is not None, state["stage_idx"]) for p, img in zip(args.prompt, per_prompt)]
    pixels = None
    if images:
        proc = image_processor_for(cfg)
        pixels = torch.stack([proc(path) for path in per_prompt])
    answers = generate_texts(model, tok, ids, pixels, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    for prompt, img, ans in zip(args.prompt, per_prompt, answers):
        print(json.dumps({"prompt": prompt, "image": img, "answer": ans}) if args.json else ans)
    return answers


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:  # a bad checkpoint, image or prompt (ConfigError and DataError are ValueErrors)
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

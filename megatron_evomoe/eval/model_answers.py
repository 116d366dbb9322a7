"""A trained model as the ``answer_fn(image_path, prompt) -> str`` of the benchmark runners.

    python -m megatron_evomoe.eval.model_answers --ckpt RUN --benchmark pope --data FILE \\
        --images DIR --out DIR [--limit N] [--max-new-tokens N] [--prompt-suffix STR]
        [--no-circular] [--device auto|cpu|cuda] [--data-root DIR]

writes ``DIR/<benchmark>.json`` (metrics + per-question answers) and prints the metrics
table (see `eval.runner.run_benchmark`). Answers are greedy by default, decoded with the
generation CLI's code (`megatron_evomoe.generate`): same template, image processing and
KV-cache decoding as ``python -m megatron_evomoe.generate``.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
from ..generate import generate_texts, image_processor_for, load_for_inference, prompt_ids
from .runner import (BENCHMARKS, add_benchmark_flags, benchmark_options, finish_submission, run_benchmark,
                     start_submission)


def make_answer_fn(model, cfg, bundle, max_new_tokens: int = 16, *, temperature: float = 0.0, seed: int = 0,
                   stop: Sequence[str] = (), state: Optional[dict] = None) -> Callable[[Optional[str], str], str]:
    """``answer_fn(image_path or None, prompt) -> answer`` for `eval.runner.run_benchmark`.

    Images are preprocessed as the checkpoint's `vision` section says; `state` (the checkpoint dict)
    gives the stage whose conversation template the prompts use (without it: the last stage's).
    """
    processor = image_processor_for(cfg) if cfg.vision.enabled else None
    tokenizer = bundle.tokenizer
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    dtype = next(model.parameters()).dtype

    def answer_fn(image_path: Optional[str], prompt: str) -> str:
        ids = prompt_ids(prompt, tokenizer, cfg, image_path is not None, (state or {}).get("stage_idx", -1))
        pixels = None
        if image_path is not None:
            pixels = processor(image_path).unsqueeze(0).to(dtype)
        return generate_texts(model, tokenizer, [ids], pixels, max_new_tokens=max_new_tokens,
                              temperature=temperature, stop=stop, generator=generator)[0]

    return answer_fn


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megatron_evomoe.eval.model_answers", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--data", required=True, help="question file (POPE jsonl, MMBench tsv, TextVQA json) or MME root")
    p.add_argument("--images", default=None, help="image folder (MMBench: where to decode)")
    p.add_argument("--out", required=True, help="output folder for <benchmark>.json")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N questions (N >= 1)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=16)
    p.add_argument("--prompt-suffix", default=None, help="appended to every question")
    add_benchmark_flags(p)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data-root", default=None, help="folder with the tokenizer/ (if the run's data moved)")
    return p


def main(argv=None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = benchmark_options(parser, args)
    from ..training.trainer import resolve_device
    try:
        device = resolve_device(args.device)
        submission = start_submission(args)  # (the [eval] extra checked before the model answers)
        model, cfg, bundle, state = load_for_inference(args.ckpt, device=str(device), data_root=args.data_root)
        answer_fn = make_answer_fn(model, cfg, bundle, args.max_new_tokens, state=state)
        if args.prompt_suffix is not None:
            options["prompt_suffix"] = args.prompt_suffix
        result = run_benchmark(args.benchmark, args.data, args.images, answer_fn, args.out, limit=args.limit,
                               **options)
        return finish_submission(result, submission)
    except USER_ERRORS as e:  # a bad checkpoint, question file or image folder
        raise SystemExit(user_error(e)) from None


if __name__ == "__main__":
    main()

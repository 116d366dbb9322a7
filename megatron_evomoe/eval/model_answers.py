"""A trained model as the ``answer_fn(image_path, prompt) -> str`` of the benchmark runners.

    python -m megatron_evomoe.eval.model_answers --ckpt RUN --benchmark pope --data FILE \\
        --images DIR --out DIR [--limit N] [--max-new-tokens N] [--prompt-suffix STR]
        [--no-circular] [--device auto|cpu|cuda] [--data-root DIR]
    torchrun --nproc-per-node N -m megatron_evomoe.eval.model_answers ... --pp P [--tp T]

writes ``DIR/<benchmark>.json`` (metrics + per-question answers) and prints the metrics
table (see `eval.runner.run_benchmark`). Answers are greedy by default, decoded with the
generation CLI's code (`megatron_evomoe.generate`): same template, image processing and
KV-cache decoding as ``python -m megatron_evomoe.generate``.

Under torchrun the model is split into `--pp` pipeline stages of `--tp` tensor-parallel ranks (the
remaining factor of the world size replicates it); every rank decodes in step
(`parallel.pipeline_generation`) and the main rank writes the files: the same answers as one process.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
from ..generate import generate_texts, image_processor_for, load_for_inference, prompt_ids
from ..parallel.apply_layout import parallelize
from ..parallel.launch import init_distributed, launch_info, shutdown_distributed
from ..parallel.pipeline_generation import decode_step_for
from ..parallel.state import ParallelState
from .runner import (BENCHMARKS, add_benchmark_flags, benchmark_options, finish_submission, run_benchmark,
                     start_submission)


def make_answer_fn(model, cfg, bundle, max_new_tokens: int = 16, *, temperature: float = 0.0, seed: int = 0,
                   stop: Sequence[str] = (), state: Optional[dict] = None,
                   step=None) -> Callable[[Optional[str], str], str]:
    """``answer_fn(image_path or None, prompt) -> answer`` for `eval.runner.run_benchmark`.

    Images are preprocessed as the checkpoint's `vision` section says; `state` (the checkpoint dict)
    gives the stage whose conversation template the prompts use (without it: the last stage's);
    `step`: the decoding step of this rank (`parallel.pipeline_generation.decode_step_for`).
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
                              temperature=temperature, stop=stop, generator=generator, step=step)[0]

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
    p.add_argument("--pp", type=int_at_least(1), default=1, help="pipeline stages (under torchrun)")
    p.add_argument("--tp", type=int_at_least(1), default=1, help="tensor-parallel ranks per stage (under torchrun)")
    return p


def parallel_inference(model, cfg, tp: int, pp: int) -> ParallelState:
    """Split the loaded single-process `model` (on the CPU) over this torchrun job: `pp` stages of
    `tp` ranks, replicated over the rest of the world. Collective: every rank calls it."""
    world = launch_info().world_size
    if world % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} ranks per model does not divide the {world} process(es) "
                         "of this job (launch it with torchrun --nproc-per-node=<a multiple of tp x pp>)")
    p = cfg.parallel
    p.tp, p.pp, p.ep, p.sequence_parallel = tp, pp, 1, False  # the layout of this job, not of training
    cfg.train.compile = False  # decode as one process does
    state = init_distributed(cfg)  # (ConfigError naming parallel.tp / parallel.pp if it does not fit)
    if state.world_size > 1:
        parallelize(model, state, cfg)
    return state


def main(argv=None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = benchmark_options(parser, args)
    from ..training.trainer import resolve_device
    joined = dist.is_initialized()  # (a caller's process group is the caller's to close)
    try:
        submission = start_submission(args)  # (the [eval] extra checked before the model answers)
        # loaded on the CPU: the parallel layout (which picks this rank's GPU) splits it first
        model, cfg, bundle, state = load_for_inference(args.ckpt, device="cpu", data_root=args.data_root)
        par = parallel_inference(model, cfg, args.tp, args.pp)
        model = model.to(resolve_device(args.device))
        answer_fn = make_answer_fn(model, cfg, bundle, args.max_new_tokens, state=state, step=decode_step_for(par))
        if args.prompt_suffix is not None:
            options["prompt_suffix"] = args.prompt_suffix
        main_rank = par.rank == 0
        # the other ranks decode in step; MMBench images go to their own temporary folder (no shared writes)
        images = args.images if main_rank or args.benchmark != "mmbench" else None
        result = run_benchmark(args.benchmark, args.data, images, answer_fn, args.out, limit=args.limit,
                               write=main_rank, **options)
        return finish_submission(result, submission) if main_rank else result
    except USER_ERRORS as e:  # a bad checkpoint, question file or image folder
        raise SystemExit(user_error(e)) from None
    finally:
        if not joined and dist.is_initialized():
            shutdown_distributed()


if __name__ == "__main__":
    main()

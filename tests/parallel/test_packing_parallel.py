"""A packed micro-batch (rows of several samples, tests/model/test_packing.py) under PP=2 and under
TP=2 with sequence parallelism gives the single process's LM loss, aux loss and gradient norm:
positions and segment ids reach every pipeline stage, and the attention mask and RoPE positions
stay whole-sequence under SP. One spawn of two gloo processes runs both layouts."""
from __future__ import annotations

import torch

from megatron_evomoe.parallel import ParallelState, forward_backward_1f1b, global_grad_norm, parallelize

from ..model.test_packing import make_samples, packed_batch
from . import common as C
from .dist_utils import run_distributed

LAYOUTS = {"pp2": dict(pp=2), "tp2_sp": dict(tp=2, sp=True)}


def _step(model, state, batch) -> dict:
    """One forward/backward of the packed micro-batch, as the trainer does it (loss / token count
    + aux); -> the LM and aux losses and the global gradient norm."""
    num_tokens = int((batch["labels"][:, 1:] != C.IGNORE_INDEX).sum())
    if state.pp_size > 1:
        tot = forward_backward_1f1b(model, state, [batch], num_tokens)
        lm, aux = tot["lm_loss"], tot["aux_loss"]
    else:
        out = model(batch["input_ids"], batch["images"], batch["labels"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"])
        (out.lm_loss_sum / num_tokens + out.aux_loss).backward()
        lm, aux = float(out.lm_loss_sum.detach()) / num_tokens, float(out.aux_loss.detach())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {"lm": lm, "aux": aux, "norm": float(global_grad_norm(model, params, state))}


def _worker(rank, world_size):
    batch = packed_batch(make_samples())[1]
    results = {}
    for name, kw in LAYOUTS.items():
        cfg = C.tiny_cfg(**kw)
        state = ParallelState.build(cfg, rank, world_size)
        results[name] = _step(parallelize(C.build_model(cfg), state, cfg), state, batch)
    return results


def test_packed_batch_matches_single_process_under_pp2_and_tp2_sp():
    cfg = C.tiny_cfg()
    ref = _step(C.build_model(cfg), ParallelState.single(cfg), packed_batch(make_samples())[1])
    assert ref["lm"] > 0 and ref["aux"] > 0
    per_rank = run_distributed(_worker, 2, timeout=300)
    for rank, res in enumerate(per_rank):
        for name in LAYOUTS:
            for key, want in ref.items():
                assert abs(res[name][key] - want) <= 1e-5 * abs(want), (name, rank, key, res[name][key], want)

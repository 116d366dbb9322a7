"""Router-shuffle test: send each token to random experts, keeping its gate values.

If experts are interchangeable (copy-upcycled MoE-LLaVA), scores barely move;
diverse experts (EvoMoE) should lose accuracy. Only the expert choice changes:
gates, weights and everything else stay as they are.
"""
from __future__ import annotations

import contextlib

import torch

from ..ops.permute import expert_counts
from .router import Router, RoutingOutput


def shuffle_routing(out: RoutingOutput, generator: torch.Generator) -> RoutingOutput:
    T, E = out.probs.shape
    perm = torch.argsort(torch.rand(T, E, generator=generator), dim=-1).to(out.topk_idx.device)  # [T, E]
    idx = perm.gather(1, out.topk_idx)  # a per-token relabelling of the experts keeps the k choices distinct
    counts = expert_counts(idx, E)
    return RoutingOutput(out.logits, out.probs, idx, out.gates, counts, out.aux_loss, out.z_loss)


@contextlib.contextmanager
def shuffled_routers(model: torch.nn.Module, seed: int = 0):
    """Within the block, every Router of `model` returns shuffled expert choices."""
    gen = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_hook(lambda mod, args, out: shuffle_routing(out, gen))
               for m in model.modules() if isinstance(m, Router)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

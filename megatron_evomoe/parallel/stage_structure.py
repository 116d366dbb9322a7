"""Stage structure changes (dense -> evolve -> sparse) on a parallelized model.

The FFNs of the MoE-designated layers are gathered back to full plain modules, the plain
conversion (`stages.structure.apply_stage_structure`) runs on them exactly as in a single process
(same generator draws, same global RNG draws, also for the layers of other pipeline stages, which
are converted as throwaway shadows), and the result is parallelized again. New replicated
parameters (routers) are then broadcast within the pipeline stage so every rank holds the same values.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config import moe_layer_indices
from ..moe.evolution import EvolvingFFN
from ..stages.structure import apply_stage_structure as apply_plain_structure
from .apply_layout import parallelize
from .pipeline import pipeline_shadows
from .sharded_state import gather_module_state
from .state import REPLICATED, ParallelState, named_shard_specs
from .tensor_parallel_plan import is_tp_sharded_ffn


def apply_stage_structure(model, cfg, stage, generator: torch.Generator, state: ParallelState) -> None:
    """`stages.structure.apply_stage_structure` for a parallelized model (collective over the stage)."""
    # the old parameters are kept alive until the broadcast: a freed one's id could be reused by a new
    # tensor, which would then be skipped on this rank only (and the ranks' broadcasts would mismatch)
    old_params = list(model.parameters())
    before = {id(p) for p in old_params}
    for i in moe_layer_indices(cfg):
        layer = model.llm.layers[i]
        if is_tp_sharded_ffn(getattr(layer, "mlp", None)):
            layer.mlp = unshard_ffn(layer.mlp, state)
    with pipeline_shadows(model, cfg):
        apply_plain_structure(model, cfg, stage, generator)
    parallelize(model, state, cfg)
    _broadcast_new_replicated(model, state, before)
    del old_params


def unshard_ffn(mlp: nn.Module, state: ParallelState) -> nn.Module:
    """A TP-sharded FFN / EvolvingFFN -> the full plain module (collective over TP)."""
    full = gather_module_state(mlp, state)
    w_up = full["w_up.weight"]  # [F, C]
    cls, options = type(mlp), dict(activation=mlp.activation, bias="w_up.bias" in full)
    with torch.device("meta"):  # no init draws from the global RNG: the weights come from `full`
        plain = cls(w_up.shape[1], w_up.shape[0], mlp.num_evolved, **options) if issubclass(cls, EvolvingFFN) \
            else cls(w_up.shape[1], w_up.shape[0], **options)
    plain = plain.to_empty(device=w_up.device).to(w_up.dtype)
    plain.load_state_dict(full)
    for name, p in plain.named_parameters():
        p.requires_grad_(mlp.get_parameter(name).requires_grad)
    return plain


@torch.no_grad()
def _broadcast_new_replicated(model: nn.Module, state: ParallelState, before: set) -> None:
    group = state.stage_group
    if group is None:
        return
    specs = named_shard_specs(model)
    src = state.group_ranks["stage"][0]
    for name, p in model.named_parameters():
        spec = specs.get(name, REPLICATED)
        if id(p) not in before and spec.tp_dim is None and not spec.expert:
            dist.broadcast(p.data, src=src, group=group)

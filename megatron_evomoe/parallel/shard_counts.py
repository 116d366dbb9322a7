"""The elements one rank of a layout holds in one training stage, counted on the meta device.

The real model of the stage (`build_model(..., up_to_stage)`) is built on the meta device and
`parallelize`d with a ParallelState of the layout that has no process groups: on a meta model every
step only reshapes, so the shapes are exactly this rank's shards. Expert parallelism is the one step
that needs its group (the all-to-all dispatcher asks its size), so the state has ep = 1 and the expert
tensors' expert dim (`ShardSpec.expert`, dim 0) is divided by ep here, as `apply_ep` slices it.
The memory plan (stages/memory_plan.py) turns the counts into bytes.
"""
from __future__ import annotations

import copy

import torch

from ..model.absent import is_absent
from ..moe.evolution import EvolvingFFN
from ..moe.moe_layer import MoELayer
from ..stages.memory_plan import ShardCounts
from ..stages.structure import build_model
from ..stages.trainable import set_trainable
from .apply_layout import parallelize
from .state import GROUP_KINDS, REPLICATED, ParallelState, RankLayout, named_shard_specs


def layout_state(cfg, world_size: int, pp_rank: int) -> ParallelState:
    """The state of the rank (pp_rank, dp 0, tp 0) of the layout, without process groups (ep = 1)."""
    layout = RankLayout(world_size, cfg.parallel.tp, cfg.parallel.pp, 1)
    state = ParallelState(layout, layout.rank_of(pp_rank, 0, 0),
                          sequence_parallel=bool(cfg.parallel.sequence_parallel and cfg.parallel.tp > 1))
    for kind in GROUP_KINDS:
        state.groups[kind], state.group_ranks[kind] = None, [state.rank]
    return state


def part_of(name: str) -> str:
    """A parameter's part, as ShardCounts.trains names them: 'llm.layers.3.mlp.router.w1' -> 'layers.3.router'."""
    parts = name.split(".")
    if parts[0] in ("vision", "projector"):
        return parts[0]
    if parts[1] != "layers":
        return parts[1]  # embed, norm, lm_head
    block = parts[3]
    if block == "mlp" and len(parts) > 4 and parts[4] == "router":
        block = "router"
    return f"layers.{parts[2]}.{block}"


_TRAINED: dict[tuple[str, int], frozenset] = {}  # (config, stage) -> names: one unsplit build per stage


def trained_names(cfg, stage_idx: int) -> frozenset:
    """The names of the parameters that train in the stage, over the whole (unsplit) model (names keep
    their global layer index on every pipeline stage); set_trainable's ConfigError for a pattern that
    matches nothing."""
    key = (repr(cfg.to_dict()), stage_idx)
    if key not in _TRAINED:
        with torch.device("meta"):
            model = build_model(copy.deepcopy(cfg), 0, stage_idx)
        _TRAINED[key] = frozenset(set_trainable(model, cfg, cfg.stages[stage_idx], stage_idx))
    return _TRAINED[key]


def rank_shard_counts(cfg, world_size: int, stage_idx: int, pp_rank: int) -> ShardCounts:
    """This rank's elements in training stage `stage_idx` (parameters, trainable, evolved copies)."""
    state = layout_state(cfg, world_size, pp_rank)
    names = trained_names(cfg, stage_idx)
    with torch.device("meta"):
        model = build_model(copy.deepcopy(cfg), 0, stage_idx)
    parallelize(model, state, cfg)
    specs = named_shard_specs(model)
    ep = cfg.parallel.ep
    num_params = num_dense = num_expert = num_evolved = 0
    matrices: dict[str, int] = {}
    for name, p in model.named_parameters():
        expert = specs.get(name, REPLICATED).expert
        n = p.numel() // ep if expert else p.numel()  # apply_ep keeps E/ep experts
        num_params += n
        if name in names:
            num_expert, num_dense = num_expert + n * expert, num_dense + n * (not expert)
        if p.dim() >= 2 and not name.startswith("llm.embed"):  # autocast casts these (not the embedding)
            matrices[part_of(name)] = matrices.get(part_of(name), 0) + n
    for name, b in model.named_buffers():
        if name.rpartition(".")[2].startswith("evolved_"):
            num_evolved += b.numel()
        else:
            num_params += b.numel()
    layers = tuple((i, _kind(layer.mlp)) for i, layer in enumerate(model.llm.layers) if not is_absent(layer))
    return ShardCounts(pp_rank=pp_rank, num_params=num_params, num_trainable_dense=num_dense,
                       num_trainable_expert=num_expert, num_evolved=num_evolved, layers=layers,
                       has_first=state.is_first_stage, has_last=state.is_last_stage,
                       trains=frozenset(part_of(n) for n in names),
                       matrices=matrices)


def _kind(mlp) -> str:
    if isinstance(mlp, MoELayer):
        return "sparse"
    return "evolve" if isinstance(mlp, EvolvingFFN) else "dense"

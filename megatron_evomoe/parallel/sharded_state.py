"""Full (unsharded) state dicts of a parallelized model, and loading one into any layout.

`full_state_dict` gathers every rank's TP/EP shards and the pipeline stages into the single-process
state dict (keys and shapes of the plain model); `load_full_state_dict` is its inverse: each rank
keeps its own shard of every tensor (the resharding path).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..checkpointing import CheckpointError
from .state import REPLICATED, ParallelState, ShardSpec, named_shard_specs
from .tensor_parallel import take_shard


def _gather_tensor(t: torch.Tensor, spec: ShardSpec, state: ParallelState) -> torch.Tensor:
    if spec.tp_dim is not None and state.tp_group is not None:
        parts = [torch.empty_like(t) for _ in range(state.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=state.tp_group)
        t = torch.cat(parts, dim=spec.tp_dim).narrow(spec.tp_dim, 0, spec.full_size)
    if spec.ep_dim is not None and state.ep_group is not None:
        parts = [torch.empty_like(t) for _ in range(state.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=state.ep_group)
        t = torch.cat(parts, dim=spec.ep_dim)
    return t


def gather_module_state(module: nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """The full state dict of one module (collective over the TP and EP groups)."""
    specs = named_shard_specs(module)
    return {k: _gather_tensor(v.detach(), specs.get(k, REPLICATED), state) for k, v in module.state_dict().items()}


def full_state_dict(model: nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """The single-process state dict of the whole model, on every rank (collective: all ranks).

    Gathers TP shards (trimming vocabulary padding) and EP shards, then merges the pipeline
    stages. Keys and shapes are those of the plain model.
    """
    out = {k: v.cpu().clone() for k, v in gather_module_state(model, state).items()}  # (CPU: pickled below)
    if state.pp_group is not None:
        parts = [None] * state.pp_size
        dist.all_gather_object(parts, out, group=state.pp_group)
        out = {}
        for part in parts:
            out.update(part)
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], state: ParallelState,
                         strict: bool = True) -> None:
    """Load a single-process state dict into a parallelized model: each rank takes its shard
    (the resharding path: any layout can load what any other layout saved, once consolidated)."""
    specs = named_shard_specs(model)
    local = model.state_dict()
    missing = [k for k in local if k not in full]
    if strict and missing:
        raise CheckpointError(f"load_full_state_dict: {len(missing)} tensors missing from the checkpoint, "
                              f"e.g. {missing[0]!r}")
    for k, dst in local.items():
        if k not in full:
            continue
        src, spec = full[k], specs.get(k, REPLICATED)
        if spec.ep_dim is not None:
            n = dst.shape[spec.ep_dim]
            src = src.narrow(spec.ep_dim, state.ep_rank * n, n)
        if spec.tp_dim is not None:
            src = take_shard(src, spec.tp_dim, state.tp_size, state.tp_rank)
        if src.shape != dst.shape:
            raise CheckpointError(f"load_full_state_dict: {k}: checkpoint shard {tuple(src.shape)} does not fit "
                                  f"the model's {tuple(dst.shape)}")
        dst.copy_(src)


def local_parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters this rank holds, by kind (for logs and sharding tests)."""
    specs = named_shard_specs(model)
    out = {"total": 0, "tp_sharded": 0, "expert": 0, "replicated": 0}
    for name, p in model.named_parameters():
        s = specs.get(name, REPLICATED)
        out["total"] += p.numel()
        out["expert" if s.expert else "tp_sharded" if s.tp_dim is not None else "replicated"] += p.numel()
    return out

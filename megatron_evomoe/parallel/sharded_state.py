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
from .sharded_construction import shard_box


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
def load_full_state_dict(model: nn.Module, full, state: ParallelState, strict: bool = True) -> None:
    """Load a single-process state dict into a parallelized model: each rank copies only its own
    box of every tensor (the resharding path: any layout loads what one process saved).

    full: name -> tensor (a memory-mapped `torch.load(..., mmap=True)` reads only the pages of the
    slices taken) or -> a lazy safetensors tensor (checkpointing.safetensors_tensors: only the box is read)."""
    specs = named_shard_specs(model)
    local = model.state_dict()
    missing = [k for k in local if k not in full]
    if strict and missing:
        raise CheckpointError(f"load_full_state_dict: {len(missing)} tensors missing from the checkpoint, "
                              f"e.g. {missing[0]!r}")
    for k, dst in local.items():
        if k not in full:
            continue
        src = full[k]
        want, starts = shard_box(specs.get(k, REPLICATED), tuple(dst.shape), state)
        shape = tuple(src.shape)
        if shape != want:
            raise CheckpointError(f"load_full_state_dict: {k}: checkpoint tensor {shape} does not fit the "
                                  f"model's {want} (this rank's shard {tuple(dst.shape)})")
        copy_box(dst, src, starts)


def copy_box(dst: torch.Tensor, src, starts: tuple[int, ...]) -> None:
    """dst[i] = src[starts + i]; the part of dst past src's end (vocabulary padding) is zero."""
    shape = tuple(src.shape)
    ends = [min(s + n, f) for s, n, f in zip(starts, dst.shape, shape)]
    box = tuple(slice(s, max(e, s)) for s, e in zip(starts, ends))
    inside = dst[tuple(slice(0, b.stop - b.start) for b in box)]
    if inside.shape != dst.shape:
        dst.zero_()
    if inside.numel():
        inside.copy_(src[box] if dst.dim() else src[()])  # a view of a (mapped) tensor, or read from the file


def local_parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters this rank holds, by kind (for logs and sharding tests)."""
    specs = named_shard_specs(model)
    out = {"total": 0, "tp_sharded": 0, "expert": 0, "replicated": 0}
    for name, p in model.named_parameters():
        s = specs.get(name, REPLICATED)
        out["total"] += p.numel()
        out["expert" if s.expert else "tp_sharded" if s.tp_dim is not None else "replicated"] += p.numel()
    return out

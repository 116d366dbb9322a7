"""Sharded construction: each rank gives storage and initial values to its own shards only.

    with torch.device("meta"):
        model = build_model(cfg, image_token_id)       # shapes only, no memory
    parallelize(model, state, cfg)                     # the shards, still on the meta device
    materialise_shards(model, state, cfg, device, seed)

A tensor's values are defined over the full tensor (model/init.py: seed, global name, full shape),
so the shard a rank materialises holds exactly the elements that the one-process model holds there,
for every layout; the one-process run takes this same path with a layout of size 1. A rank's peak
is its shards plus one drawn chunk, never the whole model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.init import fill_box, init_rules
from .state import REPLICATED, ParallelState, ShardSpec, named_shard_specs
from .tensor_parallel import shard_range


def shard_box(spec: ShardSpec, local_shape: tuple[int, ...], state: ParallelState
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(full shape, start of this rank's shard in it, per dim) of a tensor with `spec` and this
    local shape. The TP dim's full length is `spec.full_size` (the shard may reach past it: padding)."""
    full, starts = list(local_shape), [0] * len(local_shape)
    if spec.ep_dim is not None:  # EP keeps experts [ep_rank*El, (ep_rank+1)*El)
        full[spec.ep_dim] = local_shape[spec.ep_dim] * state.ep_size
        starts[spec.ep_dim] = local_shape[spec.ep_dim] * state.ep_rank
    if spec.tp_dim is not None:
        full[spec.tp_dim] = spec.full_size
        starts[spec.tp_dim] = shard_range(spec.full_size, state.tp_size, state.tp_rank)[0]
    return tuple(full), tuple(starts)


def full_shapes(model: nn.Module, state: ParallelState) -> dict[str, tuple[int, ...]]:
    """Name -> the full (one-process) shape of every tensor of this rank's state dict."""
    specs = named_shard_specs(model)
    return {k: shard_box(specs.get(k, REPLICATED), tuple(v.shape), state)[0] for k, v in model.state_dict().items()}


@torch.no_grad()
def materialise_shards(model: nn.Module, state: ParallelState, cfg, device, seed: int) -> nn.Module:
    """Replace every meta parameter and buffer of `model` by real storage on `device`, initialised
    with this rank's box of the full tensor's values; tied parameters stay tied. Modules with
    computed buffers (the rotary tables) fill them in `init_buffers()`."""
    rules = init_rules(model, cfg)
    specs = named_shard_specs(model)
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta) -> (meta, real): tied weights
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for local, p in mod._parameters.items():
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                name = prefix + local
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                full, starts = shard_box(specs.get(name, REPLICATED), tuple(p.shape), state)
                fill_box(t, rules[name], seed, name, full, starts)
                done[id(p)] = (p, nn.Parameter(t, requires_grad=p.requires_grad))  # (p kept: ids stay unique)
            mod._parameters[local] = done[id(p)][1]
        meta_buffers = [k for k, b in mod._buffers.items() if b is not None and b.is_meta]
        for local in meta_buffers:
            b = mod._buffers[local]
            mod._buffers[local] = torch.empty(b.shape, dtype=b.dtype, device=device)
        if meta_buffers:
            assert hasattr(mod, "init_buffers"), f"{mod_name}: buffers {meta_buffers} have no init_buffers()"
            mod.init_buffers()
    return model

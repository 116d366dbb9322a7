"""How the E experts of a new MoE layer are made from the dense FFN (`moe.init`).

- ``evolution``: FFN1 and its evolved copies from stage II (EvoMoE; see evolution.py)
- ``copy``: E identical copies (MoE-LLaVA's sparse upcycling)
- ``noise``: copies plus Gaussian noise of std `noise_std` relative to each weight's std
- ``drop``: drop-upcycling: per expert, re-initialise a random fraction r of the
  intermediate units (rows of w_gate/w_up and entries of b_gate/b_up, columns of w_down) from
  N(mean, std) of the entries they replace; b_down has no intermediate unit and stays
- ``scratch``: fresh random experts (weights N(0, init_std), biases zero, as a fresh dense FFN)
Tensors here are nn.Linear layout ([out, in] weights, [out] biases), one dict per expert, keyed as
the experts' tensors (experts.py::expert_keys): the experts have the FFN's activation (SwiGLU or
Phi's GELU) and, with model.mlp_bias, its biases.
With ``moe.shared_expert_size > 0`` the layer also gets a shared expert (shared_expert.py),
fresh, with its output projection at zero so the new layer starts as the routed experts alone.
"""
from __future__ import annotations

import torch

from .dtr import DynamicTokenRouter
from .evolution import EvolvingFFN
from .experts import GroupedExperts, dense_tensors, intermediate_dim
from .load_balancing import uses_aux_loss, uses_bias
from .moe_layer import MoELayer
from .router import PerModalityLinearRouter, Router, TopKRouter
from .shared_expert import SharedExpert


def dense_weights(ffn) -> dict[str, torch.Tensor]:
    return {k: t.detach() for k, t in dense_tensors(ffn).items()}


def copy_experts(ffn, num_experts: int) -> list[dict]:
    w = dense_weights(ffn)
    return [{k: v.clone() for k, v in w.items()} for _ in range(num_experts)]


def noise_experts(ffn, num_experts: int, noise_std: float, generator: torch.Generator) -> list[dict]:
    experts = copy_experts(ffn, num_experts)
    for ex in experts:
        for k, v in ex.items():
            noise = torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v)
            ex[k] = v + noise_std * v.float().std().to(v) * noise
    return experts


def drop_experts(ffn, num_experts: int, ratio: float, generator: torch.Generator) -> list[dict]:
    """Drop-upcycling: each expert re-draws its own random subset of intermediate units."""
    experts = copy_experts(ffn, num_experts)
    ffn_hidden = experts[0]["w_up"].shape[0]
    num_drop = int(round(ratio * ffn_hidden))
    for ex in experts:
        units = torch.randperm(ffn_hidden, generator=generator)[:num_drop]
        for k, v in ex.items():
            dim = intermediate_dim(k, stacked=False)
            if dim is None:  # b_down: one entry per output channel, none per intermediate unit
                continue
            rows = v.index_select(dim, units)  # the replaced entries
            mean, std = rows.float().mean(), rows.float().std() if rows.numel() > 1 else torch.tensor(0.0)
            fresh = (torch.randn(rows.shape, generator=generator) * std + mean).to(v)
            v.index_copy_(dim, units, fresh)
    return experts


def scratch_experts(ffn, num_experts: int, init_std: float, generator: torch.Generator) -> list[dict]:
    w = dense_weights(ffn)
    return [{k: (torch.randn(v.shape, generator=generator) * init_std).to(v) if k.startswith("w_")
             else torch.zeros_like(v) for k, v in w.items()} for _ in range(num_experts)]


def make_experts(ffn, moe_cfg, init_std: float, generator: torch.Generator) -> list[dict]:
    """Expert weights for one layer, by `moe.init`."""
    init, E = moe_cfg.init, moe_cfg.num_experts
    if init == "evolution":
        if not isinstance(ffn, EvolvingFFN):
            raise ValueError("moe.init=evolution: the layer has no evolved experts; add an "
                             "'evolve' stage (moe_mode: evolve) before the first sparse stage")
        return ffn.expert_weights()
    if init == "copy":
        return copy_experts(ffn, E)
    if init == "noise":
        return noise_experts(ffn, E, moe_cfg.noise_std, generator)
    if init == "drop":
        return drop_experts(ffn, E, moe_cfg.drop_ratio, generator)
    if init == "scratch":
        return scratch_experts(ffn, E, init_std, generator)
    raise AssertionError(f"moe.init {init!r} has no expert initialisation (MoEConfig.init lists the choices)")


def upcycle_to_moe(ffn, cfg, generator: torch.Generator):
    """Dense (or evolving) FFN -> MoELayer with experts by `moe.init` and a fresh router.

    This is the 'split' of the evolution scheduler at the stage II -> III
    boundary when moe.init=evolution, and the baselines' upcycling otherwise.
    """
    w = ffn.w_up.weight
    hidden, ffn_hidden = w.shape[1], w.shape[0]
    experts = GroupedExperts(cfg.moe.num_experts, hidden, ffn_hidden, backend=cfg.moe.expert_backend,
                             activation=ffn.activation, bias=ffn.w_up.bias is not None)
    experts.load_from_ffns(make_experts(ffn, cfg.moe, cfg.model.init_std, generator))
    router = build_router(cfg.router, cfg.moe, hidden)
    shared = None
    if cfg.moe.shared_expert_size > 0:  # drawn after the experts: configs without one draw as before
        with torch.device("meta"):  # built without touching the global RNG; values from `generator`
            shared = SharedExpert(hidden, cfg.moe.shared_expert_size)
        shared = shared.to_empty(device=w.device).init_for_upcycling(cfg.model.init_std, generator)
    if uses_bias(cfg.moe.load_balancing):
        router.enable_expert_bias(cfg.moe.bias_update_rate)
    aux = cfg.moe.aux_loss_coeff if uses_aux_loss(cfg.moe.load_balancing) else 0.0
    layer = MoELayer(router, experts, aux_loss_coeff=aux, z_loss_coeff=cfg.moe.z_loss_coeff, shared_expert=shared)
    return layer.to(device=w.device, dtype=w.dtype)


def build_router(router_cfg, moe_cfg, hidden: int) -> Router:
    """The fresh router of a new MoE layer, by `router.type`."""
    common = dict(num_experts=moe_cfg.num_experts, top_k=moe_cfg.top_k, renormalize=moe_cfg.renormalize,
                  backend=router_cfg.backend)
    if router_cfg.type == "linear":
        return TopKRouter(hidden, **common)
    if router_cfg.type == "linear_per_modality":
        return PerModalityLinearRouter(hidden, **common)
    assert router_cfg.type == "dtr", f"router.type {router_cfg.type!r} (RouterConfig.type lists the choices)"
    return DynamicTokenRouter(hidden, hyper_hidden=router_cfg.hyper_hidden_size, rank=router_cfg.rank,
                              embed_dim=router_cfg.embed_dim, activation=router_cfg.activation, **common)

"""Turn the plain model into its parallel version (torchtitan-style `apply_*` functions).

    with torch.device("meta"):
        model = build_model(cfg, image_token_id)       # shapes only: no rank holds the full model
    parallelize(model, state, cfg)                     # in place, in this order:
      1. split_pipeline   keep this stage's decoder layers (+ vision/embedding on the first stage,
                          final norm/LM head on the last); the others become absent modules
      2. apply_tp         shard attention heads, dense FFN columns, the experts' F dim, the
                          embedding and LM head vocabulary; optional sequence parallelism
                          (tensor_parallel_plan.py)
      3. apply_ep         keep this rank's experts, install the all-to-all dispatcher
      4. apply_moe_stats  routers compute their load-balancing statistics over the DP group's
                          global batch (the aux loss does not depend on the layout)
      5. apply_recompute  train.recompute: full (each decoder layer reruns in backward) or selective
                          (attention core, FFN/expert up half); before compile, which traces it
      6. apply_compile    train.compile: torch.compile each decoder layer in place (compile.py);
                          last, as in torchtitan, so the graphs capture the sharded modules and hooks
    materialise_shards(model, state, cfg, device, seed)  # sharded_construction.py: storage + init
    reducer = apply_dp(model, params, state)           # after the trainable set is known

On a meta model the steps only reshape: the shards are shapes, and `materialise_shards` then gives
this rank's tensors storage and the values the one-process model holds in the same place (per-tensor
streams over the full tensor, model/init.py), so every layout computes exactly what one process
computes. On a model with values (tests, the stage structure changes) each step copies this rank's
shard out of the full weights, with the same result. Modules
keep their parameter names (patterns such as `llm.layers.{moe}.mlp.*` still match), and their
`_shard_specs` say how each tensor relates to the full one. `parallelize` is idempotent, so it is
called again after every stage's structure change (stage_structure.py). With a ParallelState of
size 1 every step is a no-op.
"""
from __future__ import annotations

from torch import nn

from ..model.absent import is_absent
from ..model.recompute import apply_recompute
from ..moe.moe_layer import MoELayer
from .compile import apply_compile
from .data_parallel import GradientReducer
from .expert_parallel import AllToAllTokenDispatcher, ParallelGroupedExperts, use_global_batch_aux_loss
from .pipeline import split_pipeline
from .state import ParallelState, ShardSpec
from .tensor_parallel_plan import apply_tp, replace_param


def parallelize(model, state: ParallelState, cfg):
    """Apply PP split, TP, EP, the global-batch router statistics, train.recompute and train.compile, in
    that order (idempotent)."""
    if state.pp_size > 1:
        split_pipeline(model, state, cfg)  # 1. first, so later steps only touch this stage's modules
    apply_tp(model, state, cfg)  # 2. shards from the full weights
    apply_ep(model, state, cfg)  # 3. after TP: slices the (F-sharded) experts along the expert dim
    apply_moe_stats(model, state, cfg)  # 4.
    apply_recompute(model, cfg.train.recompute)  # 5. marks the present layers (and their new MLPs)
    if cfg.train.compile:
        apply_compile(model)  # 6. last: compiles this stage's layers as the steps above left them
    return model


def _moe_layers(model) -> list[MoELayer]:
    return [layer.mlp for layer in model.llm.layers if not is_absent(layer) and isinstance(layer.mlp, MoELayer)]


def apply_ep(model, state: ParallelState, cfg=None):
    """Keep experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of every MoE layer; all-to-all dispatch."""
    for mlp in _moe_layers(model):
        ex = ParallelGroupedExperts.adopt(mlp.experts)
        if state.ep_size == 1 or isinstance(mlp.dispatcher, AllToAllTokenDispatcher):
            continue
        E = ex.num_global_experts
        if E % state.ep_size:
            raise ValueError(f"parallel.ep: {state.ep_size} does not divide moe.num_experts={E}")
        El = E // state.ep_size
        start = state.ep_rank * El
        for name in ex.tensor_keys:  # weights and biases: the expert dim is dim 0 of each
            replace_param(ex, name, getattr(ex, name)[start:start + El].detach().clone())
            ex._shard_specs[name] = ShardSpec(tp_dim=ex._shard_specs[name].tp_dim,
                                              full_size=ex._shard_specs[name].full_size, ep_dim=0, expert=True)
        ex.expert_offset = start
        mlp.dispatcher = AllToAllTokenDispatcher(E, state.ep_group, backend=mlp.dispatcher.backend)
    return model


def apply_moe_stats(model, state: ParallelState, cfg=None):
    """Routers all-reduce their load-balancing statistics over the DP group (dp > 1)."""
    if state.dp_size == 1:
        return model
    for mlp in _moe_layers(model):
        use_global_batch_aux_loss(mlp.router, state.dp_group)
    return model


def apply_dp(model: nn.Module, params: list[tuple[str, nn.Parameter]], state: ParallelState,
             bucket_size_mb: float = 25.0) -> GradientReducer:
    """The gradient reducer for this stage's trainable parameters (call `reduce()` after backward)."""
    return GradientReducer(model, params, state, bucket_size_mb=bucket_size_mb)

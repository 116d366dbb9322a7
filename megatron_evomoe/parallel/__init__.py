"""Megatron-style parallelism on torch.distributed (NCCL on GPU, gloo on CPU).

    state = ParallelState.build(cfg)              # rank layout + process groups (launch.init_distributed);
                                                  # ParallelState.single(cfg) for one process
    parallelize(model, state, cfg)                # PP split -> TP -> EP -> global-batch router stats
    reducer = apply_dp(model, params, state)      # bucketed gradient all-reduce (DP / expert-DP)

Modules, lowest first: state (layout, groups, shard specs), specialise (the in-place class swap
that adds communication to a module), watchdog (heartbeats and named errors when a rank dies or
hangs), tensor_parallel (TP/SP collectives and sharded layers), expert_parallel (all-to-all
dispatcher, expert shards, global-batch router statistics), data_parallel (gradient reducer,
ZeRO-1, global norm), pipeline (stage split + 1F1B), tensor_parallel_plan (which module becomes
which sharded layer, and the region hooks), parallelize (the apply_* functions in order),
sharded_state (full state dicts and loading them into any layout), stage_structure (dense ->
evolve -> sparse on a sharded model), reshard (per-rank checkpoints -> one consolidated
checkpoint), training_hooks (what the trainer calls), launch (torchrun / SLURM initialisation).
"""
from .data_parallel import GradientReducer, all_reduce_floats, clip_grad_norm_, global_grad_norm
from .expert_parallel import AllToAllTokenDispatcher, ParallelGroupedExperts
from .launch import init_distributed
from .parallelize import apply_dp, apply_ep, apply_moe_stats, parallelize
from .pipeline import forward_backward_1f1b, split_pipeline
from .reshard import consolidate
from .sharded_state import full_state_dict, load_full_state_dict, local_parameter_count
from .stage_structure import apply_stage_structure
from .state import ParallelState, RankLayout, ShardSpec, layout_table, validate_parallel
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .tensor_parallel_plan import apply_tp
from .training_hooks import ParallelTraining

__all__ = [
    "ParallelState", "RankLayout", "ShardSpec", "layout_table", "validate_parallel",
    "parallelize", "apply_tp", "apply_ep", "apply_moe_stats", "apply_dp", "split_pipeline",
    "apply_stage_structure", "full_state_dict", "load_full_state_dict", "local_parameter_count",
    "GradientReducer", "clip_grad_norm_", "global_grad_norm", "all_reduce_floats",
    "AllToAllTokenDispatcher", "ParallelGroupedExperts", "forward_backward_1f1b",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "ParallelTraining", "init_distributed", "consolidate",
]

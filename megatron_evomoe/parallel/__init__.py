"""Megatron-style parallelism on torch.distributed (NCCL on GPU, gloo on CPU).

    state = ParallelState.build(cfg)              # rank layout + process groups (launch.init_distributed)
    parallelize(model, state, cfg)                # PP split -> TP -> EP -> global-batch router stats
    reducer = apply_dp(model, params, state)      # bucketed gradient all-reduce (DP / expert-DP)

Modules: state (layout, groups, shard specs), tensor_parallel, expert_parallel, data_parallel,
pipeline (split + 1F1B), apply (the apply_* functions, stage changes, full state dicts, the
trainer's hooks), specialise (the in-place class swap that adds communication to a model module),
launch (torchrun / SLURM initialisation, layout dry run), watchdog (heartbeats and named errors when
a rank dies or hangs in a collective), reshard (per-rank checkpoints -> one consolidated checkpoint
that any layout resumes from).
"""
from .apply import (apply_dp, apply_ep, apply_moe_stats, apply_stage_structure, apply_tp, full_state_dict,
                    load_full_state_dict, local_parameter_count, parallelize)
from .apply import ParallelTraining
from .data_parallel import GradientReducer, all_reduce_floats, clip_grad_norm_, global_grad_norm
from .expert_parallel import AllToAllTokenDispatcher, ParallelGroupedExperts
from .launch import init_distributed
from .pipeline import forward_backward_1f1b, split_pipeline
from .reshard import consolidate
from .state import ParallelState, RankLayout, ShardSpec, layout_table, validate_parallel
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

__all__ = [
    "ParallelState", "RankLayout", "ShardSpec", "layout_table", "validate_parallel",
    "parallelize", "apply_tp", "apply_ep", "apply_moe_stats", "apply_dp", "split_pipeline",
    "apply_stage_structure", "full_state_dict", "load_full_state_dict", "local_parameter_count",
    "GradientReducer", "clip_grad_norm_", "global_grad_norm", "all_reduce_floats",
    "AllToAllTokenDispatcher", "ParallelGroupedExperts", "forward_backward_1f1b",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "ParallelTraining", "init_distributed", "consolidate",
]

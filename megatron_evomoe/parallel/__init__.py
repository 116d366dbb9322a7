"""Megatron-style parallelism on torch.distributed (NCCL on GPU, gloo on CPU).

    state = ParallelState.build(cfg)              # rank layout + process groups (launch.init_distributed);
                                                  # ParallelState.single(cfg) for one process
    parallelize(model, state, cfg)                # PP split -> TP -> EP -> global-batch router stats
                                                  # -> train.compile (each decoder layer); on a meta model:
    materialise_shards(model, state, cfg, dev, seed)  # this rank's shards get storage + initial values
    reducer = apply_dp(model, params, state)      # bucketed gradient all-reduce (DP / expert-DP)

Modules, lowest first: state (layout, groups, shard specs), specialise (the in-place class swap
that adds communication to a module), watchdog (heartbeats and named errors when a rank dies or
hangs), tensor_parallel (TP/SP collectives and sharded layers), expert_parallel (all-to-all
dispatcher, expert shards, global-batch router statistics), data_parallel (gradient reducer,
ZeRO-1, global norm), pipeline (stage split + 1F1B), pipeline_generation (KV-cache decoding
split over the stages: `generation.decode`'s step), tensor_parallel_plan (which module becomes
which sharded layer, and the region hooks), compile (`apply_compile`: train.compile, torch.compile
per decoder layer), apply_layout (`parallelize`: the apply_* functions in order),
sharded_construction (a meta-built model's shards materialised and initialised per rank),
sharded_state (full state dicts and loading them into any layout, slice by slice), stage_structure (dense ->
evolve -> sparse on a sharded model), reshard (per-rank checkpoints -> one consolidated
checkpoint), training_hooks (what the trainer calls), launch (torchrun / SLURM initialisation),
config_agreement (every rank trains the same config), memory_tracking (live tensor bytes and
their peak over a region: a measurement tool).

Names are imported lazily (PEP 562): `python -m megatron_evomoe.parallel.launch` (or `.reshard`)
then runs its module once, not a second copy of one the package had already imported.
"""
from ..lazy_exports import lazy_exports

_EXPORTS = {
    "compile": ("apply_compile",),
    "config_agreement": ("agree_on_config",),
    "data_parallel": ("GradientReducer", "all_reduce_floats", "clip_grad_norm_", "global_grad_norm"),
    "expert_parallel": ("AllToAllTokenDispatcher", "ParallelGroupedExperts"),
    "launch": ("init_distributed",),
    "apply_layout": ("apply_dp", "apply_ep", "apply_moe_stats", "parallelize"),
    "pipeline": ("forward_backward_1f1b", "split_pipeline"),
    "pipeline_generation": ("PipelineDecodeStep", "decode_step_for"),
    "reshard": ("consolidate",),
    "memory_tracking": ("LiveTensorBytes",),
    "sharded_construction": ("materialise_shards", "shard_box"),
    "sharded_state": ("full_state_dict", "load_full_state_dict", "local_parameter_count"),
    "stage_structure": ("apply_stage_structure",),
    "state": ("ParallelState", "RankLayout", "ShardSpec", "layout_table", "validate_parallel"),
    "tensor_parallel": ("ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"),
    "tensor_parallel_plan": ("apply_tp",),
    "training_hooks": ("ParallelTraining",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

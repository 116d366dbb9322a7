"""The global batch of each stage and the gradient accumulation it implies for a layout.

A stage's optimizer step takes `global_batch_size` samples (packed rows with data.packing=pack) of
the global stream, whatever the number of processes: each data-parallel rank runs
global / (micro_batch_size x dp) micro-batches of it (under pipeline parallelism, the pipeline's
micro-batches). A layout that cannot split it evenly is refused before any work starts.
"""
from __future__ import annotations

from .schema import Config, ConfigError


def stage_global_batch(cfg: Config, stage) -> int:
    """Samples (rows) per optimizer step of `stage`: its own setting, else train's, else one micro-batch."""
    return stage.global_batch_size or cfg.train.global_batch_size or cfg.train.micro_batch_size


def accumulation_steps(cfg: Config, stage, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank; ConfigError when it does not divide."""
    global_batch, micro = stage_global_batch(cfg, stage), cfg.train.micro_batch_size
    per_micro_step = micro * dp_size
    if global_batch % per_micro_step:
        fix = max(per_micro_step, global_batch // per_micro_step * per_micro_step)
        raise ConfigError(
            f"stages.{stage.name}.global_batch_size: {global_batch} samples per step is not divisible by "
            f"train.micro_batch_size {micro} x data-parallel size {dp_size} = {per_micro_step}; set it "
            f"(or train.global_batch_size) to a multiple of {per_micro_step}, e.g. {fix}, or change "
            "train.micro_batch_size")
    return global_batch // per_micro_step


def check_global_batches(cfg: Config, dp_size: int) -> dict:
    """Every stage's accumulation for `dp_size` (name -> micro-batches per step), or the first ConfigError."""
    return {stage.name: accumulation_steps(cfg, stage, dp_size) for stage in cfg.stages}

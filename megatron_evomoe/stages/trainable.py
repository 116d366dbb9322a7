"""Which parameters a stage trains: fnmatch patterns over parameter names.

`{moe}` in a pattern expands to each MoE-designated layer index, e.g. `llm.layers.{moe}.mlp.*` is
"the FFN (or MoE block) of every MoE layer".
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from torch import nn

from ..config import Config, ConfigError, StageConfig, moe_layer_indices


def expand_patterns(patterns: list[str], cfg: Config) -> list[str]:
    out = []
    for p in patterns:
        if "{moe}" in p:
            out.extend(p.replace("{moe}", str(i)) for i in moe_layer_indices(cfg))
        else:
            out.append(p)
    return out


def set_trainable(model: nn.Module, cfg: Config, stage: StageConfig, stage_idx: int,
                  agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """requires_grad = name matches one of the stage's patterns; returns the trainable names.

    A pattern that matches nothing is a ConfigError. `agree` (pipeline parallelism) turns this
    stage's [num_patterns] 0/1 usage into the usage over all pipeline stages (a MAX all-reduce):
    a pattern only has to match on *some* stage (the projector lives on the first only)."""
    patterns = expand_patterns(stage.trainable, cfg)
    used = torch.zeros(len(patterns), dtype=torch.int32)
    names = []
    for name, p in model.named_parameters():
        hits = [i for i, pat in enumerate(patterns) if fnmatch.fnmatchcase(name, pat)]
        p.requires_grad_(bool(hits))
        used[hits] = 1
        if hits:
            names.append(name)
    if agree is not None:
        used = agree(used)
    unused = [patterns[i] for i in range(len(patterns)) if not used[i]]
    if unused:
        raise ConfigError(f"stages[{stage_idx}].trainable: pattern {unused[0]!r} matches no parameter "
                          f"of the model in stage {stage.name!r}")
    return names

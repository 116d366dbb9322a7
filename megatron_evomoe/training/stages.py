"""Stages as configuration (ARCHITECTURE 4.1): model structure and trainable set per stage.

A stage names its trainable parameters with fnmatch patterns over parameter
names. `{moe}` in a pattern expands to each MoE-designated layer index, e.g.
`llm.layers.{moe}.mlp.*` is "the FFN (or MoE block) of every MoE layer".
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..config import Config, ConfigError, StageConfig, moe_layer_indices
from ..model.llm import FFN
from ..moe.evolution import EvolutionScheduler, EvolvingFFN
from ..moe.moe_layer import MoELayer
from ..moe.upcycling import upcycle_to_moe


def apply_stage_structure(model: nn.Module, cfg: Config, stage: StageConfig, generator: torch.Generator) -> None:
    """Convert the MoE-designated layers to what `stage.moe_mode` needs (idempotent).

    dense: plain FFN; evolve: FFN1 + evolved copies; sparse: MoE layer (upcycled
    by moe.init). Conversions only go forward: dense -> evolve -> sparse.
    """
    for i in moe_layer_indices(cfg):
        layer = model.llm.layers[i]
        mlp = layer.mlp
        if stage.moe_mode == "evolve" and type(mlp) is FFN:
            layer.mlp = EvolvingFFN.from_ffn(mlp, len(cfg.evolution.beta_ranges))
        elif stage.moe_mode == "sparse" and not isinstance(mlp, MoELayer):
            layer.mlp = upcycle_to_moe(mlp, cfg, generator)
        elif stage.moe_mode == "dense" and not type(mlp) is FFN:
            raise ValueError(f"stage {stage.name!r}: cannot run layer {i} dense after it became {type(mlp).__name__}")


def expand_patterns(patterns: list[str], cfg: Config) -> list[str]:
    out = []
    for p in patterns:
        if "{moe}" in p:
            out.extend(p.replace("{moe}", str(i)) for i in moe_layer_indices(cfg))
        else:
            out.append(p)
    return out


def set_trainable(model: nn.Module, cfg: Config, stage: StageConfig, stage_idx: int) -> list[str]:
    """requires_grad = name matches one of the stage's patterns; returns the trainable names."""
    patterns = expand_patterns(stage.trainable, cfg)
    names = []
    used = set()
    for name, p in model.named_parameters():
        hits = [pat for pat in patterns if fnmatch.fnmatchcase(name, pat)]
        p.requires_grad_(bool(hits))
        used.update(hits)
        if hits:
            names.append(name)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(f"stages[{stage_idx}].trainable: pattern {unused[0]!r} matches no parameter "
                          f"of the model in stage {stage.name!r}")
    return names


def evolution_scheduler(model: nn.Module, cfg: Config) -> EvolutionScheduler | None:
    modules = [m for m in model.modules() if isinstance(m, EvolvingFFN)]
    if not modules:
        return None
    return EvolutionScheduler(modules, cfg.evolution.beta_ranges, cfg.evolution.rule, cfg.evolution.seed)


def moe_layers(model: nn.Module) -> list[tuple[int, MoELayer]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.llm.layers) if isinstance(layer.mlp, MoELayer)]

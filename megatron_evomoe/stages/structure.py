"""The model's structure per stage: dense -> evolve -> sparse, and the model rebuilt up to a stage.

`apply_stage_structure` converts the MoE-designated layers to what a stage's `moe_mode` needs;
`build_model` builds the plain model and replays the structure of every stage up to one, which is
how a checkpoint of that stage is loaded (restore, conversion, parameter counts).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config, StageConfig, moe_layer_indices
from ..model.llm import FFN
from ..model.mllm import MultimodalLM
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


def build_model(cfg: Config, image_token_id: int, up_to_stage: int = -1,
                generator: torch.Generator | None = None) -> MultimodalLM:
    """The plain model with the structure of stages [0, up_to_stage] applied (none for -1), built on
    the current default device (e.g. inside `torch.device("meta")` for shapes only).

    The conversions draw from `generator` (a fresh default generator if None): values that a
    checkpoint overwrites anyway, only the structure matters."""
    model = MultimodalLM(cfg, image_token_id)
    gen = torch.Generator() if generator is None else generator
    for stage in cfg.stages[: up_to_stage + 1]:
        apply_stage_structure(model, cfg, stage, gen)
    return model


def evolution_scheduler(model: nn.Module, cfg: Config) -> EvolutionScheduler | None:
    modules = [m for m in model.modules() if isinstance(m, EvolvingFFN)]
    if not modules:
        return None
    return EvolutionScheduler(modules, cfg.evolution.beta_ranges, cfg.evolution.rule, cfg.evolution.seed)


def moe_layers(model: nn.Module) -> list[tuple[int, MoELayer]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.llm.layers) if isinstance(getattr(layer, "mlp", None),
                                                                                        MoELayer)]

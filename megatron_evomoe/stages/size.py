"""Parameter counts (total, active per token) of the model each stage builds, on the meta device."""
from __future__ import annotations

import copy

import torch

from ..moe.moe_layer import MoELayer
from .structure import apply_stage_structure, build_model


def count_parameters(cfg, image_token_id: int = 0) -> list[dict]:
    """One row per stage: total / LLM-active-per-token / vision parameters after that stage's structure."""
    cfg = copy.deepcopy(cfg)
    with torch.device("meta"):
        model = build_model(cfg, image_token_id)
        gen = torch.Generator()
        rows = []
        for stage in cfg.stages:
            apply_stage_structure(model, cfg, stage, gen)
            rows.append({"stage": stage.name, **_counts(model)})
    return rows


def _counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for m in (model.vision, model.projector) if m is not None for p in m.parameters())
    llm = sum(p.numel() for p in model.llm.parameters())
    inactive = 0
    for layer in model.llm.layers:
        if isinstance(layer.mlp, MoELayer):
            ex = sum(p.numel() for p in layer.mlp.experts.parameters())
            E, k = layer.mlp.experts.num_experts, layer.mlp.router.top_k
            inactive += ex * (E - k) // E
    return {"total": total, "llm": llm, "llm_active_per_token": llm - inactive, "vision": vision}

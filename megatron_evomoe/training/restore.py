"""Rebuild a trained model from a checkpoint folder (for evaluation, reports and generation)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, _from_dict, validate
from ..model.mllm import MultimodalLM
from . import checkpoint as ckpt
from .data_setup import DataBundle, prepare_data
from .stages import apply_stage_structure


def config_from_state(state: dict) -> Config:
    cfg = _from_dict(Config, state["config"], "")
    validate(cfg)
    return cfg


def load_trained_model(path: str | Path, device: str | torch.device = "cpu",
                       data_root: str | None = None) -> tuple[MultimodalLM, Config, DataBundle, dict]:
    """Checkpoint folder (or a run's save_dir: its latest checkpoint) -> (model in eval mode, cfg, data, state)."""
    state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(path))
    cfg = config_from_state(state)
    if data_root is not None:
        cfg.data.root = data_root
    cfg.data.build_if_missing = False
    bundle = prepare_data(cfg)
    model = MultimodalLM(cfg, bundle.tokenizer.image_token_id)
    gen = torch.Generator()
    for stage in cfg.stages[: state["stage_idx"] + 1]:
        apply_stage_structure(model, cfg, stage, gen)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, bundle, state

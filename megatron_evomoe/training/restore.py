"""Rebuild a trained model from a checkpoint folder (for evaluation, reports and generation)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, ConfigError, _from_dict, upgrade_saved_config, validate
from ..model.mllm import MultimodalLM
from .. import checkpointing as ckpt
from ..stages.structure import build_model
from .data_setup import DataBundle, prepare_data


IMPORTED_FORMAT = "hf-import"  # meta.json "format" of `python -m megatron_evomoe.convert hf-to-evomoe`


def refuse_imported_save_dir(cfg: Config) -> None:
    """ConfigError when a run would resume from an imported checkpoint: train.save_dir is the folder the
    HF importer wrote, whose checkpoint holds weights but no optimizer, data position or RNG to resume."""
    if not cfg.train.resume:
        return
    latest = ckpt.find_latest(cfg.train.save_dir)  # complete checkpoints only: their meta.json parses
    if latest is None or json.loads((latest / "meta.json").read_text()).get("format") != IMPORTED_FORMAT:
        return
    raise ConfigError(f"train.save_dir: {cfg.train.save_dir} holds the imported checkpoint {latest.name} (weights "
                      "only, nothing to resume); train from it with --train.init_from="
                      f"{cfg.train.save_dir} and a new --train.save_dir")


def config_from_state(state: dict) -> Config:
    cfg = _from_dict(Config, upgrade_saved_config(state["config"]), "")  # (a checkpoint of any version)
    validate(cfg)
    return cfg


def load_trained_model(path: str | Path, device: str | torch.device = "cpu",
                       data_root: str | None = None) -> tuple[MultimodalLM, Config, DataBundle, dict]:
    """Checkpoint folder (or a run's save_dir: its latest checkpoint) -> (model in eval mode, cfg, data, state)."""
    found = ckpt.resolve_checkpoint(path)
    state = ckpt.load_checkpoint(found)
    if not isinstance(state.get("config"), dict) or "stage_idx" not in state:
        raise ckpt.CheckpointError(f"{found}: not a training checkpoint (no saved config or stage); weights-only "
                                   "checkpoints (e.g. from the HF importer) are loaded with train.init_from")
    cfg = config_from_state(state)
    if data_root is not None:
        cfg.data.root = data_root
    cfg.data.build_if_missing = False
    bundle = prepare_data(cfg)
    model = build_model(cfg, bundle.tokenizer.image_token_id, up_to_stage=state["stage_idx"])
    # the saved config rebuilds the same model unless data_root brings another tokenizer (vocabulary)
    ckpt.check_model_fits(model.state_dict(), state, str(found), cfg.to_dict())
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, bundle, state

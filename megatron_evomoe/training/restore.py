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


def legacy_image_fields(tree: dict, image_processor) -> dict:
    """A saved config tree from before `vision.image_mean`/`image_std` existed, with the mean/std its
    checkpoint (or native export) recorded as {"mean": [...], "std": [...]} (an imported SigLIP's 0.5)."""
    vision = tree.get("vision")
    if isinstance(image_processor, dict) and isinstance(vision, dict) and "image_mean" not in vision:
        for ours, theirs in (("image_mean", "mean"), ("image_std", "std")):
            if image_processor.get(theirs) is not None:
                vision[ours] = list(image_processor[theirs])
    return tree


def config_from_state(state: dict) -> Config:
    tree = legacy_image_fields(upgrade_saved_config(state["config"]), state.get("image_processor"))
    cfg = _from_dict(Config, tree, "")  # (a checkpoint of any version)
    validate(cfg)
    return cfg


def _differs(a, b) -> bool:
    return len(a) != len(b) or any(abs(float(x) - float(y)) > 1e-6 for x, y in zip(a, b))


def check_init_image_processing(cfg: Config, state: dict, folder: Path) -> None:
    """ConfigError when the run's `vision` image processing contradicts the HF processor that the
    train.init_from checkpoint was imported with (meta.json "image_processor_source"): the tower would
    be fed images it was not trained on. `pad` is LLaVA-1.5's use of a CLIP (crop) processor."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return  # load_checkpoint has accepted the folder; an unreadable meta records no processor
    source = meta.get("image_processor_source") if isinstance(meta, dict) else None
    saved = (state.get("config") or {}).get("vision") or {}
    if not cfg.vision.enabled or not source or "image_mode" not in saved:
        return
    v, mode = cfg.vision, saved["image_mode"]
    if v.image_mode != mode and not (mode == "crop" and v.image_mode == "pad"):
        allowed = "crop or pad" if mode == "crop" else mode
        raise ConfigError(f"vision.image_mode: {v.image_mode!r} contradicts the {mode!r} processor of the "
                          f"train.init_from checkpoint ({source}); set {allowed}")
    for name in ("image_mean", "image_std", "resample"):
        ours, theirs = getattr(v, name), saved.get(name)
        if theirs is not None and (ours != theirs if name == "resample" else _differs(ours, theirs)):
            raise ConfigError(f"vision.{name}: {ours!r} contradicts {theirs!r} of the processor the train.init_from "
                              f"checkpoint was imported with ({source})")


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

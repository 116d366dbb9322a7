"""Data for the trainer: the dataset folder, the tokenizer, each stage's files read once per run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..data.build_bundled import build_bundled_dataset
from ..data.llava_dataset import LlavaDataset, PopeDataset
from ..data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("megatron_evomoe")

POPE_ANSWER_TOKENS = 3  # what the stage-end evaluation generates: "yes" / "no" and an EOS fit


@dataclass
class DataBundle:
    root: Path
    tokenizer: Tokenizer
    # Stage datasets read by `check_stage_data`, kept for the stages that use them (path -> [dataset,
    # stages still to use it]) so that every file is read and tokenised once per run.
    datasets: dict = field(default_factory=dict)


def prepare_data(cfg: Config) -> DataBundle:
    """Build the bundled dataset if asked and missing, load the tokenizer, fix model.vocab_size."""
    d = cfg.data
    root = Path(d.root)
    if d.build_if_missing:
        build_bundled_dataset(str(root), num_images=d.num_images, num_test_images=d.num_test_images,
                              image_size=cfg.vision.image_size, seed=cfg.train.seed, log=log.info)
    elif not root.is_dir():
        raise ConfigError(f"data.root: folder not found: {root} (set data.build_if_missing=true to build it)")
    tok_path = Path(d.tokenizer) if d.tokenizer else root / "tokenizer"
    tokenizer = load_tokenizer(str(tok_path))
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ({tok_path})")
    return DataBundle(root, tokenizer)


def stage_files(stage) -> list[tuple[str, float]]:
    """(file under data.root, weight) of each component of a stage's data: one file has weight 1."""
    if isinstance(stage.data, str):
        return [(stage.data, 1.0)]
    return [(item["path"], float(item["weight"])) for item in stage.data]


def _read_stage_dataset(bundle: DataBundle, name: str, at: str, cfg: Config) -> LlavaDataset:
    path = bundle.root / name
    if not path.is_file():
        raise ConfigError(f"{at}: file not found: {path}")
    index_dir = Path(cfg.data.index_dir) if cfg.data.index_dir else bundle.root / ".token_index"
    return LlavaDataset(path, bundle.root / "images", bundle.tokenizer, cfg.data.seq_len,
                        cfg.vision.num_image_tokens, cfg.vision.image_size,
                        skip_bad_samples=cfg.data.skip_bad_samples, overlong=cfg.data.overlong,
                        index_dir=index_dir)


def check_stage_data(bundle: DataBundle, cfg: Config, stages) -> None:
    """Read and validate the data of every stage still to run, and the evaluation split, before any
    training: a bad record in the last stage's file stops the run now, not after the first stages."""
    for stage in stages:
        for i, (name, _) in enumerate(stage_files(stage)):
            key = str(bundle.root / name)
            if key not in bundle.datasets:
                bundle.datasets[key] = [_read_stage_dataset(bundle, name, _data_field(stage, i), cfg), 0]
            bundle.datasets[key][1] += 1
    evaluated = [s for s in stages if s.eval] if cfg.data.num_eval_samples > 0 else []
    if evaluated and not cfg.vision.enabled:  # it would fail at the stage's end, after its training
        raise ConfigError(f"stages.{evaluated[0].name}.eval: the stage-end POPE evaluation asks about images, but "
                          "vision.enabled=false; set eval: false (or data.num_eval_samples=0)")
    if evaluated:
        pope_dataset(bundle, cfg)


def pope_dataset(bundle: DataBundle, cfg: Config) -> PopeDataset:
    """The stage-end evaluation's questions (data.eval_split), held to what that evaluation needs: a label
    on every question, and a prompt that leaves room in model.max_seq_len for the answer."""
    return PopeDataset(bundle.root / cfg.data.eval_split, bundle.root / "images", bundle.tokenizer,
                       cfg.vision.num_image_tokens, cfg.vision.image_size, require_labels=True,
                       max_prompt_tokens=cfg.model.max_seq_len - POPE_ANSWER_TOKENS)


def _data_field(stage, i: int) -> str:
    return f"stages.{stage.name}.data" + ("" if isinstance(stage.data, str) else f"[{i}].path")


def stage_datasets(bundle: DataBundle, stage, cfg: Config) -> list[LlavaDataset]:
    """The stage's dataset per component, from those `check_stage_data` read (each file read once per run)."""
    out = []
    for i, (name, _) in enumerate(stage_files(stage)):
        key = str(bundle.root / name)
        entry = bundle.datasets.get(key)
        if entry is None:  # not checked up front (e.g. a test building StageData directly)
            out.append(_read_stage_dataset(bundle, name, _data_field(stage, i), cfg))
            continue
        entry[1] -= 1
        if entry[1] <= 0:  # no later stage reads this file: do not hold its tokens for the rest of the run
            del bundle.datasets[key]
        out.append(entry[0])
    return out

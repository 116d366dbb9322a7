"""Data for the trainer: the dataset folder, the tokenizer, each stage's files read once per run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..data.image_processing import ImageProcessor
from ..data.llava_dataset import LlavaDataset, PopeDataset
from ..data.conversation_templates import stage_template, stage_template_field
from ..data.prepare import data_root_and_tokenizer, open_stage_dataset, stage_data_field, stage_files
from ..data.tokenizer import Tokenizer

log = logging.getLogger("megatron_evomoe")

POPE_ANSWER_TOKENS = 3  # what the stage-end evaluation generates: "yes" / "no" and an EOS fit


@dataclass
class DataBundle:
    root: Path
    tokenizer: Tokenizer
    # Stage datasets read by `check_stage_data`, kept for the stages that use them ((path, template) ->
    # [dataset, stages still to use it]) so that every file is read and tokenised once per run and template.
    datasets: dict = field(default_factory=dict)


def prepare_data(cfg: Config) -> DataBundle:
    """Build the bundled dataset if asked and missing, load the tokenizer, fix model.vocab_size."""
    root, tokenizer = data_root_and_tokenizer(cfg, log=log.info)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ({cfg.data.tokenizer or root / 'tokenizer'})")
    return DataBundle(root, tokenizer)


def check_stage_data(bundle: DataBundle, cfg: Config, stages) -> None:
    """Read and validate the data of every stage still to run, and the evaluation split, before any
    training: a bad record in the last stage's file stops the run now, not after the first stages."""
    for stage in stages:
        template = stage_template(cfg, cfg.stages.index(stage), bundle.tokenizer)
        for i, (name, _) in enumerate(stage_files(stage)):
            key = (str(bundle.root / name), template.name)
            if key not in bundle.datasets:
                where = stage_data_field(stage, i)
                bundle.datasets[key] = [open_stage_dataset(bundle.root, bundle.tokenizer, name, where, cfg, template),
                                        0]
            bundle.datasets[key][1] += 1
    evaluated = [s for s in stages if s.eval] if cfg.data.num_eval_samples > 0 else []
    if evaluated and not cfg.vision.enabled:  # it would fail at the stage's end, after its training
        raise ConfigError(f"stages.{evaluated[0].name}.eval: the stage-end POPE evaluation asks about images, but "
                          "vision.enabled=false; set eval: false (or data.num_eval_samples=0)")
    checked = set()  # the questions in each template an evaluated stage uses
    for stage in evaluated:
        idx = cfg.stages.index(stage)
        if stage_template_field(cfg, idx)[0] not in checked:
            checked.add(stage_template_field(cfg, idx)[0])
            pope_dataset(bundle, cfg, idx)


def pope_dataset(bundle: DataBundle, cfg: Config, stage_idx: int = -1) -> PopeDataset:
    """The stage-end evaluation's questions (data.eval_split) in stage `stage_idx`'s template, held to what
    that evaluation needs: a label on every question, and a prompt that leaves room in model.max_seq_len for
    the answer."""
    return PopeDataset(bundle.root / cfg.data.eval_split, bundle.root / "images", bundle.tokenizer,
                       cfg.vision.num_image_tokens, ImageProcessor.from_config(cfg.vision), require_labels=True,
                       template=stage_template(cfg, stage_idx, bundle.tokenizer),
                       max_prompt_tokens=cfg.model.max_seq_len - POPE_ANSWER_TOKENS)


def stage_datasets(bundle: DataBundle, stage, cfg: Config) -> list[LlavaDataset]:
    """The stage's dataset per component, from those `check_stage_data` read (each file read once per run)."""
    out = []
    template = stage_template(cfg, cfg.stages.index(stage), bundle.tokenizer)
    for i, (name, _) in enumerate(stage_files(stage)):
        key = (str(bundle.root / name), template.name)
        entry = bundle.datasets.get(key)
        if entry is None:  # not checked up front (e.g. a test building StageData directly)
            out.append(open_stage_dataset(bundle.root, bundle.tokenizer, name, stage_data_field(stage, i), cfg,
                                          template))
            continue
        entry[1] -= 1
        if entry[1] <= 0:  # no later stage reads this file: do not hold its tokens for the rest of the run
            del bundle.datasets[key]
        out.append(entry[0])
    return out

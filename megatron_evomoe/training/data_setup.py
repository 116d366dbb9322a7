"""Data for the trainer: the dataset folder, the tokenizer, and one resumable stream per stage."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError
from ..data.build_bundled import build_bundled_dataset
from ..data.llava_dataset import LlavaDataset
from ..data.sampler import ResumableSampler
from ..data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("megatron_evomoe")


@dataclass
class DataBundle:
    root: Path
    tokenizer: Tokenizer


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


class StageData:
    """A stage's dataset and its infinite, resumable, shuffled stream of micro-batches."""

    def __init__(self, bundle: DataBundle, stage, cfg: Config, seed: int, rank: int = 0, world_size: int = 1):
        path = bundle.root / stage.data
        if not path.is_file():
            raise ConfigError(f"stages.{stage.name}.data: file not found: {path}")
        self.dataset = LlavaDataset(path, bundle.root / "images", bundle.tokenizer, cfg.data.seq_len,
                                    cfg.vision.num_image_tokens, cfg.vision.image_size,
                                    skip_bad_samples=cfg.data.skip_bad_samples)
        if len(self.dataset) == 0:
            raise ConfigError(f"stages.{stage.name}.data: {path} has no usable records")
        self.sampler = ResumableSampler(len(self.dataset), seed=seed, rank=rank, world_size=world_size)
        self._it = iter(self.sampler)
        self.batch_size = cfg.train.micro_batch_size

    def next_batch(self) -> dict:
        return self.dataset.collate([self.dataset[next(self._it)] for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._it = iter(self.sampler)

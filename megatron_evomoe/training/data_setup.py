"""Data for the trainer: the dataset folder, the tokenizer, and one resumable stream per stage."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..data.build_bundled import build_bundled_dataset
from ..data.errors import DataError
from ..data.llava_dataset import LlavaDataset, PopeDataset
from ..data.sampler import ResumableSampler
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


def _read_stage_dataset(bundle: DataBundle, stage, cfg: Config) -> LlavaDataset:
    path = bundle.root / stage.data
    if not path.is_file():
        raise ConfigError(f"stages.{stage.name}.data: file not found: {path}")
    index_dir = Path(cfg.data.index_dir) if cfg.data.index_dir else bundle.root / ".token_index"
    return LlavaDataset(path, bundle.root / "images", bundle.tokenizer, cfg.data.seq_len,
                        cfg.vision.num_image_tokens, cfg.vision.image_size,
                        skip_bad_samples=cfg.data.skip_bad_samples, overlong=cfg.data.overlong,
                        index_dir=index_dir)


def check_stage_data(bundle: DataBundle, cfg: Config, stages) -> None:
    """Read and validate the data of every stage still to run, and the evaluation split, before any
    training: a bad record in the last stage's file stops the run now, not after the first stages."""
    for stage in stages:
        key = str(bundle.root / stage.data)
        if key not in bundle.datasets:
            bundle.datasets[key] = [_read_stage_dataset(bundle, stage, cfg), 0]
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


def _stage_dataset(bundle: DataBundle, stage, cfg: Config) -> LlavaDataset:
    entry = bundle.datasets.get(str(bundle.root / stage.data))
    if entry is None:  # not checked up front (e.g. a test building StageData directly)
        return _read_stage_dataset(bundle, stage, cfg)
    entry[1] -= 1
    if entry[1] <= 0:  # no later stage reads this file: do not hold its tokens for the rest of the run
        del bundle.datasets[str(bundle.root / stage.data)]
    return entry[0]


class StageData:
    """A stage's dataset and its infinite, resumable, shuffled stream of micro-batches.

    Images are decoded only when a sample is drawn, so an unreadable image shows up mid-run: with
    `data.skip_bad_samples` the sample is skipped (counted in `num_skipped`, logged) and the next
    one drawn, deterministically, so a resumed run draws the same; without it the DataError
    propagates after the stream is rewound to the start of the step (see `next_batches`)."""

    def __init__(self, bundle: DataBundle, stage, cfg: Config, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset = _stage_dataset(bundle, stage, cfg)
        if len(self.dataset) == 0:
            raise ConfigError(f"stages.{stage.name}.data: {self.dataset.json_path} has no usable records")
        self.sampler = ResumableSampler(len(self.dataset), seed=seed, rank=rank, world_size=world_size)
        self._it = iter(self.sampler)
        self.batch_size = cfg.train.micro_batch_size
        self.skip_bad = cfg.data.skip_bad_samples
        self.bad: dict[int, str] = {}  # sample index -> reason, for samples that failed to load in this run

    @property
    def num_skipped(self) -> int:
        """Records skipped so far: bad ones found when reading the file plus unloadable ones found since."""
        return sum(self.dataset.skipped.values()) + len(self.bad)

    def skipped_by_reason(self) -> dict:
        return dict(Counter(self.dataset.skipped) + Counter(self.bad.values()))

    def next_batches(self, n: int) -> list[dict]:
        """A step's `n` micro-batches. On a DataError the stream is rewound to where the step began,
        so a checkpoint saved then replays exactly this step's samples when the run is resumed."""
        start = self.sampler.state_dict()
        try:
            return [self.next_batch() for _ in range(n)]
        except DataError:
            self.load_state_dict(start)
            raise

    def next_batch(self) -> dict:
        return self.dataset.collate([self._next_sample() for _ in range(self.batch_size)])

    def _next_sample(self) -> dict:
        # Two epochs' worth of draws cover every sample at least once (on one rank; under data
        # parallelism a rank sees its share), so a dataset of only unloadable samples stops here.
        for _ in range(2 * len(self.dataset)):
            i = next(self._it)
            if i in self.bad:
                continue
            try:
                return self.dataset[i]
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.bad[i] = e.reason
                log.warning("skipped a sample that cannot be loaded (data.skip_bad_samples=true; %d skipped in "
                            "all): %s", self.num_skipped, e)
        raise DataError(f"no sample could be loaded in {2 * len(self.dataset)} draws "
                        f"(skipped: {self.skipped_by_reason()})", file=self.dataset.json_path, reason="empty")

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.sampler.load_state_dict(state)
        except ValueError as e:  # e.g. the file lost records since the checkpoint was saved
            raise DataError(f"cannot continue the checkpoint's data stream: {e}", file=self.dataset.json_path,
                            reason="changed") from None
        self._it = iter(self.sampler)

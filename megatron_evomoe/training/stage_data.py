"""A stage's data stream for the trainer: its dataset(s), this rank's batch plan and the loader.

Images are decoded only when a sample is loaded, so an unreadable image shows up mid-run: with
`data.skip_bad_samples` the sample is dropped from its row (counted in `num_skipped`, logged; an
unpacked row is then all padding), else the DataError propagates after the stream is rewound to the
start of the step (see `next_batches`), so a checkpoint saved then replays exactly that step.
"""
from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, accumulation_steps, stage_global_batch
from ..data.batch_plan import BatchPlan
from ..data.errors import DataError
from ..data.loader import MicroBatchLoader
from ..data.mixture import SampleStream
from ..data.packing import collate_packed
from ..data.prepare import stage_files
from ..model.mllm import IGNORE_INDEX
from .data_setup import DataBundle, stage_datasets

log = logging.getLogger("megatron_evomoe")


class SampleFetch:
    """Global sample id -> the sample the collate takes (picklable: it runs in the loader's workers):
    unpacked, the padded sample dict (`dataset[i]`); packed, (ids [L], labels [L], image or None)."""

    def __init__(self, datasets, offsets: np.ndarray, packed: bool):
        self.datasets, self.offsets, self.packed = datasets, offsets, packed

    def __call__(self, global_id: int):
        c = int(np.searchsorted(self.offsets, global_id, side="right") - 1)
        dataset, i = self.datasets[c], int(global_id - self.offsets[c])
        if not self.packed:
            return dataset[i]
        ids, labels = dataset.tokens(i)
        return ids, labels, dataset.image(i)


class UnpackedCollate:
    """Rows of at most one padded sample -> `collate_llava`'s batch; a row whose sample was dropped
    (data.skip_bad_samples) becomes a padding row: pad ids, no supervised label, no image."""

    def __init__(self, dataset, seq_len: int, pad_id: int):
        self.dataset = dataset
        self.padding = {"input_ids": torch.full((seq_len,), pad_id, dtype=torch.long),  # [S]
                        "labels": torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long), "image": None}

    def __call__(self, rows):
        return self.dataset.collate([row[0] if row else self.padding for row in rows])


class StageData:
    """A stage's infinite, resumable stream of this data-parallel rank's micro-batches."""

    def __init__(self, bundle: DataBundle, stage, cfg: Config, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        d = cfg.data
        self.datasets = stage_datasets(bundle, stage, cfg)
        files = stage_files(stage)
        for ds, (name, _) in zip(self.datasets, files):
            if len(ds) == 0:
                raise ConfigError(f"stages.{stage.name}.data: {ds.json_path} has no usable records")
        self.component_names = [name for name, _ in files]
        self.accumulation = accumulation_steps(cfg, stage, world_size)  # micro-batches per step on this rank
        self.global_batch = stage_global_batch(cfg, stage)
        self.seq_len, self.skip_bad, self.packed = d.seq_len, d.skip_bad_samples, d.packing == "pack"
        stream = SampleStream([len(ds) for ds in self.datasets], seed, [w for _, w in files])
        lengths = np.concatenate([np.asarray(ds.lengths) for ds in self.datasets])
        self.plan = BatchPlan(stream, lengths, d.seq_len, cfg.train.micro_batch_size, rank, world_size,
                              packed=self.packed, pack_window=d.pack_window)
        pad_id = bundle.tokenizer.pad_id
        self._fetch = SampleFetch(self.datasets, stream.offsets, self.packed)
        if self.packed:  # (a partial of a module function pickles for the loader's workers)
            self._collate = partial(collate_packed, seq_len=d.seq_len, pad_id=pad_id, image_size=cfg.vision.image_size)
        else:
            self._collate = UnpackedCollate(self.datasets[0], d.seq_len, pad_id)
        self._loader_options = dict(skip_bad=d.skip_bad_samples, num_workers=d.num_workers,
                                    prefetch_factor=d.prefetch_factor,
                                    pin_memory=d.pin_memory and device is not None and device.type == "cuda")
        self.bad: dict[int, str] = {}  # global sample id -> reason, for samples that failed to load in this run
        self._state = self.plan.state_dict()  # after the last micro-batch handed out
        self._loader = self._new_loader()

    @property
    def dataset(self):
        """The first component's dataset (the only one without a mixture)."""
        return self.datasets[0]

    def _new_loader(self) -> MicroBatchLoader:
        return MicroBatchLoader(self.plan, self._fetch, self._collate, **self._loader_options)

    def close(self) -> None:
        self._loader.close()

    # ---- skipped samples
    @property
    def num_skipped(self) -> int:
        """Records skipped so far: bad ones found when reading the files plus unloadable ones found since."""
        return sum(sum(ds.skipped.values()) for ds in self.datasets) + len(self.bad)

    def skipped_by_reason(self) -> dict:
        total = Counter(self.bad.values())
        for ds in self.datasets:
            total += Counter(ds.skipped)
        return dict(total)

    def _note_bad(self, bad: list) -> None:
        for index, e in bad:
            if index not in self.bad:
                self.bad[index] = e.reason
                log.warning("skipped a sample that cannot be loaded (dropped from its row; data.skip_bad_samples="
                            "true; %d skipped in all): %s", self.num_skipped, e)
        if len(self.bad) >= int(self._fetch.offsets[-1]):  # every sample of the stage failed: nothing to train on
            raise DataError(f"no sample could be loaded: all {len(self.bad)} samples failed "
                            f"(skipped: {self.skipped_by_reason()})", file=self.dataset.json_path, reason="empty")

    # ---- the stream
    def next_batches(self, n: int | None = None) -> list[dict]:
        """A step's micro-batches (`n`, default the stage's accumulation). On a DataError the stream is
        rewound to where the step began, so a checkpoint saved then replays exactly this step's samples."""
        start = self._state
        try:
            out = []
            for _ in range(self.accumulation if n is None else n):
                plan, batch, bad = next(self._loader)
                self._note_bad(bad)
                self._state = plan.state_after
                out.append(batch)
            return out
        except DataError:
            self.load_state_dict(start)
            raise

    def stats(self) -> dict:
        """Running global totals of the stage (rows, samples, padding_tokens, component_samples) up to the
        last micro-batch handed out; the same on every rank, carried by checkpoints."""
        return self._state["stats"]

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._loader.close()
        try:
            self.plan.load_state_dict(state)
        except ValueError as e:  # e.g. the file lost records since the checkpoint was saved
            raise DataError(f"cannot continue the checkpoint's data stream: {e}", file=self.dataset.json_path,
                            reason="changed") from None
        self._state = self.plan.state_dict()
        self._loader = self._new_loader()

    def log_index_counts(self) -> None:
        """The index's truncations and over-long skips of each file, once at the stage's start."""
        for name, ds in zip(self.component_names, self.datasets):
            ids = list(ds.truncated_ids)
            if ds.num_truncated:
                log.info("%s: %d over-long records truncated (data.overlong=truncate); record ids %s%s", Path(name),
                         ds.num_truncated, ids[:20], " ..." if len(ids) > 20 else "")
            if ds.skipped.get("too_long", 0):
                log.info("%s: %d over-long records skipped (reason too_long)", Path(name), ds.skipped["too_long"])

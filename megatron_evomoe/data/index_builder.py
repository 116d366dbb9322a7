"""Writing one token index: stream the records, encode them (in worker processes for big files, in
file order), append the tokens to disk as they come, keep only small per-record arrays in memory.

The files (all numpy; `tokens.bin` is raw, read with np.memmap):
    tokens.bin           [T] token ids (manifest dtype), each record's image as one image-token id
    num_stored.npy       [N] stored tokens per kept record (offsets are their cumsum)
    image_pos.npy        [N] stored position of the image id + 1 (0: text-only)
    span_counts.npy      [N] supervised spans per record;  span_runs.npy [M, 2] each span's gap after
                         the previous one's end (or the record's start) and its length, in stored positions
    id_blob/id_lengths   record ids (string_table.py: as they are, or as JSON text: manifest id_kind)
    image_codes.npy      [N] 1 + index into the table of distinct image paths (0: none), which is
                         image_name_* (file names) and image_dir_codes into image_dir_* (folders)
    truncated.npy        kept-record positions that data.overlong=truncate cut
    skipped_index.npy    file indices of skipped records; skipped_reason.npy (codes into the
                         manifest's reasons); skipped_id_blob/lengths their ids
"""
from __future__ import annotations

import multiprocessing
import os
import time
from array import array
from collections import Counter, deque
from typing import Dict, Iterator, List

import numpy as np

from .errors import DataError
from .json_stream import read_records
from .record_encoder import EncodedBatch, RecordEncoder, encode_in_worker, install_worker_encoder
from .string_table import Dedup, encode_ids, encode_strings, smallest_uint, split_paths

BATCH_RECORDS = 512  # records per task sent to a worker
POOL_MIN_BYTES = 16 << 20  # smaller files are encoded in this process (a pool costs more to start)


def _batches(path: str) -> Iterator[list]:
    batch = []
    for item in read_records(path):
        batch.append(item)
        if len(batch) == BATCH_RECORDS:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(path: str, encoder: RecordEncoder, num_workers: int) -> Iterator[EncodedBatch]:
    """The encoded batches in file order; with workers, a bounded number in flight."""
    if num_workers <= 1:
        for batch in _batches(path):
            yield encoder.encode_batch(batch)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(num_workers, initializer=install_worker_encoder, initargs=(encoder,)) as pool:
        pending: deque = deque()
        reading_error = None
        try:
            for batch in _batches(path):
                pending.append(pool.apply_async(encode_in_worker, (batch,)))
                if len(pending) >= 4 * num_workers:
                    yield pending.popleft().get()
        except DataError as e:  # the file breaks further on: the records before it are reported first
            reading_error = e
        while pending:
            yield pending.popleft().get()
        if reading_error is not None:
            raise reading_error


class _Accumulator:
    """What stays in memory during a build: per-record numbers (4 bytes each), the ids, not tokens."""

    def __init__(self):
        self.num_records = 0
        self.num_stored = array("I")
        self.image_pos = array("I")
        self.span_counts = array("I")
        self.span_runs = array("I")  # [gap, length, gap, length, ...]
        self.ids: List = []
        self.image_codes = array("I")
        self.images = Dedup()
        self.truncated: List[int] = []
        self.skipped: List[tuple] = []  # (record index, id, reason)
        self.reasons: Counter = Counter()
        self.first_error = None
        self.num_tokens = 0

    def add(self, b: EncodedBatch, tokens_file) -> None:
        self.truncated += [len(self.num_stored) + k for k in b.truncated]
        tokens_file.write(b.tokens.tobytes())
        self.num_stored.extend(b.num_stored)
        self.num_tokens += len(b.tokens)
        self.image_pos.extend(b.image_pos)
        self.span_counts.extend(b.span_counts)
        self.span_runs.extend(b.span_runs)
        self.ids += b.ids
        self.image_codes.extend(self.images.code(p) for p in b.images)
        for index, rid, reason, message in b.bad:
            self.skipped.append((index, rid, reason))
            self.reasons[reason] += 1
            self.first_error = self.first_error or message
        self.num_records += len(b.ids) + len(b.bad)


def _save(folder: str, name: str, values, dtype=None) -> None:
    array = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    with open(os.path.join(folder, name + ".npy"), "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _save_strings(folder: str, name: str, strings) -> None:
    blob, lengths = encode_strings(strings)
    _save(folder, name + "_blob", blob)
    _save(folder, name + "_lengths", lengths)


def _save_ids(folder: str, name: str, ids) -> str:
    kind, texts = encode_ids(ids)
    _save_strings(folder, name, texts)
    return kind


def build_index(folder: str, json_path: str, encoder: RecordEncoder, num_workers: int = 0) -> Dict:
    """Write the index of `json_path` into the (empty, temporary) `folder`; the manifest's counts.
    `num_workers` 0: 2 worker processes for a file of POOL_MIN_BYTES or more, else none."""
    t0 = time.perf_counter()
    if num_workers == 0:
        num_workers = min(2, os.cpu_count() or 1) if os.path.getsize(json_path) >= POOL_MIN_BYTES else 1
    acc = _Accumulator()
    with open(os.path.join(folder, "tokens.bin"), "wb") as tokens_file:
        for batch in _encoded(json_path, encoder, num_workers):
            if batch.error is not None:
                raise batch.error
            acc.add(batch, tokens_file)
        tokens_file.flush()
        os.fsync(tokens_file.fileno())
    kinds = _write_arrays(folder, acc)
    return {**_counts(acc, time.perf_counter() - t0), **kinds}


def _write_arrays(folder: str, acc: _Accumulator) -> Dict[str, str]:
    max_stored = max(acc.num_stored, default=0)
    _save(folder, "num_stored", acc.num_stored, smallest_uint(max_stored))
    _save(folder, "image_pos", acc.image_pos, smallest_uint(max_stored))
    _save(folder, "span_counts", acc.span_counts, smallest_uint(max(acc.span_counts, default=0)))
    _save(folder, "span_runs", np.asarray(acc.span_runs).reshape(-1, 2), smallest_uint(max(acc.span_runs, default=0)))
    id_kind = _save_ids(folder, "id", acc.ids)
    _save(folder, "image_codes", acc.image_codes, smallest_uint(len(acc.images.codes)))
    dirs, dir_codes, names = split_paths(acc.images.table())
    _save_strings(folder, "image_dir", dirs)
    _save(folder, "image_dir_codes", dir_codes, smallest_uint(len(dirs)))
    _save_strings(folder, "image_name", names)
    _save(folder, "truncated", acc.truncated, np.int64)
    reasons = sorted(acc.reasons)
    _save(folder, "skipped_index", [s[0] for s in acc.skipped], np.int64)
    _save(folder, "skipped_reason", [reasons.index(s[2]) for s in acc.skipped], np.uint8)
    skipped_id_kind = _save_ids(folder, "skipped_id", [s[1] for s in acc.skipped])
    return {"id_kind": id_kind, "skipped_id_kind": skipped_id_kind}


def _counts(acc: _Accumulator, seconds: float) -> Dict:
    num_images = int(np.count_nonzero(np.asarray(acc.image_pos)))
    return {"num_records": acc.num_records, "num_kept": len(acc.num_stored), "skipped": dict(acc.reasons),
            "skipped_reasons": sorted(acc.reasons), "first_error": acc.first_error, "num_truncated": len(acc.truncated),
            "num_stored_tokens": acc.num_tokens, "num_text_tokens": acc.num_tokens - num_images,
            "num_images": num_images, "num_distinct_images": len(acc.images.codes), "build_seconds": round(seconds, 3)}

"""Loading planned micro-batches in order, in the calling process or in DataLoader worker processes.

A `MicroBatchPlan` says which samples one micro-batch holds: `rows` [B] lists of dataset indices
(one index per row when unpacked, several when packed), and `state_after`, the sampler state once
this micro-batch is consumed (what a checkpoint saved after it records). The loader yields
`(plan, batch, bad)` in plan order:
- batch = collate(rows of samples), a sample being fetch(index);
- bad = [(index, DataError)] of samples that could not be loaded: with skip_bad they are dropped
  from their row (an unpacked row then holds no sample; `collate` pads it); without skip_bad the
  loader raises the first DataError itself (the original exception, never a worker traceback).

The results do not depend on `num_workers`. With 0 everything runs in the calling process; with N > 0
a `torch.utils.data.DataLoader` runs `fetch` and `collate` (image decoding, padding, stacking) in N
worker processes, each `prefetch_factor` micro-batches ahead, while the plan iterator stays in the
calling process and is read only as far ahead as that (an infinite plan stream is fine). `fetch` must
be a pure function of the index (no randomness of its own), and under the spawn / forkserver start
methods `fetch` and `collate` must pickle (module-level functions, bound methods, partials); they are
pickled once per worker, so keep what they hold cheap to pickle (e.g. memory-mapped arrays reopened).
Workers start on the first `next()` and stop on `close()`, when the plans run out, on an exception
other than a DataError (a bug, or Ctrl-C: the loader is then closed), or when the loader is collected;
a new loader continues from any saved `state_after` (rewind, resume).

Over a LlavaDataset, 32 samples per micro-batch in file order:

    def collate_rows(rows): return dataset.collate([s for row in rows for s in row])
    plans = (MicroBatchPlan([[i % len(dataset)] for i in range(k, k + 32)], {}) for k in count(0, 32))
    loader = MicroBatchLoader(plans, dataset.__getitem__, collate_rows, num_workers=2)
    plan, batch, bad = next(loader); ...; loader.close()
"""
from __future__ import annotations

import signal
from collections import deque
from typing import Any, Callable, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError


class MicroBatchPlan(NamedTuple):
    rows: List[List[int]]  # [B] dataset indices per row
    state_after: dict  # the sampler state after this micro-batch


def load_rows(rows: List[List[int]], fetch: Callable[[int], Any], skip_bad: bool):
    """-> (rows of samples, [(index, DataError)] dropped); without skip_bad the first DataError is raised."""
    loaded, bad = [], []
    for row in rows:
        samples = []
        for index in row:
            try:
                samples.append(fetch(index))
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append((index, e))
        loaded.append(samples)
    return loaded, bad


class _MicroBatches(Dataset):
    """Map-style dataset whose keys are a plan's rows: -> (batch, bad, None), or (None, [], DataError).

    A DataError is returned as a value, not raised: DataLoader would re-raise it in the caller as a new
    exception holding the worker's traceback as text, losing the error's fields (file, record, image)."""

    def __init__(self, fetch: Callable[[int], Any], collate: Callable[[List[List[Any]]], dict], skip_bad: bool):
        self.fetch, self.collate, self.skip_bad = fetch, collate, skip_bad

    def __getitem__(self, rows: List[List[int]]):
        try:
            samples, bad = load_rows(rows, self.fetch, self.skip_bad)
            return self.collate(samples), bad, None
        except DataError as e:
            return None, [], e


def _rows_of(plans: Iterator[MicroBatchPlan], sent: deque) -> Iterator[List[List[int]]]:
    """The DataLoader's sampler: the plans' rows, each plan kept in `sent` until its batch comes back."""
    for plan in plans:
        sent.append(plan)
        yield plan.rows


def _as_is(item):
    return item  # batch_size=None's default (default_convert) would turn numpy in a batch into tensors


# stop signals are the main process's (training/stop_request.py acts at a step boundary): a worker
# killed by a Ctrl-C or a SIGTERM sent to the whole process group would make the main process fail
# mid-step instead of finishing the step and saving; the main process shuts the workers down itself
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # N workers + the trainer share the host's cores
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in signal.valid_signals():  # handlers inherited by fork (e.g. train.exit_signal's) are not ours
        handler = signal.getsignal(sig)
        if callable(handler) and sig not in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.SIG_IGN)


class MicroBatchLoader:
    def __init__(self, plans: Iterable[MicroBatchPlan], fetch: Callable[[int], Any],
                 collate: Callable[[List[List[Any]]], dict], *, skip_bad: bool = False, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False, multiprocessing_context: Optional[str] = None):
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {num_workers} and "
                             f"{prefetch_factor}")
        self._sent: deque = deque()  # plans handed to the DataLoader whose batches have not come back yet
        self._loader = DataLoader(
            _MicroBatches(fetch, collate, skip_bad), batch_size=None, sampler=_rows_of(iter(plans), self._sent),
            num_workers=num_workers, collate_fn=_as_is,
            pin_memory=pin_memory and torch.cuda.is_available(),  # (DataLoader warns without a GPU)
            prefetch_factor=prefetch_factor if num_workers else None,
            worker_init_fn=_init_worker if num_workers else None,
            multiprocessing_context=multiprocessing_context if num_workers else None,
            # its own generator: the workers' base seed is drawn from it, not from torch's global RNG,
            # which the training trajectory owns (a resumed run makes more loaders than an uninterrupted one)
            generator=torch.Generator())
        self._iter = None
        self._closed = False

    def __iter__(self) -> Iterator[Tuple[MicroBatchPlan, dict, list]]:
        return self

    def __next__(self) -> Tuple[MicroBatchPlan, dict, list]:
        if self._closed:
            raise RuntimeError("the micro-batch loader is closed (make a new one to continue)")
        if self._iter is None:
            self._iter = iter(self._loader)  # starts the workers, which prefetch at once
        try:
            batch, bad, error = next(self._iter)
        except BaseException:  # the plans ran out, a bug in fetch/collate (as DataLoader raises it), Ctrl-C
            self.close()
            raise
        plan = self._sent.popleft()
        if error is not None:
            raise error
        return plan, batch, bad

    def close(self) -> None:
        """Stop the workers (a new loader is made to continue from another position)."""
        self._closed = True
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # (multi-process iterators only)
        if shutdown is not None:
            shutdown()  # joins them; what they prepared ahead is dropped

    def __del__(self):
        if getattr(self, "_iter", None) is not None:
            self.close()

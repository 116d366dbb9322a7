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
other than a DataError (a bug, or Ctrl-C: the loader is then closed), at exit, or when the loader is
collected (also in a reference cycle through its plan stream; if `fetch` or `collate` hold the loader's
owner, it lives until `close()` or exit); a new loader continues from any saved `state_after`.

Over a LlavaDataset, 32 samples per micro-batch in file order:

    def collate_rows(rows): return dataset.collate([s for row in rows for s in row])
    plans = (MicroBatchPlan([[i % len(dataset)] for i in range(k, k + 32)], {}) for k in count(0, 32))
    loader = MicroBatchLoader(plans, dataset.__getitem__, collate_rows, num_workers=2)
    plan, batch, bad = next(loader); ...; loader.close()
"""
from __future__ import annotations

import signal
import weakref
from collections import deque
from multiprocessing.util import Finalize
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


class _PlanRows:
    """The DataLoader's sampler: the rows of the loader's plans, each plan kept in the loader's `_sent` until
    its batch comes back. It holds the loader weakly (the loader's finalizer holds the DataLoader iterator,
    which holds this: a strong reference would keep every loader alive until exit)."""

    def __init__(self, loader: "MicroBatchLoader"):
        self._loader = weakref.ref(loader)

    def __iter__(self) -> Iterator[List[List[int]]]:
        while (plan := self._next_plan()) is not None:
            yield plan.rows

    def _next_plan(self) -> Optional[MicroBatchPlan]:
        loader = self._loader()
        plan = None if loader is None else next(loader._plans, None)
        if plan is not None:
            loader._sent.append(plan)
        return plan


def _as_is(item):
    return item  # batch_size=None's default (default_convert) would turn numpy in a batch into tensors


# stop signals are the main process's (training/stop_request.py acts at a step boundary): a worker
# killed by a Ctrl-C or a SIGTERM sent to the whole process group would make the main process fail
# mid-step instead of finishing the step and saving; the main process shuts the workers down itself
# (close(), or `_shut_down` at exit or collection), and a worker whose main process died exits on its
# own (torch's watchdog in the worker loop notices within MP_STATUS_CHECK_INTERVAL, 5 s)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # N workers + the trainer share the host's cores
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in signal.valid_signals():  # handlers inherited by fork (e.g. train.exit_signal's) are not ours
        handler = signal.getsignal(sig)
        if callable(handler) and sig not in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.SIG_IGN)


def _shut_down(started: list) -> None:
    """Stop the workers of the DataLoader iterator in `started`, if any (they are joined; what they
    prepared ahead is dropped)."""
    while started:
        shutdown = getattr(started.pop(), "_shutdown_workers", None)  # (multi-process iterators only)
        if shutdown is not None:
            shutdown()


class MicroBatchLoader:
    """Iterator of (plan, batch, bad) over `plans` (see the module docstring). `multiprocessing_context`:
    the workers' start method ("fork", "spawn", "forkserver"; None: torch's default for the platform)."""

    def __init__(self, plans: Iterable[MicroBatchPlan], fetch: Callable[[int], Any],
                 collate: Callable[[List[List[Any]]], dict], *, skip_bad: bool = False, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False, multiprocessing_context: Optional[str] = None):
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {num_workers} and "
                             f"{prefetch_factor}")
        self._plans = iter(plans)
        self._sent: deque = deque()  # plans handed to the DataLoader whose batches have not come back yet
        self._loader = DataLoader(
            _MicroBatches(fetch, collate, skip_bad), batch_size=None, sampler=_PlanRows(self),
            num_workers=num_workers, collate_fn=_as_is,
            pin_memory=pin_memory and torch.cuda.is_available(),  # (DataLoader warns without a GPU)
            prefetch_factor=prefetch_factor if num_workers else None,
            worker_init_fn=_init_worker if num_workers else None,
            multiprocessing_context=multiprocessing_context if num_workers else None,
            # its own generator: the workers' base seed is drawn from it, not from torch's global RNG,
            # which the training trajectory owns (a resumed run makes more loaders than an uninterrupted one)
            generator=torch.Generator())
        self._closed = False
        # The DataLoader's iterator once started, held by this list, which the finalizer holds too, so that
        # the iterator is never collected as part of a garbage cycle (the plan stream is often a generator
        # of the object that owns this loader): there the queues' own finalizers would close them first,
        # the workers would never get the stop message, and shutting down would wait for them forever. The
        # finalizer runs on close(), on collection, and at exit in multiprocessing's exit handler, before
        # that terminates (SIGTERM, ignored by the workers) and joins the workers, and before the queues'
        # own exit finalizers (priority 10) close them; in this process only.
        self._started: list = []
        self._finalize = Finalize(self, _shut_down, args=(self._started,), exitpriority=100)

    def __iter__(self) -> Iterator[Tuple[MicroBatchPlan, dict, list]]:
        return self

    def __next__(self) -> Tuple[MicroBatchPlan, dict, list]:
        if self._closed:
            raise RuntimeError("the micro-batch loader is closed (make a new one to continue)")
        if not self._started:
            self._started.append(iter(self._loader))  # starts the workers, which prefetch at once
        try:
            batch, bad, error = next(self._started[0])
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
        self._finalize()  # (once; a no-op in a forked process: the workers are the parent's)

"""Loading planned micro-batches in order (the contract between the batch plan and the loader).

INTERFACE STUB for issue 13: this synchronous version loads in the calling process; the real one
runs `torch.utils.data.DataLoader` worker processes (data.num_workers), pinned memory and prefetch,
with exactly the same results.

A `MicroBatchPlan` says which samples one micro-batch holds: `rows` [B] lists of dataset indices
(one index per row when unpacked, several when packed), and `state_after`, the sampler state once
this micro-batch is consumed (what a checkpoint saved after it records). The loader yields
`(plan, batch, bad)` in plan order:
- batch = collate(rows of samples), a sample being fetch(index);
- bad = [(index, DataError)] of samples that could not be loaded: with skip_bad they are dropped
  from their row (an unpacked row then holds no sample; `collate` pads it); without skip_bad the
  loader raises the first DataError itself (the original exception, never a worker traceback).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, NamedTuple, Tuple

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


class MicroBatchLoader:
    def __init__(self, plans: Iterable[MicroBatchPlan], fetch: Callable[[int], Any],
                 collate: Callable[[List[List[Any]]], dict], *, skip_bad: bool = False, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        self._plans = iter(plans)
        self.fetch, self.collate, self.skip_bad = fetch, collate, skip_bad

    def __iter__(self) -> Iterator[Tuple[MicroBatchPlan, dict, list]]:
        return self

    def __next__(self) -> Tuple[MicroBatchPlan, dict, list]:
        plan = next(self._plans)
        rows, bad = load_rows(plan.rows, self.fetch, self.skip_bad)
        return plan, self.collate(rows), bad

    def close(self) -> None:
        """Stop the workers (a new loader is made to continue from another position)."""

"""This rank's micro-batches of the global stream, as `MicroBatchPlan`s (data/loader.py).

The global row stream. Unpacked, row k of the stream is sample k of the `SampleStream`
(data/mixture.py). Packed (data.packing=pack), the sample stream is cut into windows of
`pack_window` samples and each window is packed on its own by `pack_rows(lengths, seq_len)`
(data/packing.py); the row stream is the windows' rows in order. A window is a pure function of the
stream's state at its start, so every rank packs every window identically.

Sharding, as `ResumableSampler` does it: a micro-step takes the next micro_batch_size x dp rows of
the global row stream and data-parallel rank d takes rows d, d + dp, ... of them. A step of A
micro-steps is then A x micro_batch_size x dp consecutive rows whatever dp is: the global batch, and
so the trajectory, do not depend on the number of processes (dp2 x mb2 trains what dp1 x mb4 does).

State (in checkpoints, identical on every rank): the sample stream's state (today's sampler state
for one file), when packed taken at the current window's start plus `window_row`, the rows of that
window already consumed; and `stats`, running global totals since the stage began (rows, samples,
padding tokens, samples per mixture component) for the log.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, List, Optional

import numpy as np

from .loader import MicroBatchPlan
from .mixture import SampleStream


def _empty_stats(num_components: int) -> dict:
    return {"rows": 0, "samples": 0, "padding_tokens": 0, "component_samples": [0] * num_components}


class BatchPlan:
    def __init__(self, stream: SampleStream, lengths: np.ndarray, seq_len: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, packed: bool = False, pack_window: int = 256,
                 packer: Optional[Callable[[np.ndarray, int], List[List[int]]]] = None):
        """lengths [num global ids]: unpadded sample lengths; packer: `pack_rows` (the default, packed only)."""
        assert 0 <= dp_rank < dp_size and micro_batch_size >= 1 and pack_window >= 1
        self.stream, self.lengths, self.seq_len = stream, np.asarray(lengths), int(seq_len)
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.packed, self.pack_window = packed, pack_window
        if packed and packer is None:
            from .packing import pack_rows as packer
        self.packer = packer
        self.stats = _empty_stats(stream.num_components)
        self._window_start = stream.state_dict()  # packed: the stream's state at the current window's start
        self._window_rows: List[List[int]] = []  # packed: the current window's rows of global ids
        self._window_row = 0

    # ---- the global row stream
    def _next_window(self) -> None:
        self._window_start = self.stream.state_dict()
        ids = self.stream.take(self.pack_window)  # [W]
        rows = self.packer(self.lengths[ids], self.seq_len)
        assert sorted(p for row in rows for p in row) == list(range(len(ids))), "pack_rows lost or repeated a sample"
        self._window_rows, self._window_row = [[int(ids[p]) for p in row] for row in rows], 0

    def _global_rows(self, n: int) -> List[List[int]]:
        if not self.packed:
            return [[int(i)] for i in self.stream.take(n)]
        rows = []
        while len(rows) < n:
            if self._window_row >= len(self._window_rows):
                self._next_window()
            take = self._window_rows[self._window_row:self._window_row + n - len(rows)]
            rows += take
            self._window_row += len(take)
        return rows

    def _count(self, rows: List[List[int]]) -> None:
        ids = np.array([i for row in rows for i in row], dtype=np.int64)
        used = int(self.lengths[ids].sum()) if len(ids) else 0
        s = self.stats
        s["rows"] += len(rows)
        s["samples"] += len(ids)
        s["padding_tokens"] += max(0, len(rows) * self.seq_len - used)
        for c, n in zip(*np.unique(self.stream.component_of(ids), return_counts=True)):
            s["component_samples"][int(c)] += int(n)

    # ---- iteration
    def __iter__(self) -> Iterator[MicroBatchPlan]:
        return self

    def __next__(self) -> MicroBatchPlan:
        rows = self._global_rows(self.micro_batch_size * self.dp_size)
        self._count(rows)
        return MicroBatchPlan(rows[self.dp_rank::self.dp_size], self.state_dict())

    # ---- checkpoints
    def state_dict(self) -> dict:
        if self.packed:
            state = {**self._window_start, "window_row": self._window_row}
        else:
            state = self.stream.state_dict()
        return {**state, "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state` (a plan's state_after, or a sampler state of earlier versions)."""
        stream_state = {k: v for k, v in state.items() if k not in ("stats", "window_row")}
        self.stream.load_state_dict(stream_state)
        stats = state.get("stats") or _empty_stats(self.stream.num_components)
        self.stats = copy.deepcopy(stats)
        self._window_rows, self._window_row, self._window_start = [], 0, self.stream.state_dict()
        if self.packed and state.get("window_row", 0) > 0:  # re-pack the window and skip its consumed rows
            self._next_window()
            self._window_row = int(state["window_row"])

"""Collectives that an asynchronous backend (NCCL) has been handed but not finished.

On NCCL a collective returns as soon as it is enqueued: the `collective(...)` region around it ends
at once, and a hang shows up later, as a host blocked in a CUDA synchronisation (`.item()`,
`.tolist()`, a barrier) or not at all until NCCL's own watchdog kills the process at the group
timeout. So each region left on such a backend leaves a `PendingCollective`: its label, step and
ranks, when it was left, and a completion object recorded after it on the stream (a CUDA event:
`query()` tells, without blocking, whether the GPU got past it). The heartbeat thread asks
`PendingCollectives.overdue` once per beat:

  * the oldest region whose completion has not signalled for `deadline_s` after the host left it is
    the collective that hangs (events on one stream complete in order, so everything before it is done);
  * a host that stays inside a region (blocked in a synchronisation on a collective issued in it)
    leaves no completion yet: the heartbeat thread then records a probe, at most one outstanding,
    and a probe unsignalled for `deadline_s` names the region the host was in when it was recorded.

The probe is the one CUDA call of the heartbeat thread: an event record, which blocks only when the
launch queue is full (a host thousands of kernels ahead of a hung one); its heartbeats then stop and
peers report this rank as frozen, while NCCL's watchdog still ends it at the timeout. Regions left
during a CUDA-graph capture would record into the graph (nothing here captures graphs).

Cost per region on NCCL: one event record, and once the list is longer than 16 one or two `query()`
calls (the training thread drops its completed head as it adds); no host synchronisation.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Protocol

# a list longer than this is trimmed of its completed head at each add (bounds the memory while the
# heartbeat thread sleeps; the first incomplete entry stops the trim, so it costs one query)
_TRIM_ABOVE = 16


class Completion(Protocol):
    def query(self) -> bool:
        """True once the GPU has run everything enqueued before this object was recorded."""


CompletionFactory = Callable[[], Completion]


@dataclass
class Region:
    """A `collective(...)` region the training thread is in."""
    what: str
    entered: float  # wall time
    group: object = None  # its ProcessGroup
    ranks: list[int] | None = None  # global ranks of its peers (None: the group's)


@dataclass
class PendingCollective:
    where: list[str]  # the region stack, outermost first
    region: Region  # the innermost region (its ranks, group, entry time)
    step: int | None
    left: float  # wall time the host left the region (or recorded the probe): the deadline counts from it
    done: Completion = field(repr=False)

    @property
    def label(self) -> str:
        return " > ".join(self.where)


def deadline_s(timeout_s: float, interval_s: float) -> float:
    """Seconds a collective may stay pending before this rank reports it: 0.8 x the group timeout,
    less two heartbeat intervals (the probe's start and the check's granularity), so the report
    comes before NCCL's watchdog aborts at `timeout_s`."""
    return max(0.8 * timeout_s - 2 * interval_s, 0.5 * timeout_s)


def cuda_completion(device) -> CompletionFactory:
    """Completions as CUDA events recorded on the caller's current stream of `device` (the training
    thread's stream at a region exit; the default stream, the same one here, for a probe)."""
    import torch

    def record() -> Completion:
        event = torch.cuda.Event()  # (no timing: cheaper to record and query)
        event.record(torch.cuda.current_stream(device))
        return event
    return record


class PendingCollectives:
    """The pending list: appended by the training thread, read by the heartbeat thread (a deque's
    append/popleft are atomic, and the reader works on a snapshot)."""

    def __init__(self, completion: CompletionFactory, deadline: float):
        self.completion, self.deadline = completion, deadline
        self._entries: collections.deque[PendingCollective] = collections.deque()
        self._probe: PendingCollective | None = None

    def add(self, stack: list[Region], step: int | None, now: float) -> None:
        """The innermost region of `stack` is being left (training thread): record a completion
        after its collectives."""
        self._entries.append(PendingCollective([r.what for r in stack], stack[-1], step, now, self.completion()))
        if len(self._entries) > _TRIM_ABOVE:
            while self._entries and self._entries[0].done.query():
                self._entries.popleft()

    def oldest(self) -> PendingCollective | None:
        """The oldest region exit not completed on the GPU (heartbeat thread)."""
        return next((e for e in list(self._entries) if not e.done.query()), None)

    def overdue(self, stack: list[Region], step: int | None, now: float) -> PendingCollective | None:
        """The collective pending past the deadline, if any (heartbeat thread). `stack`: the
        training thread's open regions now; inside one, a probe tells whether the GPU still moves."""
        oldest = self.oldest()
        if oldest is not None:
            return oldest if now - oldest.left >= self.deadline else None
        probe = self._probe
        if probe is not None and not probe.done.query():
            return probe if now - probe.left >= self.deadline else None
        # (no probe outstanding, or it completed: the GPU moves) a new one if the host is in a region
        self._probe = PendingCollective([r.what for r in stack], stack[-1], step, now, self.completion()) \
            if stack else None
        return None

    def record(self) -> dict | None:
        """The oldest pending collective for the heartbeat record (peers compare it with theirs)."""
        e = self.oldest()
        return None if e is None else {"where": e.where, "step": e.step, "since": e.region.entered}

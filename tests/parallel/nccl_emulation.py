"""NCCL's point-to-point rules emulated on gloo, so that an ordering deadlock shows on a CPU.

gloo runs every posted isend/irecv at once, whatever the order they were posted in (and matches
them by tag), so a pattern that deadlocks on NCCL completes on gloo. Inside
`nccl_p2p_semantics()` the `torch.distributed.isend / irecv / batch_isend_irecv` of this process
follow NCCL's rules instead:

  (a) the operations this rank posts to one peer run strictly in posting order, one at a time
      (one stream per peer communicator); operations to other peers are independent;
  (b) rendezvous, no eager buffer: a send completes only once the peer's matching receive runs
      (matched by order per direction, tags ignored, as NCCL does);
  (c) one `batch_isend_irecv` call is one NCCL group: its operations start together once every
      earlier operation to any of its peers is done, and progress concurrently.

A deadlock surfaces in `wait()` as `NcclOrderDeadlock` after `timeout_s`, naming what each peer's
queue holds. Use it in every process of the exchange:

    with nccl_p2p_semantics(timeout_s=3.0):
        ...code that calls dist.isend / dist.irecv / dist.batch_isend_irecv...

How: each posted call becomes a task in the queue of each of its peers; a task starts (in its own
thread, one more per operation) when it heads all of them. A running receive first sends its peer
a one-element READY message; a running send waits for that READY before its data moves. Both
travel over the caller's gloo group with tags of their own, so they cannot match other traffic.
`wait(timeout)`'s argument is ignored: every wait is bounded by `timeout_s`.
"""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

TAG_READY, TAG_DATA = 0x7E01, 0x7E02


class NcclOrderDeadlock(RuntimeError):
    """An operation did not complete within the timeout under NCCL's ordering rules."""


@dataclass
class _Op:
    kind: str  # "send" | "recv"
    tensor: torch.Tensor
    peer: int  # global rank
    group: object  # the ProcessGroup the caller named (None: the default group)
    state: str = "queued"  # for the deadlock message

    def describe(self) -> str:
        where = "to" if self.kind == "send" else "from"
        return f"{self.kind} {tuple(self.tensor.shape)} {where} rank {self.peer} ({self.state})"


class _Task:
    """One posted call: a single isend/irecv, or a whole batch."""

    def __init__(self, ops: list[_Op]):
        self.ops = ops
        self.peers = sorted({op.peer for op in ops})
        self.started = False
        self.done = threading.Event()
        self.error: BaseException | None = None

    def describe(self) -> str:
        return f"[{', '.join(op.describe() for op in self.ops)}]"


class _Work:
    """What the emulated calls return: wait() blocks until the task is done (or times out)."""

    def __init__(self, emulation: "_Emulation", task: _Task):
        self.emulation, self.task = emulation, task

    def wait(self, timeout=None) -> bool:
        if not self.task.done.wait(self.emulation.timeout_s) or self.task.error is not None:
            raise NcclOrderDeadlock(self.emulation.deadlock_message(self.task))
        return True

    def is_completed(self) -> bool:
        return self.task.done.is_set()


class _Emulation:
    def __init__(self, timeout_s: float, real_isend, real_irecv):
        self.timeout_s = timeout_s
        self.isend, self.irecv = real_isend, real_irecv
        self.lock = threading.Lock()
        self.queues: dict[int, deque[_Task]] = defaultdict(deque)  # peer -> its tasks, oldest first
        self.threads: list[threading.Thread] = []
        self.failed = False  # after a failure nothing more starts (order would be lost)

    def post(self, ops: list[_Op]) -> _Work:
        task = _Task(ops)
        with self.lock:
            for p in task.peers:
                self.queues[p].append(task)
            self._start_ready()
        return _Work(self, task)

    def _start_ready(self) -> None:
        """Start every task that heads the queue of each of its peers (lock held): rules (a), (c)."""
        for q in list(self.queues.values()):
            task = q[0] if q else None
            if task is None or task.started or not all(self.queues[p][0] is task for p in task.peers):
                continue
            task.started = True
            if self.failed:
                task.error = RuntimeError("not started: an earlier operation to the same peer failed")
                task.done.set()
                continue
            t = threading.Thread(target=self._run, args=(task,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, task: _Task) -> None:
        try:
            self._exchange(task)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the task
            task.error = e
        with self.lock:
            self.failed = self.failed or task.error is not None
            for p in task.peers:
                assert self.queues[p].popleft() is task
            task.done.set()
            self._start_ready()

    def _exchange(self, task: _Task) -> None:
        """All operations of the task at once, each in its own thread (no order among them)."""
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._one_op, args=(op, errors), daemon=True) for op in task.ops]
        for t in threads:
            t.start()
        for t in threads:  # (bounded: every gloo wait inside has a timeout)
            t.join()
        if errors:
            raise errors[0]

    def _one_op(self, op: _Op, errors: list) -> None:
        """Rule (b): a receive announces READY to its peer; a send waits for that READY before its
        data moves. (Waits 1 s longer than wait(), so that whoever waits on a stuck task gets the
        queues' picture rather than gloo's timeout.)"""
        wait_for = timedelta(seconds=self.timeout_s + 1)
        try:
            if op.kind == "recv":
                announced = self.isend(torch.zeros(1), op.peer, group=op.group, tag=TAG_READY)
                op.state = "receiving"
                self.irecv(op.tensor, op.peer, group=op.group, tag=TAG_DATA).wait(wait_for)
                announced.wait(wait_for)
            else:
                op.state = "waiting for the peer's matching receive"
                self.irecv(torch.empty(1), op.peer, group=op.group, tag=TAG_READY).wait(wait_for)
                op.state = "sending"
                self.isend(op.tensor, op.peer, group=op.group, tag=TAG_DATA).wait(wait_for)
            op.state = "done"
        except BaseException as e:  # noqa: BLE001 - re-raised by _exchange
            errors.append(e)

    def deadlock_message(self, task: _Task) -> str:
        with self.lock:
            queues = "; ".join(f"to/from rank {p}: " + ", ".join(t.describe() for t in q)
                               for p, q in sorted(self.queues.items()) if q)
        cause = "" if task.error is None else f" ({str(task.error).splitlines()[0][-200:]})"
        return (f"rank {dist.get_rank()}: {task.describe()} not done after {self.timeout_s:g} s under NCCL's "
                f"point-to-point rules (deadlock){cause}; posted operations by peer: {queues}")

    def close(self) -> None:
        for t in self.threads:  # (a timed-out task ends by its own gloo timeout)
            t.join(self.timeout_s + 5)


def _peer(group, rank, group_rank) -> int:
    assert rank is not None or group_rank is not None, "NCCL has no receive from any source"
    if rank is not None:
        return rank
    return dist.get_global_rank(group, group_rank)


@contextlib.contextmanager
def nccl_p2p_semantics(timeout_s: float = 5.0):
    """Within: dist.isend / irecv / batch_isend_irecv of this process follow NCCL's rules (above)."""
    real = dist.isend, dist.irecv, dist.batch_isend_irecv
    emu = _Emulation(timeout_s, real[0], real[1])

    def isend(tensor, dst=None, group=None, tag=0, group_dst=None):
        return emu.post([_Op("send", tensor, _peer(group, dst, group_dst), group)])

    def irecv(tensor, src=None, group=None, tag=0, group_src=None):
        return emu.post([_Op("recv", tensor, _peer(group, src, group_src), group)])

    def batch_isend_irecv(p2p_op_list):
        assert p2p_op_list, "batch_isend_irecv of an empty list"
        sends = (isend, real[0])
        work = emu.post([_Op("send" if op.op in sends else "recv", op.tensor, op.peer, op.group)
                         for op in p2p_op_list])
        return [work] * len(p2p_op_list)

    # (also in distributed_c10d, whose P2POp accepts only the isend/irecv found there)
    for module in (dist, c10d):
        module.isend, module.irecv, module.batch_isend_irecv = isend, irecv, batch_isend_irecv
    try:
        yield emu
    finally:
        for module in (dist, c10d):
            module.isend, module.irecv, module.batch_isend_irecv = real
        emu.close()

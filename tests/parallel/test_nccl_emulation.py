"""The NCCL point-to-point emulation itself (tests/parallel/nccl_emulation.py) on tiny exchanges:
each of its rules (a)-(c) turns a pattern that gloo alone completes into the deadlock NCCL has,
and leaves the patterns NCCL completes working, with the right data."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .dist_utils import run_distributed
from .nccl_emulation import NcclOrderDeadlock, nccl_p2p_semantics

# the deadlocks wait this long; the cases that complete get far longer (a loaded CI machine)
DEADLOCK_TIMEOUT_S, TIMEOUT_S = 1.5, 15.0


def _outcome(fn, timeout_s: float) -> str | list:
    """fn() under the emulation, in a fresh group of its own (a deadlock leaves stale buffers):
    its result, or 'deadlock' if it timed out."""
    group = dist.new_group([0, 1])
    try:
        with nccl_p2p_semantics(timeout_s):
            return fn(group)
    except NcclOrderDeadlock:
        return "deadlock"


def _two_rank_cases(rank, world_size):
    other = 1 - rank
    mine = lambda: torch.full((4,), float(rank))  # noqa: E731
    got = {}

    def send_then_recv(g):  # rules (a) + (b): each receive queues behind a send that waits for it
        buf = torch.empty(4)
        works = [dist.isend(mine(), other, group=g), dist.irecv(buf, other, group=g)]
        for w in works:
            w.wait()
        return buf.tolist()

    def opposite_orders(g):  # rank 0 receives first: each send meets a running receive
        buf, works = torch.empty(4), []
        for kind in (("recv", "send") if rank == 0 else ("send", "recv")):
            works.append(dist.irecv(buf, other, group=g) if kind == "recv" else dist.isend(mine(), other, group=g))
        for w in works:
            w.wait()
        return buf.tolist()

    def batched(g):  # rule (c): one group, send and receive start together
        buf = torch.empty(4)
        ops = [dist.P2POp(dist.isend, mine(), other, g), dist.P2POp(dist.irecv, buf, other, g)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        return buf.tolist()

    def batch_behind_earlier_send(g):  # rule (c): a group waits for the earlier operations to its peer
        buf = torch.empty(4)
        if rank == 0:
            first = dist.isend(mine(), other, group=g)
            works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, other, g)])
            first.wait()
        else:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine(), other, g)])
            works += [dist.irecv(buf, other, group=g)]
        for w in works:
            w.wait()
        return buf.tolist()

    def late_receive(g):  # rule (b): a send lasts until the peer's receive runs (0.6 s later here)
        t0 = time.perf_counter()
        if rank == 0:
            dist.isend(mine(), other, group=g).wait()
        else:
            time.sleep(0.6)
            dist.irecv(torch.empty(4), other, group=g).wait()
        return time.perf_counter() - t0

    for fn in (send_then_recv, batch_behind_earlier_send):
        got[fn.__name__] = _outcome(fn, DEADLOCK_TIMEOUT_S)
    for fn in (opposite_orders, batched, late_receive):
        got[fn.__name__] = _outcome(fn, TIMEOUT_S)
    got["send_then_recv on gloo"] = send_then_recv(None)  # gloo runs the receive at once
    return got


def _ring_cases(rank, world_size):
    """4 ranks in a ring, each sending to the next and receiving from the previous peer as two
    separate calls, send first: independent peers (rule (a) is per peer), so no deadlock."""
    group = dist.new_group(list(range(world_size)))
    buf = torch.empty(3)
    with nccl_p2p_semantics(TIMEOUT_S):
        send = dist.isend(torch.full((3,), float(rank)), (rank + 1) % world_size, group=group)
        recv = dist.irecv(buf, (rank - 1) % world_size, group=group)
        send.wait()
        recv.wait()
    return buf.tolist()


def test_emulation_rules_on_two_ranks():
    res = run_distributed(_two_rank_cases, 2, timeout=60)
    for rank, got in enumerate(res):
        other = [float(1 - rank)] * 4
        assert got["send_then_recv"] == "deadlock", (rank, got)
        assert got["send_then_recv on gloo"] == other, (rank, got)
        assert got["opposite_orders"] == other, (rank, got)
        assert got["batched"] == other, (rank, got)
        assert got["batch_behind_earlier_send"] == "deadlock", (rank, got)
    # rank 0's send waited for rank 1's receive, posted 0.6 s late
    assert 0.55 < res[0]["late_receive"], res[0]


def test_emulation_keeps_peers_independent():
    res = run_distributed(_ring_cases, 4, timeout=60)
    assert res == [[float((r - 1) % 4)] * 3 for r in range(4)], res

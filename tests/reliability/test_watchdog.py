"""The watchdog's diagnosis, in one process: heartbeat records on an in-memory store stand for the
other ranks (tests/reliability/test_distributed_faults.py runs the real thing in two processes)."""
import json
import time

import pytest
import torch.distributed as dist

from megatron_evomoe.parallel import watchdog as wd_mod
from megatron_evomoe.parallel.watchdog import DistributedFaultError, Watchdog

GLOO_TIMEOUT = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1000ms for recv "
                            "operation to complete")
GLOO_RESET = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2471: Connection reset by "
                          "peer. This is typically caused by a remote worker hanging or bugs in the application.")


def record(store, rank, **fields):
    rec = {"beat": 1, "time": time.time(), "pid": 4242, "host": "node7", "step": 5, "where": [], "since": time.time(),
           "last": None, "exited": None, **fields}
    store.set(f"evomoe/watchdog/rank{rank}", json.dumps(rec))


def fail_inside(wd, what, err, ranks=(0, 1, 2)):
    with pytest.raises(DistributedFaultError) as info:
        with wd.region(what, ranks=list(ranks)):
            raise err
    return str(info.value)


@pytest.fixture
def store():
    return dist.HashStore()


def test_each_peer_is_classified(store):
    me = Watchdog(store, 0, 4, timeout_s=1.0)  # heartbeat every 0.2 s: a dead peer is seen within 1 s
    me.step = 6
    record(store, 1, step=5, where=[], last="all_reduce(losses) on the data-parallel group",
           since=time.time() - 30)  # frozen record: dead
    record(store, 2, exited="CheckpointError: bad file")
    # rank 3: a live peer (its own heartbeat thread), stuck in another collective one step behind
    peer = Watchdog(store, 3, 4, timeout_s=1.0)
    peer.step = 5
    with peer.region("barrier (rank 0 prepares the data first)"):
        peer.start()
        try:
            msg = fail_inside(me, "all_reduce(token count) on the data-parallel group", GLOO_TIMEOUT, (0, 1, 2, 3))
        finally:
            peer.stop()
    assert msg.startswith("rank 0: all_reduce(token count) on the data-parallel group (ranks 0, 1, 2, 3) at step 6 "
                          "failed after 0.0 s (Timed out waiting 1000ms for recv operation to complete): "), msg
    assert "rank 1 stopped responding (last heartbeat " in msg and "pid 4242 on node7, at step 5): it died" in msg
    assert "rank 2 exited (CheckpointError: bad file)" in msg
    assert "rank 3 is alive but did not join, at step 5: it has been in barrier (rank 0 prepares the data first) " \
           "for" in msg, msg


def test_peers_waiting_in_the_same_collective_are_not_blamed(store):
    me = Watchdog(store, 0, 3, timeout_s=1.0)
    record(store, 1, beat=1, step=None, where=["all_reduce(x)"])  # (frozen: dead)
    peer = Watchdog(store, 2, 3, timeout_s=1.0)
    with peer.region("all_reduce(x)"):
        peer.start()
        try:
            msg = fail_inside(me, "all_reduce(x)", GLOO_RESET)
        finally:
            peer.stop()
    assert "(Read error [127.0.0.1]:2471: Connection reset by peer)" in msg  # gloo's advice dropped
    assert "rank 1 stopped responding" in msg and "rank 2" not in msg.split("):", 1)[1], msg


def test_missing_peer_and_unreachable_store(store):
    me = Watchdog(store, 0, 2, timeout_s=1.0)
    assert "rank 1 never sent a heartbeat" in fail_inside(me, "barrier", GLOO_RESET, (0, 1))

    class Gone:
        def check(self, keys):
            raise dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed.")
    me.store, me.store_addr = Gone(), "10.0.0.1:29500"
    msg = fail_inside(me, "barrier", GLOO_RESET, (0, 1))
    assert "the rendezvous store at 10.0.0.1:29500 is unreachable (DistNetworkError" in msg
    assert "rank 0 when not launched by torchrun" in msg


def test_regions_nest_and_only_communication_errors_are_converted(store):
    me = Watchdog(store, 0, 2, timeout_s=1.0)
    record(store, 1, exited="finished")
    with pytest.raises(ValueError, match="shape"):  # not a communication failure: untouched
        with me.region("forward/backward"):
            raise ValueError("shape mismatch")
    with pytest.raises(RuntimeError, match="^mat1 and mat2"):
        with me.region("forward/backward"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(DistributedFaultError) as info:
        with me.region("forward/backward (step 3)"):
            with me.region("all_to_all(tokens) on the expert-parallel group", ranks=[0, 1]):
                raise GLOO_RESET
    assert str(info.value).startswith("rank 0: forward/backward (step 3) > all_to_all(tokens) on the "
                                      "expert-parallel group (ranks 0, 1) failed after")
    assert "rank 1 exited (finished)" in str(info.value)
    assert me._stack == [] and me._last[0] == "forward/backward (step 3)"


def test_collective_is_a_no_op_without_a_started_watchdog(store):
    assert wd_mod.active() is None
    with pytest.raises(RuntimeError, match="Timed out"):  # left as the backend raised it
        with wd_mod.collective("all_reduce(x)"):
            raise GLOO_TIMEOUT
    me = Watchdog(store, 0, 2, timeout_s=1.0).start()
    try:
        assert wd_mod.active() is me
        wd_mod.set_step(9)
        assert me.step == 9 and json.loads(store.get("evomoe/watchdog/rank0"))["beat"] >= 1
    finally:
        me.stop("finished")
    assert wd_mod.active() is None and json.loads(store.get("evomoe/watchdog/rank0"))["exited"] == "finished"

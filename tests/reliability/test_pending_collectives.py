"""The asynchronous (NCCL) path of the watchdog, simulated on CPU: a fake stream whose completions
stop signalling from the moment it "hangs" stands for CUDA events behind a hung NCCL kernel; peers
are heartbeat records (or live watchdogs) on an in-memory store, as in test_watchdog.py."""
import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatron_evomoe.parallel import pending_collectives as pc
from megatron_evomoe.parallel.launch import set_nccl_error_handling
from megatron_evomoe.parallel.watchdog import EXIT_CODE_DISTRIBUTED_FAULT, Watchdog
from tests.reliability.harness import ROOT, free_port
from tests.reliability.test_watchdog import record

A2A = "all_to_all(tokens to their experts) on the expert-parallel group"


class FakeStream:
    """Completions in stream order: those recorded before `hang()` signal, those after never do."""

    def __init__(self):
        self.num_recorded, self.hung_at = 0, None

    def __call__(self):
        self.num_recorded += 1
        return FakeEvent(self, self.num_recorded)

    def hang(self):
        self.hung_at = self.num_recorded


class FakeEvent:
    def __init__(self, stream, index):
        self.stream, self.index = stream, index

    def query(self):
        return self.stream.hung_at is None or self.index <= self.stream.hung_at


def watchdog(store, rank, world_size, stream, timeout_s=1.0):
    faults = []
    wd = Watchdog(store, rank, world_size, timeout_s, completion=stream, on_fault=faults.append)
    return wd, faults


def report(wd, faults, now):
    """check_pending as the heartbeat thread runs it, then wait for the report (a thread of its own)."""
    overdue = wd.check_pending(now)
    deadline = time.time() + 10
    while overdue is not None and not faults and time.time() < deadline:
        time.sleep(0.02)
    return overdue


def gpu_in(store, rank, where, step):
    """A peer whose GPU is stuck in the collective `where`, its host gone on (the caller starts it)."""
    peer = Watchdog(store, rank, 5, timeout_s=1.0, completion=FakeStream())
    peer.step, peer.pending.deadline = step, float("inf")  # (it does not report itself here)
    peer.pending.completion.hang()
    with contextlib.ExitStack() as regions:
        for what in where:
            regions.enter_context(peer.region(what, ranks=[0, 1, 2, 3, 4]))
    return peer


@pytest.fixture
def store():
    return dist.HashStore()


def test_deadline_comes_before_nccls_timeout():
    assert pc.deadline_s(600.0, 5.0) == 470.0  # + at most two 5 s beats late: 480 s = 0.8 x 600
    assert pc.deadline_s(20.0, 2.0) == 12.0
    assert pc.deadline_s(1.0, 0.2) == 0.5  # (floor: half the timeout)


def test_completed_collectives_are_not_reported(store):
    stream = FakeStream()
    me, faults = watchdog(store, 0, 2, stream)
    for i in range(40):  # the GPU keeps up: the list is trimmed as it grows
        with me.region(f"all_reduce(gradients, bucket {i}) on the data-parallel group"):
            pass
    assert len(me.pending._entries) <= pc._TRIM_ABOVE + 1
    with me.region("stage 'router' POPE evaluation (tensor/expert-parallel collectives)"):
        assert me.check_pending(time.time()) is None  # records a probe: the host is in a region
        assert me.check_pending(time.time() + 100) is None  # long region, but the probe signalled
    assert me.check_pending(time.time() + 100) is None and faults == []
    assert me.pending.oldest() is None and stream.num_recorded == 40 + 2 + 1  # exits, probes, POPE
    me._publish()
    assert json.loads(store.get("evomoe/watchdog/rank0"))["pending"] is None


def test_collective_pending_past_the_deadline_names_rank_collective_step_and_peers(store, caplog):
    stream = FakeStream()
    me, faults = watchdog(store, 0, 5, stream)
    me.step = 7
    with me.region("all_reduce(token count) on the data-parallel group"):
        pass  # completes: not reported
    stream.hang()
    with me.region("forward/backward"):
        with me.region(A2A, ranks=[0, 1, 2, 3, 4]):
            pass  # NCCL: returns at once, the GPU never gets past it
    record(store, 1, step=7, since=time.time() - 30)  # frozen record: dead
    hung = Watchdog(store, 2, 5, timeout_s=1.0)  # beating, outside any collective
    hung.step, hung._last = 7, ("all_reduce(losses) on the data-parallel group", time.time() - 2)
    waiting = gpu_in(store, 3, ["forward/backward", A2A], step=7)  # host ahead, its GPU in the same a2a
    behind = gpu_in(store, 4, ["all_reduce(gradients) on the data-parallel group"], step=6)  # its GPU elsewhere
    behind.step = 7
    oldest = me.pending.oldest()
    assert oldest.where == ["forward/backward", A2A] and oldest.step == 7
    assert me.check_pending(oldest.left + 0.4) is None  # before the deadline (0.5 s)
    for peer in (hung, waiting, behind):
        peer.start()
    try:
        with caplog.at_level(logging.ERROR, logger="megatron_evomoe"):
            assert report(me, faults, oldest.left + 1.3) is oldest
    finally:
        for peer in (hung, waiting, behind):
            peer.stop()
    [msg] = faults
    assert msg.startswith(f"rank 0: forward/backward > {A2A} (ranks 0, 1, 2, 3, 4) at step 7 failed after 1.3 s "
                          "(still running on the GPU, reported before NCCL's 1 s timeout aborts it): rank 1 stopped "
                          "responding (last heartbeat "), msg
    assert "pid 4242 on node7, at step 7): it died or is frozen; rank 2 is alive but did not join, at step 7: it " \
           "has been outside any collective for " in msg, msg
    assert " s (last: all_reduce(losses) on the data-parallel group), i.e. hung or still computing; rank 4 is " \
           "alive but did not join, at step 7: its GPU has been in all_reduce(gradients) on the data-parallel group " \
           "(step 6) for " in msg, msg
    assert "rank 3" not in msg  # waiting in the same collective: not blamed
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [f"distributed error: {msg}"]
    mine = json.loads(store.get("evomoe/watchdog/rank0"))
    assert mine["exited"] == f"DistributedFaultError: {msg[:200]}"
    me._publish()  # a later beat does not hide why this rank exits
    assert json.loads(store.get("evomoe/watchdog/rank0"))["exited"] == mine["exited"]


def test_host_blocked_inside_a_region_is_reported_by_a_probe(store):
    stream = FakeStream()
    me, faults = watchdog(store, 0, 2, stream)
    me.step = 3
    record(store, 1, exited="KeyboardInterrupt")
    stream.hang()  # e.g. the flags' .item() behind a hung all_reduce: the region never ends
    with me.region("all_reduce(stop and bad-sample flags) over all ranks"):
        t0 = time.time()
        assert me.check_pending(t0) is None and me.pending._probe is not None
        assert me.check_pending(t0 + 0.3) is None  # probe outstanding, not yet overdue
        probe = me.pending._probe
        assert report(me, faults, probe.left + 2.0) is probe
    assert faults == ["rank 0: all_reduce(stop and bad-sample flags) over all ranks (ranks 0, 1) at step 3 failed "
                      "after 2.0 s (still running on the GPU, reported before NCCL's 1 s timeout aborts it): rank 1 "
                      "exited (KeyboardInterrupt)"]


def test_a_failing_completion_query_stops_the_checks_not_the_heartbeats(store, caplog):
    class Broken:
        def query(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    me, faults = watchdog(store, 0, 2, Broken)
    with me.region("all_reduce(x)"):
        pass
    with caplog.at_level(logging.WARNING, logger="megatron_evomoe"):
        me.start()
        try:
            first = json.loads(store.get("evomoe/watchdog/rank0"))["beat"]
            time.sleep(1.0)  # 5 intervals
            assert json.loads(store.get("evomoe/watchdog/rank0"))["beat"] >= first + 2
        finally:
            me.stop()
    assert faults == [] and [r.getMessage() for r in caplog.records] == [
        "watchdog: rank 0 stops following its pending collectives (RuntimeError: CUDA error: an illegal memory access "
        "was encountered)"]


def test_nccl_error_handling_is_set_unless_the_user_did():
    env = {}
    assert set_nccl_error_handling(env) == "TORCH_NCCL_ASYNC_ERROR_HANDLING=3" and env == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    env = {"NCCL_ASYNC_ERROR_HANDLING": "1"}  # the deprecated name still counts
    assert set_nccl_error_handling(env) == "NCCL_ASYNC_ERROR_HANDLING=1" and env == {"NCCL_ASYNC_ERROR_HANDLING": "1"}


CHILD = """
import logging, sys, time
sys.path.insert(0, {root!r})
from megatron_evomoe.parallel.watchdog import start_watchdog
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
class Never:
    def query(self):
        return False
wd = start_watchdog(0, 2, 1.0, "127.0.0.1", {port}, environ={{}}, completion=Never)
wd.step = 4
with wd.region("all_reduce(gradients) on the data-parallel group"):
    pass
time.sleep(60)  # as if blocked in a CUDA synchronisation behind the hung kernel
"""


def test_the_rank_exits_with_the_message_and_its_peers_learn_why(tmp_path):
    """A real process: the report from its heartbeat thread, os._exit with the fault status."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    peer = Watchdog(store, 1, 2, timeout_s=1.0, prefix="evomoe/watchdog/run/0")
    peer.step = 4  # rank 1: alive, hung outside any collective
    peer.start()
    try:
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD.format(root=str(ROOT), port=port))],
                               capture_output=True, text=True, timeout=60)
        exited = json.loads(store.get("evomoe/watchdog/run/0/rank0"))["exited"]
        seen_by_peer = peer.diagnose("all_reduce(gradients) on the data-parallel group", [0, 1], "x", 0.0, 4,
                                     ["all_reduce(gradients) on the data-parallel group"])
    finally:
        peer.stop()
    assert child.returncode == EXIT_CODE_DISTRIBUTED_FAULT, child.stderr
    [line] = [x for x in child.stderr.splitlines() if "distributed error:" in x]
    assert " ERROR distributed error: rank 0: all_reduce(gradients) on the data-parallel group (ranks 0, 1) at " \
           "step 4 failed after " in line, line
    assert "rank 1 is alive but did not join, at step 4: it has been outside any collective for " in line, line
    assert exited.startswith("DistributedFaultError: rank 0: all_reduce(gradients) on the data-parallel group")
    assert "rank 0 exited (DistributedFaultError: rank 0: all_reduce(gradients)" in seen_by_peer


@pytest.mark.gpu
def test_cuda_completions_follow_the_stream_without_blocking_the_host():
    """On a GPU: a region left behind a long kernel (standing for a collective in flight) is pending
    until the kernel ends, seen from another thread as the heartbeat sees it; a region exit costs
    microseconds."""
    pending = pc.PendingCollectives(pc.cuda_completion(torch.device("cuda", torch.cuda.current_device())), 1.0)
    region = pc.Region("all_reduce(x)", time.time())
    torch.cuda._sleep(int(2e9))  # about a second of GPU time
    t0 = time.perf_counter()
    pending.add([region], 1, time.time())
    seen = []  # (the oldest pending, a probe recorded) from a thread of its own, as the heartbeat does
    thread = threading.Thread(target=lambda: seen.extend([pending.oldest(), pending.completion()]))
    thread.start(), thread.join()
    assert time.perf_counter() - t0 < 0.2  # nothing waited for the kernel
    assert seen[0] is not None and not seen[1].query()
    torch.cuda.synchronize()
    assert pending.oldest() is None and seen[1].query()
    t0 = time.perf_counter()
    for _ in range(1000):
        pending.add([region], 1, time.time())
    per_add = (time.perf_counter() - t0) / 1000
    torch.cuda.synchronize()
    assert per_add < 50e-6, f"{per_add * 1e6:.1f} us per region exit"


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_launch_sets_nccl_error_handling_before_the_group_and_follows_completions(monkeypatch, backend):
    """init_distributed's wiring, without NCCL: what init_process_group and start_watchdog receive."""
    from megatron_evomoe.parallel import launch
    from tests.parallel.common import tiny_cfg
    seen = {}
    # (a copy: what init_distributed sets there does not outlive the test)
    kept = {k: v for k, v in os.environ.items() if k not in launch.NCCL_ERROR_HANDLING_VARS}
    monkeypatch.setattr(os, "environ", kept)
    monkeypatch.setattr(launch, "resolve_backend", lambda requested: backend)
    monkeypatch.setattr(launch.torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.dist, "init_process_group", lambda *a, **k: seen.update(
        handling=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"), timeout=k["timeout"]))
    monkeypatch.setattr(launch, "start_watchdog", lambda *a, **k: seen.update(completion=k["completion"]))
    monkeypatch.setattr(launch.ParallelState, "build", classmethod(lambda cls, cfg, rank, world_size: Described()))
    launch.init_distributed(tiny_cfg(extra=["--parallel.timeout_s=42"]), environ={
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    assert seen["timeout"] == timedelta(seconds=42)
    if backend == "nccl":
        assert seen["handling"] == "3" and callable(seen["completion"])
    else:
        assert seen["handling"] is None and seen["completion"] is None


class Described:
    def describe(self):
        return "tp=1 pp=1 dp=2"

"""Rank death and hang detection: heartbeats on the rendezvous store, and collectives that fail
with a message naming the rank that died or hung instead of a bare backend error (or a hang).

    wd = Watchdog(store, rank, world_size, timeout_s).start()      # launch.init_distributed does this
    with collective("all_reduce(gradients) on the data-parallel group", group):
        dist.all_reduce(flat, group=group)
    wd.stop("finished")

How a fault surfaces. Every process group is created with `parallel.timeout_s`, so a collective
whose peer died raises at once (gloo: "Connection reset/closed by peer") and one whose peer is
stuck raises after the timeout (gloo: "Timed out waiting ... for recv"). `collective` turns that
RuntimeError into a `DistributedFaultError` after asking the store about the group's other ranks:

  * a rank whose heartbeat does not advance while we watch it is dead (or frozen with the GIL held);
  * a rank whose heartbeat advances but which is not in the same collective is hung or elsewhere:
    the message says where it is (its innermost `collective` region, or "outside any collective")
    and since when;
  * a rank that stopped its watchdog says why ("exited: ...").

Each rank's background thread writes one small record (JSON: beat counter, wall time, current
region stack, step) every `interval_s` (timeout/10, clamped to [0.2, 5] s). Records live under a
key prefix that includes torchrun's restart count, so an elastic restart does not read the
previous attempt's records. The store connection is our own client of the rendezvous TCPStore
(MASTER_ADDR:MASTER_PORT): torchrun's agent hosts it, so it outlives any worker; without torchrun
rank 0 hosts it, and when rank 0 is gone the message says the store is unreachable instead.

On NCCL (asynchronous: a collective returns once enqueued) the failure does not come back through
the region; instead each region left leaves a completion (a CUDA event) in a pending list
(`pending_collectives.py`), and the heartbeat thread, independent of the collective calls, reports
a collective still pending `deadline_s` (0.8 x timeout, less two intervals) after it was issued: the
same diagnosis and one-line message, logged at ERROR, written to this rank's record (its peers then
say why it exited), then `os._exit(EXIT_CODE_DISTRIBUTED_FAULT)`. Exiting from a background thread,
not raising in the training thread: that thread is typically blocked in a CUDA synchronisation behind
the hung NCCL kernel, where no Python exception can reach it, and a normal shutdown (finally blocks,
destroy_process_group, atexit) could block on the same stream. The group timeout stays the backstop:
NCCL's own watchdog aborts at `timeout_s` if this thread cannot run.

The active watchdog is per process (like the default process group), so the layers that
communicate (pipeline P2P, expert all-to-all) can name their collective without being handed it;
with no watchdog started (one process, unit tests) `collective` does nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from .pending_collectives import CompletionFactory, PendingCollective, PendingCollectives, Region, deadline_s

log = logging.getLogger("megatron_evomoe")

# Substrings of the RuntimeErrors gloo/NCCL/c10d raise when a peer is gone or a wait timed out;
# any other RuntimeError inside a region (a shape bug, say) is re-raised untouched.
_COMM_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "socket",
                 "processgroup", "peer")


class DistributedFaultError(RuntimeError):
    """A collective failed or timed out; the message names the collective and the ranks at fault."""


# the exit status of a rank that stops on a distributed fault: the status pretrain_evomoe.py returns for
# a DistributedFaultError, so a launcher reads both paths alike (and neither as NCCL's SIGABRT)
EXIT_CODE_DISTRIBUTED_FAULT = 3

_ACTIVE: "Watchdog | None" = None


def active() -> "Watchdog | None":
    return _ACTIVE


def collective(what: str, group=None, ranks: list[int] | None = None):
    """Context around communication: a failure inside becomes a DistributedFaultError naming
    `what` and the dead or hung ranks among its peers: `ranks` (global ranks, e.g. the neighbours
    of a P2P exchange), else the ranks of `group` (a ProcessGroup; None: all ranks)."""
    wd = _ACTIVE
    return wd.region(what, group, ranks) if wd is not None else contextlib.nullcontext()


def set_step(step: int) -> None:
    """The trainer's current global step, published with the heartbeat (for the messages)."""
    if _ACTIVE is not None:
        _ACTIVE.step = step


def is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COMM_MARKERS)


def short_cause(err: BaseException) -> str:
    """The gist of a backend error: gloo prefixes a source path and appends advice."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0][:200]


def heartbeat_interval(timeout_s: float) -> float:
    return min(5.0, max(0.2, timeout_s / 10))


def _exit_process(message: str) -> None:
    os._exit(EXIT_CODE_DISTRIBUTED_FAULT)


class Watchdog:
    """`completion`: on an asynchronous backend, what records a completion after a region's
    collectives (`pending_collectives.cuda_completion`); None (gloo): its collectives raise.
    `on_fault(message)` runs once a pending collective was reported (default: exit the process)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, prefix: str = "evomoe/watchdog",
                 store_addr: str = "?", completion: CompletionFactory | None = None,
                 on_fault: Callable[[str], None] = _exit_process):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.interval_s = timeout_s, heartbeat_interval(timeout_s)
        self.prefix, self.store_addr = prefix, store_addr
        self.step: int | None = None
        self.pending = None if completion is None else \
            PendingCollectives(completion, deadline_s(timeout_s, self.interval_s))
        self._on_fault = on_fault
        self._faulted = False  # a pending collective was reported (once)
        self._final = False  # the last record (exited) is written: no beat may overwrite it
        self._stack: list[Region] = []  # innermost last
        self._last: tuple[str, float] | None = None  # the last region left, and when
        self._beat = 0
        self._lock = threading.Lock()  # one store request at a time (heartbeat thread vs diagnosis)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Watchdog":
        global _ACTIVE
        self._publish()  # before returning: peers that fail early still find this rank's record
        self._thread = threading.Thread(target=self._run, name=f"evomoe-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        _ACTIVE = self
        return self

    def stop(self, reason: str = "finished") -> None:
        """Stop beating and leave a last record saying why (peers then report 'exited: reason')."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)
        self._publish(exited=reason)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._publish()
            if self.pending is not None and not self._faulted:
                try:
                    self.check_pending(time.time())
                except Exception as e:  # noqa: BLE001 - e.g. a CUDA error: the training thread raises it too
                    self._faulted = True  # (stop checking; the heartbeats go on)
                    log.warning("watchdog: rank %d stops following its pending collectives (%s: %s)", self.rank,
                                type(e).__name__, short_cause(e))

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/rank{rank}"

    def _publish(self, exited: str | None = None) -> None:
        self._beat += 1
        stack, last = list(self._stack), self._last
        rec = {"beat": self._beat, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
               "step": self.step, "where": [o.what for o in stack], "since": stack[-1].entered if stack else
               (last[1] if last else self._started), "last": last[0] if last else None, "exited": exited,
               "pending": self._pending_record()}
        try:
            with self._lock:
                if self._final:
                    return
                self._final = exited is not None
                self.store.set(self._key(self.rank), json.dumps(rec))
        except Exception as e:  # noqa: BLE001 - the store host is gone: the diagnosis will say so
            if exited is None and self._beat <= 2:
                log.warning("watchdog: rank %d cannot write its heartbeat to %s (%s)", self.rank, self.store_addr, e)

    def _pending_record(self) -> dict | None:
        if self.pending is None:
            return None
        try:
            return self.pending.record()
        except Exception:  # noqa: BLE001 - a CUDA error: check_pending says so once; the beats go on
            return None

    def _read(self, rank: int) -> dict | None:
        with self._lock:
            if not self.store.check([self._key(rank)]):
                return None
            return json.loads(self.store.get(self._key(rank)))

    # ------------------------------------------------------------------ regions
    @contextlib.contextmanager
    def region(self, what: str, group=None, ranks: list[int] | None = None):
        self._stack.append(Region(what, time.time(), group, ranks))
        try:
            yield
            if self.pending is not None:  # (NCCL: its collectives may still be running on the GPU)
                self.pending.add(list(self._stack), self.step, time.time())
        except DistributedFaultError:
            raise  # an inner region already diagnosed it
        except Exception as e:
            if not is_comm_failure(e):
                raise
            waited = time.time() - self._stack[-1].entered
            where = self._where()  # outer regions give the context
            raise DistributedFaultError(self.diagnose(" > ".join(where), self._ranks(group, ranks), short_cause(e),
                                                      waited, self.step, where)) from e
        finally:
            self._last = (self._stack.pop().what, time.time())

    def _where(self) -> list[str]:
        return [o.what for o in self._stack]

    def _ranks(self, group, ranks: list[int] | None) -> list[int]:
        if ranks is not None:
            return ranks
        return dist.get_process_group_ranks(group) if group is not None else list(range(self.world_size))

    # ------------------------------------------------------------------ asynchronous collectives
    def check_pending(self, now: float) -> PendingCollective | None:
        """Heartbeat thread: report a collective pending past the deadline (in a thread of its own,
        so that the heartbeats go on while the diagnosis watches the peers')."""
        overdue = self.pending.overdue(list(self._stack), self.step, now)
        if overdue is not None:
            self._faulted = True
            threading.Thread(target=self._report_pending, args=(overdue, now), daemon=True,
                             name=f"evomoe-fault-{self.rank}").start()
        return overdue

    def pending_message(self, e: PendingCollective, now: float) -> str:
        """The message for `e`; 'failed after' counts from its region's entry, as for gloo."""
        cause = f"still running on the GPU, reported before NCCL's {self.timeout_s:g} s timeout aborts it"
        return self.diagnose(e.label, self._ranks(e.region.group, e.region.ranks), cause, now - e.region.entered,
                             e.step, e.where)

    def _report_pending(self, e: PendingCollective, now: float) -> None:
        message = self.pending_message(e, now)
        log.error("distributed error: %s", message)
        _flush_logs()
        self._publish(exited=f"{DistributedFaultError.__name__}: {short_cause(message)}")
        self._on_fault(message)

    # ------------------------------------------------------------------ diagnosis
    def diagnose(self, what: str, ranks: list[int], cause: str, waited: float, step: int | None,
                 where: list[str]) -> str:
        """The one-line message: `what` (on `ranks`, at `step`) failed after `waited` s because of
        `cause`; then what each peer is doing, compared with `where` (this rank's region stack)."""
        ranks = sorted(set(ranks) | {self.rank})
        peers = [r for r in ranks if r != self.rank]
        at_step = f" at step {step}" if step is not None else ""
        head = (f"rank {self.rank}: {what} (ranks {', '.join(map(str, ranks))}){at_step} failed after "
                f"{waited:.1f} s ({cause})")
        try:
            findings = self._findings(peers, where, step)
        except Exception as e:  # noqa: BLE001 - the store itself is unreachable
            return (f"{head}: the rendezvous store at {self.store_addr} is unreachable ({type(e).__name__}: "
                    f"{short_cause(e)}), so the rank hosting it (rank 0 when not launched by torchrun) has "
                    "probably died")
        if not findings:
            return f"{head}: every other rank of the group is alive and waiting in the same collective"
        return f"{head}: " + "; ".join(findings)

    def _findings(self, peers: list[int], my_where: list[str], my_step: int | None) -> list[str]:
        """What each peer is doing: a heartbeat that does not advance over a few intervals is a dead
        rank (a rank killed a moment ago still has a fresh-looking record, hence the wait)."""
        first = {r: self._read(r) for r in peers}
        deadline = time.time() + max(2.5 * self.interval_s, 1.0)
        pending = {r for r in peers if first[r] is None or not first[r].get("exited")}  # (no beats to wait for)
        now_recs = dict(first)
        while pending and time.time() < deadline:
            time.sleep(min(0.2, self.interval_s / 2))
            for r in list(pending):
                now_recs[r] = self._read(r)
                if now_recs[r] is not None and first[r] is not None and now_recs[r]["beat"] != first[r]["beat"]:
                    pending.discard(r)
        out = []
        for r in peers:
            rec = now_recs[r]
            if rec is None:
                out.append(f"rank {r} never sent a heartbeat (it did not start, or died at start-up)")
            elif rec.get("exited"):
                out.append(f"rank {r} exited ({rec['exited']})")
            elif r in pending:
                out.append(f"rank {r} stopped responding (last heartbeat {time.time() - rec['time']:.1f} s ago, "
                           f"pid {rec['pid']} on {rec['host']}{_at(rec)}): it died or is frozen")
            elif not _in_same(rec, my_where, my_step):
                out.append(f"rank {r} is alive but did not join{_at(rec)}: {_doing(rec)}")
        return out


def _in_same(rec: dict, where: list[str], step: int | None) -> bool:
    """Whether a peer is in the same collective: its host in the same region, or (NCCL) its oldest
    collective still running on its GPU the same one."""
    pending = rec.get("pending") or {}
    return (where, step) in ((rec["where"], rec.get("step")), (pending.get("where"), pending.get("step")))


def _flush_logs() -> None:
    """Before an os._exit: what the handlers buffered (and stderr) would otherwise be lost."""
    for logger in (log, logging.getLogger()):
        for handler in logger.handlers:
            handler.flush()
    sys.stderr.flush()


def _at(rec: dict) -> str:
    return f", at step {rec['step']}" if rec.get("step") is not None else ""


def _doing(rec: dict) -> str:
    pending = rec.get("pending")
    if pending:  # (NCCL: where its GPU is matters, its host may be far ahead)
        return (f"its GPU has been in {' > '.join(pending['where'])} (step {pending['step']}) for "
                f"{time.time() - pending['since']:.1f} s")
    since = time.time() - rec["since"]
    if rec["where"]:
        return f"it has been in {' > '.join(rec['where'])} for {since:.1f} s"
    last = f" (last: {rec['last']})" if rec.get("last") else ""
    return f"it has been outside any collective for {since:.1f} s{last}, i.e. hung or still computing"


def start_watchdog(rank: int, world_size: int, timeout_s: float, host: str, port: int,
                   environ=None, completion: CompletionFactory | None = None) -> Watchdog | None:
    """Connect a client to the rendezvous store and start this rank's heartbeat (None, with a
    warning, when the store cannot be reached: the run goes on, errors are just less precise).
    `completion`: see Watchdog (NCCL: `pending_collectives.cuda_completion(device)`)."""
    env = os.environ if environ is None else environ
    prefix = f"evomoe/watchdog/{env.get('TORCHELASTIC_RUN_ID', 'run')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=min(timeout_s, 30.0)),
                              wait_for_workers=False)
    except Exception as e:  # noqa: BLE001
        log.warning("watchdog: cannot reach the rendezvous store at %s:%d (%s); collective failures will "
                    "not name the rank at fault", host, port, e)
        return None
    return Watchdog(store, rank, world_size, timeout_s, prefix, f"{host}:{port}", completion).start()


def stop_watchdog(reason: str) -> None:
    if _ACTIVE is not None:
        _ACTIVE.stop(reason)

"""One run per save_dir: `<save_dir>/.lock` names the process that holds it.

Two runs in one folder would append to the same metrics.jsonl and overwrite each other's
checkpoints. The trainer takes the lock before it writes anything there (under parallelism global
rank 0 takes it for the job); a second run then stops at once naming the holder. A lock left by a
process that died on this host is taken over with a warning; the lock is released when the run's
process exits (also on an error) or its `RunLock` is released or collected. A lock taken again by
the process that holds it (a second trainer in one process, e.g. after an error) is its own.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
import weakref
from pathlib import Path

from .checkpointing import CheckpointError, write_file_atomic
from .process_identity import HOST, is_gone, this_process

log = logging.getLogger("megatron_evomoe")

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, save_dir: str | Path):
        self.path = Path(save_dir) / LOCK_NAME
        self.holder = {**this_process(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "token": uuid.uuid4().hex}
        self._release = None

    @classmethod
    def acquire(cls, save_dir: str | Path) -> "RunLock":
        """Take the lock of `save_dir` (created if missing) or raise a one-line CheckpointError."""
        lock = cls(save_dir)
        try:
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            lock._take()
        except OSError as e:  # a read-only or foreign folder: say so before anything else is written
            raise CheckpointError(f"train.save_dir {lock.path.parent}: cannot write the run lock {lock.path} "
                                  f"({e.strerror or e})") from None
        lock._release = weakref.finalize(lock, _remove_if_ours, lock.path, lock.holder["token"], os.getpid())
        return lock

    def release(self) -> None:
        if self._release is not None:
            self._release()

    def _take(self) -> None:
        for attempt in range(3):
            if self._create():
                return
            held = read_holder(self.path)
            if held is None and attempt < 2:  # maybe a run starting right now has not written it yet
                time.sleep(0.2)
                continue
            if self._reclaim(held):
                return
        raise CheckpointError(f"{self.path}: could not take the run lock (other runs are starting in this folder)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(self.holder).encode())
            os.fsync(fd)
        except OSError:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return True

    def _reclaim(self, held: dict | None) -> bool:
        """An existing lock: True if it is now ours (this process held it), False after removing a stale
        one (to be created again); raises if another live run holds it."""
        if held == {}:  # released meanwhile
            return False
        if held is None:
            raise CheckpointError(f"{self.path}: unreadable run lock; if no run uses {self.path.parent}, delete it")
        if (held.get("host"), held.get("pid"), held.get("start")) == (HOST, os.getpid(), self.holder["start"]):
            write_file_atomic(self.path, json.dumps(self.holder))
            return True
        if not is_gone(held.get("host"), held.get("pid"), held.get("start")):
            raise CheckpointError(f"{self.path.parent} is in use by another run: host {held.get('host')}, pid "
                                  f"{held.get('pid')}, started {held.get('started')} (its lock {self.path}); stop "
                                  "it or use another train.save_dir (delete the lock only if that run is gone)")
        log.warning("%s: taking over the run lock of host %s pid %s (started %s), which is no longer running",
                    self.path, held.get("host"), held.get("pid"), held.get("started"))
        _remove_stale(self.path, held)
        return False


def read_holder(path: Path) -> dict | None:
    try:
        held = json.loads(path.read_text())
    except FileNotFoundError:
        return {}  # released meanwhile: nothing to take over
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def _remove_stale(path: Path, held: dict) -> None:
    """Remove the lock `held` only: moved aside first, so that a lock another run created meanwhile
    (after taking over the same stale one) is put back instead of deleted."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{HOST}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if read_holder(aside) != held:
        try:
            os.link(aside, path)  # (never replaces a lock that appeared meanwhile)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def _remove_if_ours(path: Path, token: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child must not drop its parent's lock
        return
    held = read_holder(path)
    if held and held.get("token") == token:
        path.unlink(missing_ok=True)

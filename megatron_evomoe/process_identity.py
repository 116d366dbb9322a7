"""Which process on which host owns a file (the run lock, a checkpoint being written), and whether it
is gone.

Clean-up and lock take-over may only touch what a dead process left behind: a live run's save in
progress or its lock is never removed. Only a process on this host can be checked; one of another
host (a shared file system) always counts as alive.
"""
from __future__ import annotations

import os
import re
import socket

# file-name safe: it is part of temporary folder names
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): together with the
    pid it identifies a process, so a pid reused by another process is not mistaken for the owner.
    None where /proc is not available."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of `pid`, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    return fields[0], int(fields[19])


def this_process() -> dict:
    return {"host": HOST, "pid": os.getpid(), "start": start_ticks(os.getpid())}


def is_gone(host, pid, start=None) -> bool:
    """True only when it is certain: `host` is this host and no process `pid` runs (or a zombie, or
    another process that started at another time than `start` now has the pid)."""
    if host != HOST or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return False
    return stat[0] in ("Z", "X") or (start is not None and stat[1] != start)


def owner_tag() -> str:
    """`<host>-<pid>`: the suffix of the temporary files this process writes."""
    return f"{HOST}-{os.getpid()}"


def tagged_pid(name: str) -> int | None:
    """The pid of a name ending in `-<host>-<pid>` with this host, else None (another host's, or untagged)."""
    m = re.search(rf"-{re.escape(HOST)}-(\d+)$", name)
    return int(m.group(1)) if m else None

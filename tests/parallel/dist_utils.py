"""Run a function in N gloo processes on this machine and collect what each returns.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

Each worker initialises a gloo process group on a free local port, limits itself to one
intra-op thread (the test machine has 2 cores for everything), runs `fn`, and writes its
result (or its traceback) to a file the parent reads back: tensors are returned by value.
`fork` is used by default because it skips re-importing torch in every worker (seconds
each); set EVOMOE_TEST_START_METHOD=spawn to use clean interpreters instead.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        import torch.distributed as dist
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}")
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise


class DistributedTestError(AssertionError):
    pass


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, start_method: str | None = None) -> list:
    """fn(rank, world_size, *args) in `world_size` processes; returns the per-rank results."""
    method = start_method or os.environ.get("EVOMOE_TEST_START_METHOD", "fork")
    ctx = mp.get_context(method)
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r in range(world_size):
            f = Path(out_dir) / f"rank{r}.pt"
            if not f.exists():
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                              + (", killed after the timeout" if r in hung else "") + ")")
                results.append(None)
                continue
            rec = torch.load(f, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r} failed:\n{rec['error']}")
                results.append(None)
        if errors:
            raise DistributedTestError("\n".join(errors))
        return results

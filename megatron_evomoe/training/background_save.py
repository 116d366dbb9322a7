"""At most one checkpoint write in flight, in a background thread (`train.async_save`), or inline.

    saves = BackgroundSave(enabled)
    saves.submit(write)      # write(): the save, on tensors already copied (staged) at the step boundary;
                             # waits for the previous write first, so saves complete in order
    saves.wait()             # before the process ends or a stop is reported: the last save is on disk

A write that fails raises its CheckpointError at the next `submit` or `wait` (the previous
checkpoint, and `latest`, are intact: checkpointing.py). A process killed while a write is in
flight leaves `latest` at the checkpoint before it, as a kill during a synchronous save does.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

log = logging.getLogger("megatron_evomoe")


class BackgroundSave:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if enabled else None
        self._pending: Future | None = None

    def submit(self, write: Callable[[], object]) -> None:
        self.wait()
        if self._pool is None:
            write()
        else:
            self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # (re-raises the write's error here, in the training thread)

    def close(self, failing: bool) -> None:
        """Finish the last write; while another error is already stopping the run, a failed write is
        logged rather than raised over it."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001
            if not failing:
                raise
            log.error("the last checkpoint write failed too: %s", e)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

"""Stop requests from signals: SIGTERM (SLURM's time limit or pre-emption, torchrun's shutdown),
SIGINT (Ctrl-C) and `train.exit_signal` (e.g. SIGUSR1 with `sbatch --signal=B:USR1@120`).

A handler only records the request; the trainer acts on it at the next step boundary, where all
ranks agree (one all-reduce of the flag), save a checkpoint and exit with `EXIT_CODE_STOPPED`.
A second Ctrl-C stops at once (KeyboardInterrupt).
"""
from __future__ import annotations

import logging
import signal
import threading

from ..config import ConfigError

log = logging.getLogger("megatron_evomoe")

# EX_TEMPFAIL: "try again later"; the shipped sbatch scripts requeue the job when they forwarded a
# pre-emption signal, and a plain wrapper can requeue on this code
EXIT_CODE_STOPPED = 75


class TrainingStopped(Exception):
    """The run stopped on a signal after saving a checkpoint at a step boundary (resume: rerun)."""


def signal_number(name: str) -> int:
    """'SIGUSR1' / 'USR1' / '10' -> the signal number (ConfigError naming the field otherwise)."""
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    sig = getattr(signal, text if text.startswith("SIG") else f"SIG{text}", None)
    if not isinstance(sig, signal.Signals):
        raise ConfigError(f"train.exit_signal: {name!r} is not a signal name (e.g. SIGUSR1) or number")
    return int(sig)


class StopRequest:
    """Installs the handlers on `install()` (main thread only) and restores the previous ones on `restore()`."""

    def __init__(self, exit_signal: str = ""):
        self.signals = [signal.SIGTERM, signal.SIGINT] + ([signal_number(exit_signal)] if exit_signal else [])
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only (a trainer run from a helper thread)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = signum
        log.warning("received %s: stopping at the next step boundary with a checkpoint", signal.Signals(signum).name)

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop request on another rank"

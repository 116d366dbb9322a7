"""Choice between implementations of one op by a one-time timing at the actual shape.

Used by grouped_mm's "auto" on CUDA (backend "measured", see backend.py): which of this project's
Triton kernels or ``torch._grouped_mm`` is faster depends on the arch, the dtype and the shape, so it is
measured instead of guessed. ``MeasuredChoice.choose(key, candidates, default)``:

* the first call for a ``key`` (a ``ShapeKey``: phase, rows bucketed to a power of two, K, N, experts,
  dtype, device) times every candidate once with ``timer`` and keeps the fastest; later calls for the
  key return it without timing. The choice is logged once per key on the ``megatron_evomoe.ops``
  logger, with every candidate's time and why any candidate could not run;
* a candidate that raises while timed (a dtype or arch it does not support) is left out; out of
  memory is not a preference and propagates;
* never under CUDA graph capture or torch.compile tracing (``timing_forbidden``): then ``default``
  is returned and nothing is cached, so that the next eager call measures.

``timer(name, fn) -> seconds`` and ``forbidden() -> bool`` are injectable, which is how the tests check
the cache, the per-shape choice and the log line on CPU with fake timings.
"""
from __future__ import annotations

import logging
import statistics
from typing import Callable, NamedTuple

import torch

logger = logging.getLogger("megatron_evomoe.ops")

Timer = Callable[[str, Callable[[], object]], float]


class ShapeKey(NamedTuple):
    phase: str       # "fwd" | "dgrad" | "wgrad"
    rows: int        # token rows, rounded up to a power of two
    k: int           # w: [E, K, N] in every phase
    n: int
    num_experts: int
    dtype: str
    device: str

    def __str__(self) -> str:
        return (f"{self.phase} rows<={self.rows} K={self.k} N={self.n} E={self.num_experts} "
                f"{self.dtype} on {self.device}")


def rows_bucket(num_rows: int) -> int:
    """Next power of two >= num_rows (1 for none): micro-batches of similar size share a choice."""
    return 1 << max(num_rows - 1, 0).bit_length()


def cuda_event_timer(name: str, fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream. The warm-up calls absorb the one-time
    costs (Triton's compile and autotuning on a new key) that are not what is compared."""
    del name  # the candidate's name is for injected timers
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def timing_forbidden() -> bool:
    """True while timing would be wrong or illegal: torch.compile tracing, CUDA graph capture."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class MeasuredChoice:
    """The fastest candidate per ``ShapeKey``, measured once in this process (see the module docstring)."""

    def __init__(self, op: str, timer: Timer = cuda_event_timer, forbidden: Callable[[], bool] = timing_forbidden):
        self.op = op
        self.timer = timer
        self.forbidden = forbidden
        self.choices: dict[ShapeKey, str] = {}

    def choose(self, key: ShapeKey, candidates: dict[str, Callable[[], object]], default: str) -> str:
        if key in self.choices:
            return self.choices[key]
        if self.forbidden():
            return default
        times, failures = {}, {}
        for name, fn in candidates.items():
            try:
                times[name] = self.timer(name, fn)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                failures[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        best = min(times, key=times.__getitem__) if times else default
        self.choices[key] = best
        measured = ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in sorted(times.items(), key=lambda item: item[1]))
        failed = "".join(f"; {n} failed ({why})" for n, why in failures.items())
        logger.info("%s %s: using %s (measured: %s%s)", self.op, key, best, measured or "nothing", failed)
        return best

    def clear(self) -> None:
        """Forget every choice (tests; or after changing the GPU's clocks or sharing)."""
        self.choices.clear()

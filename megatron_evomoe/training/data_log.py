"""What the data stream did, between log lines and over the stage: padding, samples, mixture components.

Read from the batch plan's running global totals (`StageData.stats()`: rows, samples, padding tokens,
samples per component since the stage began, carried by checkpoints), so the figures are the global
batch's on every rank and the stage totals survive a resume.
"""
from __future__ import annotations

import logging

log = logging.getLogger("megatron_evomoe")


def _padding_fraction(padding_tokens: int, rows: int, seq_len: int) -> float:
    return padding_tokens / max(rows * seq_len, 1)


class DataLog:
    def __init__(self, data):
        """data: the stage's `StageData` (stats(), seq_len, component_names)."""
        self.data = data
        self._last = dict(data.stats())  # at the previous log line
        self._step_samples = data.stats()["samples"]
        self._steps = 0

    def step(self) -> int:
        """Samples (all ranks) of the step just taken."""
        now = self.data.stats()["samples"]
        n, self._step_samples = now - self._step_samples, now
        self._steps += 1
        return n

    def summary_and_reset(self) -> tuple[dict, str]:
        """Scalars (padding_fraction over the interval and the stage, samples_per_step, per mixture component
        data/<file>/samples) and the console fragment."""
        now, last, seq = self.data.stats(), self._last, self.data.seq_len
        interval = _padding_fraction(now["padding_tokens"] - last["padding_tokens"], now["rows"] - last["rows"], seq)
        stage = _padding_fraction(now["padding_tokens"], now["rows"], seq)
        per_step = (now["samples"] - last["samples"]) / max(self._steps, 1)
        scalars = {"padding_fraction": interval, "padding_fraction_stage": stage, "samples_per_step": per_step}
        text = f" | pad {100 * interval:.1f}% (stage {100 * stage:.1f}%) {per_step:.1f} samples/step"
        if len(self.data.component_names) > 1:
            for name, n in zip(self.data.component_names, now["component_samples"]):
                scalars[f"data/{name}/samples"] = n
        self._last, self._steps = dict(now), 0
        return scalars, text

    def log_stage_end(self, stage_name: str) -> None:
        now = self.data.stats()
        seen = ", ".join(f"{name} {n}" for name, n in zip(self.data.component_names, now["component_samples"]))
        log.info("stage '%s' data: %d samples in %d rows, padding %.1f%%; samples per file: %s", stage_name,
                 now["samples"], now["rows"], 100 * _padding_fraction(now["padding_tokens"], now["rows"],
                                                                     self.data.seq_len), seen)

"""Training metrics sinks: console, a JSON-lines file, and TensorBoard when installed."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("megatron_evomoe")


class MetricsLogger:
    def __init__(self, save_dir: str | Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(save_dir) / "metrics.jsonl"
        self.tb = None
        self.write_failed = False  # (warn once per run of failed writes)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(save_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: logging to %s only "
                            "(pip install tensorboard)", self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            self.write_failed = False
        except OSError as e:  # e.g. a full disk: not worth stopping for; a checkpoint that cannot be
            # written stops the run (checkpointing.py), with the previous one intact
            if not self.write_failed:
                log.warning("%s: cannot append the metrics of step %d (%s); training goes on", self.path, step,
                            e.strerror or e)
            self.write_failed = True
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

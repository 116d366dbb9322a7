"""Training metrics sinks: a JSON-lines file, TensorBoard when installed, Weights & Biases when asked for.

Keys (metrics.jsonl, TensorBoard and W&B alike): `train/<record field>` per log line, among them the throughput
of training/throughput.py: train/tokens_per_s (every decoder position, all ranks), train/supervised_tokens_per_s,
train/tflops_per_gpu and train/mfu (left out when the peak is unknown); `eval/<stage>/<score>` per evaluation.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger("megatron_evomoe")


def _run_id(save_dir: Path) -> str:
    """The save_dir's W&B run id, made on its first run (`wandb_run_id`, next to metrics.jsonl)."""
    from ..checkpointing import write_file_atomic
    path = save_dir / "wandb_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    write_file_atomic(path, run_id)
    return run_id


class MetricsLogger:
    def __init__(self, save_dir: str | Path, tensorboard: bool, enabled: bool = True, wandb_project: str = "",
                 config: dict | None = None):
        """enabled: this rank writes (the main rank); wandb_project: "" = no W&B; config: what W&B records."""
        self.enabled = enabled
        self.path = Path(save_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self.write_failed = False  # (warn once per run of failed writes)
        wandb = _import_wandb() if wandb_project else None  # on every rank: all stop alike when it is missing
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
        if wandb is not None:
            # WANDB_MODE (online / offline / disabled) passed on as given: wandb's own default otherwise
            # one W&B run per save_dir: a resumed job (same save_dir) continues its curves
            self.wandb = wandb.init(project=wandb_project, name=Path(save_dir).resolve().name, dir=str(save_dir),
                                    config=config or {}, mode=os.environ.get("WANDB_MODE") or None,
                                    id=_run_id(Path(save_dir)), resume="allow")

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
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb_project is set but wandb is not installed (pip install wandb), "
                          "or set train.wandb_project=''") from None
    return wandb

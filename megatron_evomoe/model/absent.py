"""A module slot whose module lives elsewhere (on another pipeline stage).

The model's forward skips such slots, so one forward serves every pipeline stage: a stage is the
same model with the modules it does not own replaced by `AbsentModule`s (no parameters; parameter
names of the modules it keeps are unchanged). Which modules are absent is decided outside the
model (parallel/pipeline.py); the model only knows that a slot may be empty.
"""
from __future__ import annotations

from torch import nn


class AbsentModule(nn.Module):
    """Stands for a module held by another pipeline stage: holds no parameters, is never called."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} lives on another pipeline stage")

    def extra_repr(self) -> str:
        return f"{self.what} (on another stage)"


def is_absent(module) -> bool:
    """True for an empty slot: an AbsentModule, or None (the vision tower of a later stage)."""
    return module is None or isinstance(module, AbsentModule)

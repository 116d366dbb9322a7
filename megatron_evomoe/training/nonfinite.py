"""Detection of non-finite losses and gradients."""
from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """Raised with train.nonfinite=stop; the message names the stage, step and parameter."""


def first_nonfinite_grad(params: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """Name of the first parameter (in model order) whose gradient has a NaN or Inf."""
    for name, p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None

"""The step's global expert loads for aux-loss-free balancing (moe/load_balancing.py), summed over DP."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..moe.moe_layer import MoELayer
from .state import comm_device
from .watchdog import collective


def update_expert_biases(model: nn.Module, dp_group, skipped: bool = False) -> None:
    """After the optimizer step: every biased router's expert bias moves by the step's global load: this
    rank's assignments summed over the DP group (every token of the step: EP carves its ranks out of DP,
    and the TP ranks of a replica route the same tokens), one all-reduce of [layers, E] for the model, so
    every rank holds the same biases. A skipped step (train.nonfinite) drops its loads instead."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.router.expert_bias is not None]
    if not layers:
        return
    if skipped:
        for layer in layers:
            layer.step_load = None
        return
    loads = torch.stack([layer.step_load if layer.step_load is not None else
                         torch.zeros_like(layer.router.expert_bias) for layer in layers]).double()  # [L, E]
    if dp_group is not None:
        loads = loads.to(comm_device(dp_group))
        with collective("all_reduce(expert loads) on the data-parallel group", dp_group):
            dist.all_reduce(loads, group=dp_group)
    for layer, load in zip(layers, loads.cpu()):
        layer.update_expert_bias(load)

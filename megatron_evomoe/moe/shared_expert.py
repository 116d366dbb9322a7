"""Shared expert (Qwen2-MoE): a dense SwiGLU FFN that every token goes through, next to the routed experts.

    y = routed(x) + sigmoid(gate(x)) * w_down(silu(w_gate x) * w_up x)

`gate` is a Linear(C, 1) without bias: one scalar per token. The FFN part (`ffn`) and the gate
are separate methods because tensor parallelism shards the FFN (column/row parallel, see
parallel/tensor_parallel.py::shard_shared_expert) while the gate stays replicated: its input
must not pass through the FFN's copy-to-region, whose backward all-reduces the gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w_up = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w_down = nn.Linear(ffn_hidden, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=False)

    @torch.no_grad()
    def init_for_upcycling(self, init_std: float, generator: torch.Generator) -> "SharedExpert":
        """Fresh weights for a MoE layer made from a dense FFN: w_down starts at zero, so the new
        layer first computes exactly its routed output (the upcycled function) and the shared
        expert grows from there; draws from `generator`, never from the global RNG."""
        for lin in (self.w_gate, self.w_up, self.gate):
            w = torch.randn(lin.weight.shape, generator=generator, dtype=torch.float32) * init_std
            lin.weight.copy_(w.to(lin.weight))
        self.w_down.weight.zero_()
        return self

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, C] -> [T, C]
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, C] -> [T, C]; the gate is a per-token scalar in (0, 1)
        return torch.sigmoid(self.gate(x)) * self.ffn(x)

"""GroupedExperts: E SwiGLU experts with stacked weights, computed by grouped matmuls.

Tokens arrive sorted by expert (the dispatcher's job) with per-expert counts;
expert e owns rows [offsets[e-1], offsets[e]). Weights are stored as [E, in, out]
so that each expert's product is X_e @ W[e], the layout grouped-GEMM kernels use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.grouped_gemm import grouped_mm


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, backend: str = "auto",
                 init_std: float = 0.02):
        super().__init__()
        self.backend = backend
        self.w_gate = nn.Parameter(torch.randn(num_experts, hidden, ffn_hidden) * init_std)  # [E, C, F]
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, ffn_hidden) * init_std)  # [E, C, F]
        self.w_down = nn.Parameter(torch.randn(num_experts, ffn_hidden, hidden) * init_std)  # [E, F, C]

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: [N, C] sorted by expert; tokens_per_expert: [E] -> [N, C].

        No host read here: the offsets stay on the device and grouped_mm is an opaque custom op
        under torch.compile, whatever its backend (the PyTorch one runs torch._grouped_mm with
        the offsets, or, where this build refuses it, its per-expert loop inside the op). Only the
        'loop' reference reads the counts on the host (tests; train.compile refuses it)."""
        if self.backend == "loop":
            return experts_loop_reference(x, tokens_per_expert, self.w_gate, self.w_up, self.w_down)
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # [E] end row of each expert
        gate = grouped_mm(x, self.w_gate, offsets, backend=self.backend)  # [N, F]
        up = grouped_mm(x, self.w_up, offsets, backend=self.backend)  # [N, F]
        return grouped_mm(F.silu(gate) * up, self.w_down, offsets, backend=self.backend)  # [N, C]

    @torch.no_grad()
    def load_from_ffns(self, weights: list[dict]) -> None:
        """Fill expert e from a dense SwiGLU FFN's nn.Linear weights ([out, in] each)."""
        assert len(weights) == self.num_experts
        for e, w in enumerate(weights):
            self.w_gate[e].copy_(w["w_gate"].t())
            self.w_up[e].copy_(w["w_up"].t())
            self.w_down[e].copy_(w["w_down"].t())


def experts_loop_reference(x, tokens_per_expert, w_gate, w_up, w_down):
    """The dumb loop: one SwiGLU per non-empty expert. Used by tests and `backend='loop'`."""
    out = x.new_zeros(x.shape[0], w_down.shape[-1])
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            xe = x[start:start + n]
            out[start:start + n] = (F.silu(xe @ w_gate[e]) * (xe @ w_up[e])) @ w_down[e]
        start += n
    return out

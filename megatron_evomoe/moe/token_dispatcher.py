"""Token dispatchers: move tokens to their experts and back.

`LocalTokenDispatcher` is dropless and sort-based within one process (or one
expert-parallel rank group of size 1). The all-to-all dispatcher for expert
parallelism implements the same two methods in megatron_evomoe/parallel.
"""
from __future__ import annotations

import torch

from ..ops.permute import permute, unpermute


class LocalTokenDispatcher:
    def __init__(self, num_experts: int, backend: str = "auto"):
        self.num_experts, self.backend = num_experts, backend

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor):
        """x: [T, C], topk_idx: [T, K] -> (x_perm [T*K, C] sorted by expert, tokens_per_expert [E], handle)."""
        x_perm, row_map, counts = permute(x, topk_idx, self.num_experts, backend=self.backend)
        return x_perm, counts, row_map

    def combine(self, y_perm: torch.Tensor, gates: torch.Tensor, handle) -> torch.Tensor:
        """y_perm: [T*K, C], gates: [T, K] -> y [T, C] = sum_k gates[t, k] * y_perm[row(t, k)]."""
        return unpermute(y_perm, handle, gates, backend=self.backend)

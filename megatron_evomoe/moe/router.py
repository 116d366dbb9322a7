"""Routers: the shared Router tail, the linear TopKRouter baseline, per-modality linear routers and
the load-balancing losses (EvoMoE's Dynamic Token-aware Router is in moe/dtr.py; `build_router`,
which picks one by `router.type`, in moe/upcycling.py).

Every router maps normalised hidden states z: [T, C] and modality ids [T] to a
`RoutingOutput`; the load-balancing and z-losses are computed here, unweighted
(the MoE layer applies the coefficients).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.modality import NUM_MODALITIES
from ..ops.permute import expert_counts
from ..ops.topk_softmax import topk_softmax
from .load_balancing import biased_topk


@dataclass
class RoutingOutput:
    logits: torch.Tensor  # [T, E] fp32
    probs: torch.Tensor  # [T, E] fp32
    topk_idx: torch.Tensor  # [T, K] int64
    gates: torch.Tensor  # [T, K] fp32, weights of the chosen experts
    tokens_per_expert: torch.Tensor  # [E] assignments (T*K in total)
    aux_loss: torch.Tensor  # Switch/GShard load-balancing loss, unweighted
    z_loss: torch.Tensor  # ST-MoE router z-loss, unweighted


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer aux loss: E * sum_i f_i * P_i.

    f_i: fraction of the T*K assignments that went to expert i (no gradient);
    P_i: mean router probability of expert i over the T tokens. Equals 1 for a
    perfectly uniform router.
    """
    num_tokens, num_experts = probs.shape
    f = tokens_per_expert.float() / max(num_tokens * top_k, 1)
    p = probs.float().mean(0) if num_tokens else probs.new_zeros(num_experts)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class Router(nn.Module):
    """Shared tail: logits -> softmax/top-k -> counts and losses."""

    def __init__(self, num_experts: int, top_k: int, renormalize: bool, backend: str):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.backend = renormalize, backend
        self.register_buffer("expert_bias", None)  # [E]: aux-loss-free balancing (load_balancing.py); None: off

    def enable_expert_bias(self, update_rate: float) -> "Router":
        """Choose experts by probs + a per-expert bias (a checkpointed buffer [E]), which the trainer moves by
        `update_rate` after every step (moe/load_balancing.py)."""
        self.expert_bias = torch.zeros(self.num_experts)  # (a persistent buffer: in the state dict)
        self.bias_update_rate = update_rate
        return self

    def biased_choice(self, probs, topk_idx, gates, counts):
        """With an expert bias, the choice made again from probs + bias (the routing op's is unbiased):
        (topk_idx, gates, counts or None to recount); without one, as given."""
        if self.expert_bias is None:
            return topk_idx, gates, counts
        return (*biased_topk(probs, self.expert_bias, self.top_k, self.renormalize), None)

    def init_buffers(self) -> None:
        """The bias's starting value, after a meta-built router got storage (parallel/sharded_construction.py)."""
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def compute_logits(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, modality: torch.Tensor) -> RoutingOutput:
        logits = self.compute_logits(z, modality).float()  # [T, E]
        probs, topk_idx, gates = topk_softmax(logits, self.top_k, self.renormalize, backend=self.backend)
        return self._finish(logits, probs, topk_idx, gates)

    def _finish(self, logits, probs, topk_idx, gates, counts=None) -> RoutingOutput:
        """counts: [E] from the routing op when it computes them (the DTR's), else a sync-free histogram."""
        topk_idx, gates, counts = self.biased_choice(probs, topk_idx, gates, counts)
        if counts is None:
            counts = expert_counts(topk_idx, self.num_experts)
        return RoutingOutput(logits, probs, topk_idx, gates, counts,
                             load_balancing_loss(probs, counts, self.top_k), router_z_loss(logits))


class TopKRouter(Router):
    """Linear router shared by all modalities (MoE-LLaVA's router)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool = True,
                 backend: str = "auto", init_std: float = 0.02):
        super().__init__(num_experts, top_k, renormalize, backend)
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * init_std)  # [E, C]

    def compute_logits(self, z, modality):
        return F.linear(z, self.weight)


class PerModalityLinearRouter(Router):
    """One linear router per modality (the paper's Table 4 middle row)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool = True,
                 backend: str = "auto", init_std: float = 0.02):
        super().__init__(num_experts, top_k, renormalize, backend)
        self.weight = nn.Parameter(torch.randn(NUM_MODALITIES, num_experts, hidden) * init_std)  # [M, E, C]

    def compute_logits(self, z, modality):
        logits = torch.einsum("tc,mec->tme", z, self.weight)  # [T, M, E]: E is tiny, so computing both is cheap
        return logits.gather(1, modality.view(-1, 1, 1).expand(-1, 1, self.num_experts)).squeeze(1)

"""Routers: the linear TopKRouter baseline, per-modality linear routers, and EvoMoE's
Dynamic Token-aware Router (DTR, ARCHITECTURE 4.3).

Every router maps normalised hidden states z: [T, C] and modality ids [T] to a
`RoutingOutput`; the load-balancing and z-losses are computed here, unweighted
(the MoE layer applies the coefficients).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.modality import NUM_MODALITIES
from ..ops.router import dtr_route, topk_softmax


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

    def compute_logits(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, modality: torch.Tensor) -> RoutingOutput:
        logits = self.compute_logits(z, modality).float()  # [T, E]
        probs, topk_idx, gates = topk_softmax(logits, self.top_k, self.renormalize, backend=self.backend)
        return self._finish(logits, probs, topk_idx, gates)

    def _finish(self, logits, probs, topk_idx, gates) -> RoutingOutput:
        counts = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)
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


class DynamicTokenRouter(Router):
    """EvoMoE's DTR: a per-modality hypernetwork generates each token's router weights.

    For token z (modality m): h = W1[m] z + b1[m]; Theta_down = W2_down[m] h + b2_down[m]
    (2R x C), Theta_up = W2_up[m] h + b2_up[m] (D x R); e = Theta_up SwiGLU(Theta_down z);
    logits = phi(e). The generated matrices are never materialised: Theta_down z is the
    bilinear form sum_j h_j (W2_down[m, j] z) + b2_down[m] z (see `ops.router.dtr_route`).
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, hyper_hidden: int = 16, rank: int = 8,
                 embed_dim: int = 16, activation: str = "none", renormalize: bool = True, backend: str = "auto"):
        super().__init__(num_experts, top_k, renormalize, backend)
        M, H, C, R, D = NUM_MODALITIES, hyper_hidden, hidden, rank, embed_dim
        self.activation = None if activation == "none" else activation
        self.w1 = nn.Parameter(torch.empty(M, H, C))
        self.b1 = nn.Parameter(torch.zeros(M, H))
        self.w2_down = nn.Parameter(torch.empty(M, H, 2 * R, C))
        self.b2_down = nn.Parameter(torch.empty(M, 2 * R, C))
        self.w2_up = nn.Parameter(torch.empty(M, H, D, R))
        self.b2_up = nn.Parameter(torch.empty(M, D, R))
        self.phi_w = nn.Parameter(torch.empty(num_experts, D))
        self.phi_b = nn.Parameter(torch.zeros(num_experts))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Scales chosen so that, for unit-RMS z, h and both terms of the generated
        # products have unit variance: the bias (static) and the token-generated
        # part of Theta contribute equally from the start.
        M, H, R2, C = self.w2_down.shape
        D, R = self.w2_up.shape[2:]
        nn.init.normal_(self.w1, 0.0, C ** -0.5)
        nn.init.normal_(self.b2_down, 0.0, C ** -0.5)
        nn.init.normal_(self.w2_down, 0.0, (H * C) ** -0.5)
        nn.init.normal_(self.b2_up, 0.0, R ** -0.5)
        nn.init.normal_(self.w2_up, 0.0, (H * R) ** -0.5)
        nn.init.normal_(self.phi_w, 0.0, D ** -0.5)
        self.b1.zero_()
        self.phi_b.zero_()

    def forward(self, z: torch.Tensor, modality: torch.Tensor) -> RoutingOutput:
        logits, probs, topk_idx, gates, _, _ = dtr_route(
            z, modality, self.w1, self.b1, self.w2_down, self.b2_down, self.w2_up, self.b2_up,
            self.phi_w, self.phi_b, self.top_k, renormalize=self.renormalize,
            activation=self.activation, backend=self.backend)
        return self._finish(logits, probs, topk_idx, gates)


def build_router(router_cfg, moe_cfg, hidden: int) -> Router:
    common = dict(num_experts=moe_cfg.num_experts, top_k=moe_cfg.top_k, renormalize=moe_cfg.renormalize,
                  backend=router_cfg.backend)
    if router_cfg.type == "linear":
        return TopKRouter(hidden, **common)
    if router_cfg.type == "linear_per_modality":
        return PerModalityLinearRouter(hidden, **common)
    if router_cfg.type == "dtr":
        return DynamicTokenRouter(hidden, hyper_hidden=router_cfg.hyper_hidden_size, rank=router_cfg.rank,
                                  embed_dim=router_cfg.embed_dim, activation=router_cfg.activation, **common)
    raise ValueError(f"router.type: unknown router {router_cfg.type!r}")

"""EvoMoE's Dynamic Token-aware Router (DTR, ARCHITECTURE 4.3): a per-modality hypernetwork generates
each token's router weights. Same RoutingOutput and losses as the linear routers (moe/router.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..model.modality import NUM_MODALITIES
from ..ops.dtr import dtr_route
from .router import Router, RoutingOutput


class DynamicTokenRouter(Router):
    """EvoMoE's DTR: a per-modality hypernetwork generates each token's router weights.

    For token z (modality m): h = W1[m] z + b1[m]; Theta_down = W2_down[m] h + b2_down[m]
    (2R x C), Theta_up = W2_up[m] h + b2_up[m] (D x R); e = Theta_up SwiGLU(Theta_down z);
    logits = phi(e). The generated matrices are never materialised: Theta_down z is the
    bilinear form sum_j h_j (W2_down[m, j] z) + b2_down[m] z (see `ops.dtr.dtr_route`).
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
        logits, probs, topk_idx, gates, _, counts = dtr_route(
            z, modality, self.w1, self.b1, self.w2_down, self.b2_down, self.w2_up, self.b2_up,
            self.phi_w, self.phi_b, self.top_k, renormalize=self.renormalize,
            activation=self.activation, backend=self.backend)
        return self._finish(logits, probs, topk_idx, gates, counts)

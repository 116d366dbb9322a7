"""The MoE layer: route -> dispatch (permute) -> experts -> combine (unpermute)."""
from __future__ import annotations

import torch
from torch import nn

from ..model.recompute import recomputing
from .experts import GroupedExperts
from .load_balancing import update_bias
from .router import Router, RoutingOutput
from .token_dispatcher import LocalTokenDispatcher


class MoELayer(nn.Module):
    """Sparse replacement of a dense FFN; takes `(x, modality)` and returns `(y, aux_loss)`.

    `aux_loss` is already weighted by the coefficients, so the model can add it
    to the LM loss as is. For analytics, `routing_hook` (if set) is called with
    the routing decision of each forward; `last_tokens_per_expert` is kept for
    per-expert load logging.
    """

    def __init__(self, router: Router, experts: GroupedExperts, dispatcher=None,
                 aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0, shared_expert=None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher or LocalTokenDispatcher(experts.num_experts, experts.backend
                                                             if experts.backend != "loop" else "torch")
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.routing_hook = None
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.shared_expert = shared_expert  # optional dense expert added to the routed output (shared_expert.py)
        self.step_load: torch.Tensor | None = None  # [E] this rank's assignments since the last bias update

    def update_expert_bias(self, load: torch.Tensor) -> None:
        """After an optimizer step: move the router's expert bias by the step's global load [E]."""
        update_bias(self.router.expert_bias, load, self.router.bias_update_rate)
        self.step_load = None

    def forward(self, x: torch.Tensor, modality: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, C]
        modality = modality.reshape(-1)  # [T]
        routing: RoutingOutput = self.router(x, modality)
        x_perm, tokens_per_expert, handle = self.dispatcher.dispatch(x, routing.topk_idx)  # [T*K, C]
        y_perm = self.experts(x_perm, tokens_per_expert)  # [T*K, C]
        y = self.dispatcher.combine(y_perm, routing.gates.to(y_perm.dtype), handle)  # [T, C]
        self.last_tokens_per_expert = routing.tokens_per_expert.detach()
        if self.router.expert_bias is not None and self.training and not recomputing():  # (once per micro-batch)
            load = self.last_tokens_per_expert
            self.step_load = load if self.step_load is None else self.step_load + load
        if self.routing_hook is not None and not recomputing():  # once per micro-batch, not again in backward
            self.routing_hook(self, routing, modality)
        aux = self.aux_loss_coeff * routing.aux_loss + self.z_loss_coeff * routing.z_loss
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)  # [T, C]
        return y.view(shape), aux

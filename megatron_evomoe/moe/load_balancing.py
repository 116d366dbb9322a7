"""Aux-loss-free load balancing (DeepSeek-V3's expert bias; megatron-core's and torchtitan's too).

Each router may hold a per-expert bias b [E] that is added to the routing probabilities for the
top-k *choice* only: a token goes to topk(p + b), weighted by its unbiased probabilities p of the
chosen experts (renormalised like the router's own gates). After every optimizer step the bias moves
against the load of that step's global batch (every data-parallel and expert-parallel rank's tokens,
summed by the trainer: all ranks then hold the same bias):

    b_e <- b_e + rate * sign(mean_load - load_e)

so an overloaded expert becomes less attractive and an idle one more, without a loss term that
pulls the router's probabilities themselves. `moe.load_balancing` picks aux (the Switch loss only),
aux_free (the bias only), both, or none.
"""
from __future__ import annotations

import torch

LOAD_BALANCING = ("aux", "aux_free", "both", "none")


def uses_bias(mode: str) -> bool:
    return mode in ("aux_free", "both")


def uses_aux_loss(mode: str) -> bool:
    return mode in ("aux", "both")


def biased_topk(probs: torch.Tensor, bias: torch.Tensor, top_k: int, renormalize: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [T, E] fp32, bias [E] -> (topk_idx [T, K] int64 chosen by probs + bias, gates [T, K]: the
    chosen experts' unbiased probabilities, renormalised to sum to 1 when `renormalize` and K > 1)."""
    topk_idx = torch.topk(probs.detach() + bias, top_k, dim=-1).indices  # (the choice carries no gradient)
    gates = probs.gather(1, topk_idx)
    if renormalize and top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
    return topk_idx, gates


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place: bias [E] += rate * sign(mean(load) - load); load [E]: the step's global assignments."""
    load = load.to(bias.device, torch.float64)
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))

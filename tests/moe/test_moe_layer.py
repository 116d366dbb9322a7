"""MoE layer vs a dumb per-token loop; aux-loss values on hand-computed cases."""
import torch
import torch.nn.functional as F
from torch import nn

from megatron_evomoe.moe.experts import GroupedExperts, experts_loop_reference
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.router import Router, TopKRouter, load_balancing_loss, router_z_loss


class FixedLogitsRouter(Router):
    """Router whose logits are a parameter: lets a test starve an expert on purpose."""

    def __init__(self, logits, top_k):
        super().__init__(logits.shape[1], top_k, renormalize=True, backend="torch")
        self.logits = nn.Parameter(logits)

    def compute_logits(self, z, modality):
        return self.logits + 0 * z.sum()


def per_token_reference(x, router_logits, top_k, experts):
    probs = router_logits.float().softmax(-1)
    gates, idx = probs.topk(top_k, -1)
    gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k):
            e = idx[t, k]
            h = F.silu(x[t] @ experts.w_gate[e]) * (x[t] @ experts.w_up[e])
            out[t] = out[t] + gates[t, k] * (h @ experts.w_down[e])
    return out


def test_moe_layer_matches_loop_with_starved_expert():
    torch.manual_seed(0)
    T, C, Fh, E, K = 13, 8, 12, 4, 2
    logits = torch.randn(T, E)
    logits[:, 3] = -30.0  # expert 3 never chosen
    experts = GroupedExperts(E, C, Fh, backend="torch", init_std=0.3)
    layer = MoELayer(FixedLogitsRouter(logits.clone(), K), experts, aux_loss_coeff=0.0)
    x = torch.randn(T, C, requires_grad=True)
    y, _ = layer(x, torch.zeros(T, dtype=torch.long))
    assert layer.last_tokens_per_expert.tolist()[3] == 0
    ref_experts = GroupedExperts(E, C, Fh, backend="torch")
    ref_experts.load_state_dict(experts.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    logits_ref = logits.clone().requires_grad_()
    ref = per_token_reference(x_ref, logits_ref, K, ref_experts)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.router.logits.grad, logits_ref.grad, atol=1e-5, rtol=1e-5)
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(getattr(experts, name).grad, getattr(ref_experts, name).grad,
                                   atol=1e-5, rtol=1e-5)
    assert experts.w_gate.grad[3].abs().max() == 0  # the starved expert gets no gradient


def test_grouped_experts_match_loop_reference():
    torch.manual_seed(1)
    ex = GroupedExperts(5, 6, 10, backend="torch", init_std=0.3)
    counts = torch.tensor([3, 0, 4, 0, 2])
    x = torch.randn(9, 6)
    ref = experts_loop_reference(x, counts, ex.w_gate, ex.w_up, ex.w_down)
    torch.testing.assert_close(ex(x, counts), ref, atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_hand_computed():
    # T=4 tokens, E=2, k=1: probs rows; assignments 3 to expert 0, 1 to expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3, 1])
    # f = [0.75, 0.25], P = [0.65, 0.35] -> 2 * (0.4875 + 0.0875) = 1.15
    assert abs(float(load_balancing_loss(probs, counts, 1)) - 1.15) < 1e-6
    uniform = torch.full((4, 2), 0.5)
    assert abs(float(load_balancing_loss(uniform, torch.tensor([2, 2]), 1)) - 1.0) < 1e-6


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp: ln2, 1+ln2 -> mean of squares
    l2 = torch.log(torch.tensor(2.0))
    expected = (l2 ** 2 + (1 + l2) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_moe_aux_loss_is_weighted_and_differentiable():
    torch.manual_seed(2)
    router = TopKRouter(8, 4, 2, backend="torch", init_std=0.5)
    layer = MoELayer(router, GroupedExperts(4, 8, 8, backend="torch"), aux_loss_coeff=0.01, z_loss_coeff=0.001)
    x = torch.randn(2, 5, 8)
    y, aux = layer(x, torch.zeros(2, 5, dtype=torch.long))
    r = router(x.reshape(-1, 8), torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(aux, 0.01 * r.aux_loss + 0.001 * r.z_loss)
    aux.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0

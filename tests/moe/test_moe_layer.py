"""MoE layer vs a dumb per-token loop; aux-loss values on hand-computed cases."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_evomoe.moe.experts import GroupedExperts, every_expert_output, experts_loop_reference, is_weight_matrix
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.router import Router, TopKRouter, load_balancing_loss, router_z_loss
from megatron_evomoe.training.optim import build_optimizer


class FixedLogitsRouter(Router):
    """Router whose logits are a parameter: lets a test starve an expert on purpose."""

    def __init__(self, logits, top_k):
        super().__init__(logits.shape[1], top_k, renormalize=True, backend="torch")
        self.logits = nn.Parameter(logits)

    def compute_logits(self, z, modality):
        return self.logits + 0 * z.sum()


# (activation, bias): the SwiGLU experts of LLaMA-like models, Phi-2's GELU experts with fc1/fc2 biases
EXPERT_KINDS = [("swiglu", False), ("gelu_tanh", True), ("swiglu", True)]
KIND_IDS = ["swiglu", "gelu_bias", "swiglu_bias"]


def experts_with_biases(E, C, Fh, activation, bias, backend="torch", seed=0):
    """A bank with random weights and (if any) random, non-zero biases."""
    torch.manual_seed(seed)
    ex = GroupedExperts(E, C, Fh, backend=backend, init_std=0.3, activation=activation, bias=bias)
    with torch.no_grad():
        for k in ex.tensor_keys:
            if k.startswith("b_"):
                getattr(ex, k).normal_(0.0, 0.5)
    return ex


def one_expert(x, t, e, activation):
    """Expert e of the bank tensors t on one token x [C], written out as the dense FFN it is."""
    b = {k: (t[k][e] if t.get(k) is not None else 0.0) for k in ("b_gate", "b_up", "b_down")}
    up = x @ t["w_up"][e] + b["b_up"]
    h = F.gelu(up, approximate="tanh") if activation == "gelu_tanh" else F.silu(x @ t["w_gate"][e] + b["b_gate"]) * up
    return h @ t["w_down"][e] + b["b_down"]


def per_token_reference(x, router_logits, top_k, experts):
    probs = router_logits.float().softmax(-1)
    gates, idx = probs.topk(top_k, -1)
    gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    t = experts.tensors()
    for tok in range(x.shape[0]):
        for k in range(top_k):
            out[tok] = out[tok] + gates[tok, k] * one_expert(x[tok], t, idx[tok, k], experts.activation)
    return out


@pytest.mark.parametrize("activation,bias", EXPERT_KINDS, ids=KIND_IDS)
def test_moe_layer_matches_loop_with_starved_expert(activation, bias):
    torch.manual_seed(0)
    T, C, Fh, E, K = 13, 8, 12, 4, 2
    logits = torch.randn(T, E)
    logits[:, 3] = -30.0  # expert 3 never chosen
    experts = experts_with_biases(E, C, Fh, activation, bias)
    layer = MoELayer(FixedLogitsRouter(logits.clone(), K), experts, aux_loss_coeff=0.0)
    x = torch.randn(T, C, requires_grad=True)
    y, _ = layer(x, torch.zeros(T, dtype=torch.long))
    assert layer.last_tokens_per_expert.tolist()[3] == 0
    ref_experts = GroupedExperts(E, C, Fh, backend="torch", activation=activation, bias=bias)
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
    assert {n for n, _ in experts.named_parameters()} == set(experts.tensor_keys)
    for name in experts.tensor_keys:
        got = getattr(experts, name).grad
        torch.testing.assert_close(got, getattr(ref_experts, name).grad, atol=1e-5, rtol=1e-5)
        assert got[3].abs().max() == 0 and got[:3].abs().max() > 0, name  # the starved expert gets none


def test_gelu_experts_have_no_gate():
    ex = GroupedExperts(2, 4, 6, activation="gelu_tanh", bias=True)
    assert ex.w_gate is None and ex.b_gate is None
    assert {n: tuple(p.shape) for n, p in ex.named_parameters()} == {
        "w_up": (2, 4, 6), "w_down": (2, 6, 4), "b_up": (2, 6), "b_down": (2, 4)}
    assert not ex.b_up.detach().any() and not ex.b_down.detach().any()  # biases start at zero, as nn.Linear's here


def _bank_vs_loop(backend, activation, bias, dtype, tail=0):
    """(the bank's output and gradients, the fp32 loop's) on rows sorted by expert; `tail` rows past the
    last expert (they belong to none: zero output, no gradient into any tensor)."""
    ex = experts_with_biases(5, 6, 10, activation, bias, backend=backend, seed=1).to(dtype)
    counts = torch.tensor([3, 0, 4, 0, 2])
    x = torch.randn(9 + tail, 6, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(9 + tail, 6, generator=torch.Generator().manual_seed(3))
    xb = x.to(dtype).requires_grad_()
    y = ex(xb, counts)
    got = [y, *torch.autograd.grad(y, [xb, *ex.tensors().values()], dy.to(dtype))]
    ref_t = {k: v.detach().float().requires_grad_() for k, v in ex.tensors().items()}
    xr = x.to(dtype).float().requires_grad_()
    yr = experts_loop_reference(xr, counts, ref_t, activation)
    return got, [yr, *torch.autograd.grad(yr, [xr, *ref_t.values()], dy.to(dtype).float())]


@pytest.mark.parametrize("backend", ["torch", "loop", "cpu_ext", "triton"])
@pytest.mark.parametrize("activation,bias", EXPERT_KINDS, ids=KIND_IDS)
def test_grouped_experts_match_loop_reference(backend, activation, bias):
    """Every CPU-runnable backend (triton interpreted), forward and backward, fp32."""
    got, ref = _bank_vs_loop(backend, activation, bias, torch.float32, tail=2)
    names = ["y", "dx", *GroupedExperts(1, 1, 1, activation=activation, bias=bias).tensor_keys]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{backend} {name}: {m}")
    assert got[0][9:].abs().max() == 0  # the unrouted tail


@pytest.mark.parametrize("backend", ["torch", "cpu_ext"])
def test_gelu_bias_experts_bf16(backend):
    got, ref = _bank_vs_loop(backend, "gelu_tanh", True, torch.bfloat16)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=2e-2)


def test_every_expert_output_is_each_expert_on_all_tokens():
    ex = experts_with_biases(3, 4, 6, "gelu_tanh", True)
    x = torch.randn(5, 4)
    out = every_expert_output(ex, x)  # [E, T, C]
    t = ex.tensors()
    want = torch.stack([torch.stack([one_expert(x[i], t, e, "gelu_tanh") for i in range(5)]) for e in range(3)])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


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


def test_expert_biases_get_no_weight_decay():
    """Like the dense FFN's biases they come from: the [E, D] stacked biases are not matrices."""
    layer = MoELayer(TopKRouter(4, 2, 1, backend="torch"), GroupedExperts(2, 4, 6, activation="gelu_tanh", bias=True))
    params = list(layer.named_parameters())
    assert {n: is_weight_matrix(n, p) for n, p in params} == {
        "router.weight": True, "experts.w_up": True, "experts.w_down": True, "experts.b_up": False,
        "experts.b_down": False}
    opt = build_optimizer(params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device=torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {n for n, p in params if id(p) in decayed} == {"router.weight", "experts.w_up", "experts.w_down"}

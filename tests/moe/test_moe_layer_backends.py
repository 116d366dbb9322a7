"""The MoE layer on the Triton kernels (interpreted on CPU) equals the PyTorch path, forward and backward."""
import os

import pytest
import torch

from megatron_evomoe.moe.dtr import DynamicTokenRouter
from megatron_evomoe.moe.experts import GroupedExperts
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.router import TopKRouter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def build(router_type, backend, gelu_bias=False, seed=0):
    """gelu_bias: Phi-2's experts (GELU(tanh), per-expert fc1/fc2 biases, made non-zero here)."""
    torch.manual_seed(seed)
    C, E, K = 32, 4, 2
    if router_type == "dtr":
        router = DynamicTokenRouter(C, E, K, hyper_hidden=4, rank=4, embed_dim=8, backend=backend)
    else:
        router = TopKRouter(C, E, K, backend=backend, init_std=0.5)
    experts = GroupedExperts(E, C, 24, backend=backend, init_std=0.2, activation="gelu_tanh" if gelu_bias else
                             "swiglu", bias=gelu_bias)
    if gelu_bias:
        with torch.no_grad():
            experts.b_up.normal_(0.0, 0.3)
            experts.b_down.normal_(0.0, 0.3)
    return MoELayer(router, experts, aux_loss_coeff=0.01)


@pytest.mark.parametrize("router_type,gelu_bias", [("linear", False), ("dtr", False), ("linear", True)],
                         ids=["linear", "dtr", "linear_gelu_bias"])
def test_triton_backend_matches_torch(router_type, gelu_bias):
    ref, tri = build(router_type, "torch", gelu_bias), build(router_type, "triton", gelu_bias)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 32)  # 38 tokens: not a multiple of any tile
    mod = torch.randint(0, 2, (2, 19))
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, ar = ref(xr, mod)
    yt, at = tri(xt, mod)
    torch.testing.assert_close(yt, yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(at, ar, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(yr)
    (yr * g).sum().add(ar).backward()
    (yt * g).sum().add(at).backward()
    torch.testing.assert_close(xt.grad, xr.grad, atol=1e-4, rtol=1e-4)
    for (name, pr), (_, pt) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(pt.grad, pr.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")

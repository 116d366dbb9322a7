"""Fused softmax + top-k (kernels/topk_softmax.py) against torch.softmax + torch.topk.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py); ``gpu`` variants run on CUDA tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_evomoe.kernels import topk_softmax as kts  # noqa: E402
from tests.kernels.poison import poisoned_empty  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as NaN / -7: an element the kernel does not write shows up."""
    monkeypatch.setattr(kts, "_empty", poisoned_empty)


CASES = [
    # (T, E, K, renormalize, dtype)
    (37, 4, 1, True, torch.float32),
    (37, 4, 2, True, torch.float32),
    (50, 6, 4, True, torch.float32),
    (50, 6, 4, False, torch.float32),
    (19, 64, 2, True, torch.float32),
    (23, 130, 8, True, torch.float32),     # E not a power of two, > 128
    (41, 8, 2, True, torch.bfloat16),
    (5, 3, 3, True, torch.float32),        # K == E
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-{'renorm' if c[3] else 'raw'}-{str(c[4])[6:]}")
def test_matches_torch_forward_and_backward(case, device, poison):
    T, E, K, renorm, dtype = case
    g = torch.Generator().manual_seed(T * E + K)
    logits = (torch.randn(T, E, generator=g) * 2).to(device=device, dtype=dtype)
    probs, idx, gates = kts.topk_softmax_triton(logits, K, renorm)

    x = logits.clone().requires_grad_()
    ref_probs, ref_idx, ref_gates = kts.topk_softmax_reference(x, K, renorm)
    assert probs.dtype == gates.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(probs, ref_probs.detach(), rtol=1e-5, atol=1e-6)
    # ties (frequent among bf16 logits) go to the lower index: a stable descending sort
    assert torch.equal(idx, torch.sort(ref_probs.detach(), dim=-1, descending=True, stable=True).indices[:, :K])
    if dtype == torch.float32:  # random fp32 logits are not tied: exactly torch.topk's indices
        assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates, ref_gates.detach(), rtol=1e-5, atol=1e-6)
    if renorm and K > 1:
        torch.testing.assert_close(gates.sum(-1), torch.ones(T, device=device))

    grad_probs = torch.randn(T, E, generator=g).to(device)
    grad_gates = torch.randn(T, K, generator=g).to(device)
    ((ref_probs * grad_probs).sum() + (ref_gates * grad_gates).sum()).backward()
    grad = kts.topk_softmax_backward_triton(grad_probs, grad_gates, probs, idx, gates, renorm)
    if dtype == torch.float32:  # autograd through torch.topk (same selection: no ties)
        torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-5)
    ref_grad = kts.topk_softmax_backward_reference(grad_probs, grad_gates, probs, idx, gates, renorm)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    # gates only (what a router returns to the MoE layer)
    grad_g = kts.topk_softmax_backward_triton(None, grad_gates, probs, idx, gates, renorm)
    grad_ref = kts.topk_softmax_backward_reference(None, grad_gates, probs, idx, gates, renorm)
    torch.testing.assert_close(grad_g, grad_ref, rtol=1e-4, atol=1e-6)


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 1.0, 0.0, 1.0, -1.0]])
    _, idx, gates = kts.topk_softmax_triton(logits, 3, False)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2], [1, 3, 0]]
    expected = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True, stable=True)
    assert torch.equal(idx, expected.indices[:, :3])
    torch.testing.assert_close(gates, expected.values[:, :3])


def test_empty_and_extreme_logits():
    probs, idx, gates = kts.topk_softmax_triton(torch.zeros(0, 6), 2)
    assert probs.shape == (0, 6) and idx.shape == (0, 2) and gates.shape == (0, 2)
    big = torch.tensor([[1e4, -1e4, 0.0, 5.0]])
    probs, idx, gates = kts.topk_softmax_triton(big, 2, True)
    assert torch.isfinite(probs).all() and idx[0, 0] == 0
    torch.testing.assert_close(probs, torch.softmax(big, -1))

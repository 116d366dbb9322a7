"""megatron_evomoe.ops.topk_softmax: backend choice, Triton vs PyTorch (values and gradients), custom-op checks.

The Triton backend runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_evomoe.ops import backend as be  # noqa: E402
from megatron_evomoe.ops import topk_softmax as ops  # noqa: E402


def test_auto_on_cpu_is_torch():
    assert be.resolve_backend("auto", "topk_softmax", torch.device("cpu")) == "torch"


def test_triton_without_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(be.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.topk_softmax(torch.randn(4, 4), 1, backend="triton")


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_softmax(torch.randn(3, 4), 5)


@pytest.mark.parametrize("top_k,renorm", [(1, True), (2, True), (3, False)])
def test_topk_softmax_triton_matches_torch(top_k, renorm):
    logits = torch.randn(33, 6, generator=torch.Generator().manual_seed(top_k)) * 2
    res = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        probs, idx, gates = ops.topk_softmax(x, top_k, renorm, backend=backend)
        ((probs * torch.arange(6.0)).sum() + (gates * torch.linspace(-1, 1, top_k)).sum()).backward()
        res[backend] = (probs, idx, gates, x.grad)
    for a, b in zip(res["triton"], res["torch"]):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


def test_opcheck_custom_ops():
    logits = torch.randn(9, 5)
    probs, idx, gates = ops.topk_softmax_op(logits, 2, True)
    torch.library.opcheck(ops.topk_softmax_op, (logits, 2, True))
    torch.library.opcheck(ops.topk_softmax_op, (logits.clone().requires_grad_(), 2, True))
    torch.library.opcheck(ops.topk_softmax_backward_op, (None, torch.randn(9, 2), probs, idx, gates, True))

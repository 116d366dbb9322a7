"""megatron_evomoe.ops.dtr: backend choice, Triton vs PyTorch (values and every gradient), custom-op checks.

The Triton backend runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py)."""
import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_evomoe.kernels.dtr_config import DTR_PARAM_NAMES  # noqa: E402
from megatron_evomoe.kernels.dtr_reference import dtr_reference_bilinear  # noqa: E402
from megatron_evomoe.ops import backend as be  # noqa: E402
from megatron_evomoe.ops import dtr as ops  # noqa: E402

NAMES = ("z",) + DTR_PARAM_NAMES


def make(T=29, C=24, H=6, R=3, D=5, E=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std: (torch.randn(*shape, generator=g) * std).to(dtype)  # noqa: E731
    params = [rnd(2, H, C, std=C ** -0.5), rnd(2, H, std=0.5), rnd(2, H, 2 * R, C, std=0.5 * (C * H) ** -0.5),
              rnd(2, 2 * R, C, std=0.5 * C ** -0.5), rnd(2, H, D, R, std=0.5 * (H * R) ** -0.5),
              rnd(2, D, R, std=0.5 * R ** -0.5), rnd(E, D, std=D ** -0.5), rnd(E, std=0.5)]
    z = rnd(T, C, std=1.0)
    mod = torch.randint(0, 2, (T,), generator=g)
    return z, mod, params


def leaves(z, params, z_grad=True):
    return z.clone().requires_grad_(z_grad), [p.clone().requires_grad_() for p in params]


def loss_of(out, seed=5):
    """A loss that reaches logits, probs, gates and prob_sum (as the LM loss and the aux loss do)."""
    logits, probs, idx, gates, prob_sum, counts = out
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(t.shape, generator=g) for t in (logits, probs, gates, prob_sum)]
    return sum((t * wt).sum() for t, wt in zip((logits, probs, gates, prob_sum), w))


# ------------------------------------------------------------------------------------- backend choice

def test_auto_on_cpu_is_torch_and_logged_once(caplog):
    be.reset_logged()
    z, mod, params = make()
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        out = ops.dtr_route(z, mod, *params, top_k=2)
        ops.dtr_route(z, mod, *params, top_k=2)
    msgs = [r.getMessage() for r in caplog.records if "dtr_route" in r.getMessage()]
    assert len(msgs) == 1 and "torch" in msgs[0], msgs
    ref = dtr_reference_bilinear(z, mod, *params, 2)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_triton_without_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, mod, params = make()
    with pytest.raises(be.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.dtr_route(z, mod, *params, top_k=1, backend="triton")


def test_bad_arguments_raise_value_errors():
    z, mod, params = make()
    with pytest.raises(ValueError, match="backend"):
        ops.dtr_route(z, mod, *params, top_k=1, backend="cuda")
    with pytest.raises(ValueError, match="activation"):
        ops.dtr_route(z, mod, *params, top_k=1, activation="tanh")
    with pytest.raises(ValueError, match="top_k"):
        ops.dtr_route(z, mod, *params, top_k=0)
    with pytest.raises(ValueError, match="w2_up"):
        ops.dtr_route(z, mod, *params[:4], params[4][:, :, :, :2], *params[5:], top_k=1)
    with pytest.raises(ValueError, match="modality ids"):
        ops.dtr_route(z, torch.full_like(mod, 2), *params, top_k=1)
    with pytest.raises(ValueError, match="phi_b"):
        ops.dtr_route(z, mod, *params[:7], params[7].to(torch.int64), top_k=1)
    with pytest.raises(be.BackendUnavailableError, match="dtr_route"):  # no CUDA-extension router: no fallback
        ops.dtr_route(z, mod, *params, top_k=1, backend="cuda_ext")


# ------------------------------------------------------------------------------------- triton == torch

@pytest.mark.parametrize("top_k,activation,dtype", [(1, None, torch.float32), (2, "gelu", torch.float32),
                                                    (2, None, torch.bfloat16)])
def test_dtr_route_triton_matches_torch(top_k, activation, dtype):
    z, mod, params = make(dtype=dtype)
    outs, grads = {}, {}
    for backend in ("torch", "triton"):
        zl, pl = leaves(z, params)
        out = ops.dtr_route(zl, mod, *pl, top_k=top_k, renormalize=True, activation=activation, backend=backend)
        loss_of(out).backward()
        outs[backend] = out
        grads[backend] = [zl.grad] + [p.grad for p in pl]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    names = ("logits", "probs", "topk_idx", "gates", "prob_sum", "counts")
    for name, a, b in zip(names, outs["triton"], outs["torch"]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name
    limit = 1e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(NAMES, grads["triton"], grads["torch"]):
        assert a is not None and a.dtype == b.dtype and a.shape == b.shape, name
        err = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
        assert err <= limit, f"d{name}: relative error {err:.2e}"


def test_router_only_training_and_non_differentiable_outputs():
    """Stage III trains the router alone: z does not need a gradient; idx/counts carry none."""
    z, mod, params = make()
    _, pl = leaves(z, params)
    out = ops.dtr_route(z, mod, *pl, top_k=1, backend="triton")
    assert not out[2].requires_grad and not out[5].requires_grad
    assert out[0].requires_grad and out[3].requires_grad and out[4].requires_grad
    out[3].sum().backward()
    _, pr = leaves(z, params)
    dtr_reference_bilinear(z, mod, *pr, 1)[3].sum().backward()
    for name, a, b in zip(DTR_PARAM_NAMES, pl, pr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"d{name}: {m}")
    # z alone
    zl = z.clone().requires_grad_()
    ops.dtr_route(zl, mod, *params, top_k=1, backend="triton")[0].sum().backward()
    zr = z.clone().requires_grad_()
    dtr_reference_bilinear(zr, mod, *params, 1)[0].sum().backward()
    torch.testing.assert_close(zl.grad, zr.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- custom ops

def test_opcheck_custom_ops():
    z, mod, params = make(T=17, C=16, H=4, R=2, D=3, E=4)
    out = ops.dtr_route_op(z, mod, *params, 2, True, "none")
    g = torch.randn(17, 4)
    zl, pl = leaves(z, params)  # all four checks, the registered autograd and aot_dispatch_dynamic included
    torch.library.opcheck(ops.dtr_route_op, (zl, mod, *pl, 2, True, "none"))
    torch.library.opcheck(ops.dtr_route_backward_op, (g, z, mod, *params, *out[6:], "none", True, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.dtr_route_backward_op, (g, z, mod, *params, *out[6:], "none", False, True),
                          test_utils=("test_schema", "test_faketensor"))

"""Router ops: the fused Dynamic Token-aware Router (DTR) and fused softmax + top-k (linear router).

Layers: Triton kernels (kernels/router.py, kernels/topk_softmax.py) -> ``torch.library`` custom ops
with fake impls (opaque nodes under torch.compile) and their backward registered on them ->
``DTRRouteFunction`` / ``TopKSoftmaxFunction`` (autograd.Function) -> ``dtr_route`` / ``topk_softmax``,
which pick the backend (``backend.resolve_backend``: "auto" is compiled Triton on CUDA tensors,
PyTorch otherwise; "triton" on CPU needs TRITON_INTERPRET=1, else BackendUnavailableError).

The PyTorch backend is the reference of each kernel file (the bilinear DTR with einsums; softmax +
torch.topk), differentiable by autograd. Both backends return the same things:

    dtr_route(...)    -> logits [T,E] fp32, probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32,
                         prob_sum [E] fp32 (sum of probs over tokens), counts [E] int64 (assignments)
    topk_softmax(...) -> probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32

Gradients flow from logits, probs, gates and prob_sum (the aux loss's G_i is prob_sum / T) to z and
every router parameter; topk_idx and counts are integer and carry none.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_evomoe.kernels import router as _kr
from megatron_evomoe.kernels import topk_softmax as _kts

from .backend import log_choice, resolve_backend

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACT_NAMES = {None: "none", "none": "none", "gelu": "gelu", "silu": "silu"}


def _act_name(activation) -> str:
    if activation not in _ACT_NAMES:
        raise ValueError(f"activation must be one of None, 'none', 'gelu', 'silu'; got {activation!r}")
    return _ACT_NAMES[activation]


def _act_arg(name: str):
    return None if name == "none" else name


# ================================================================================== topk_softmax

@torch.library.custom_op("megatron_evomoe::topk_softmax", mutates_args=())
def topk_softmax_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Fused (Triton) softmax + top-k: (probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32)."""
    return _kts.topk_softmax_triton(logits, top_k, renormalize)


@topk_softmax_op.register_fake
def _(logits, top_k, renormalize):
    log_choice("topk_softmax", "triton", logits.device.type, "chosen while tracing for torch.compile")
    T, E = logits.shape
    return (logits.new_empty((T, E), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int64),
            logits.new_empty((T, top_k), dtype=torch.float32))


@torch.library.custom_op("megatron_evomoe::topk_softmax_backward", mutates_args=())
def topk_softmax_backward_op(grad_probs: Optional[torch.Tensor], grad_gates: torch.Tensor, probs: torch.Tensor,
                             topk_idx: torch.Tensor, gates: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """dL/dlogits [T,E] fp32 from dL/dprobs (or None) and dL/dgates."""
    return _kts.topk_softmax_backward_triton(grad_probs, grad_gates, probs, topk_idx, gates, renormalize)


@topk_softmax_backward_op.register_fake
def _(grad_probs, grad_gates, probs, topk_idx, gates, renormalize):
    return torch.empty_like(probs)


def _topk_setup_context(ctx, inputs, output):
    logits, top_k, renormalize = inputs
    probs, topk_idx, gates = output
    ctx.save_for_backward(probs, topk_idx, gates)
    ctx.renormalize = renormalize
    ctx.logits_dtype = logits.dtype


def _topk_backward(ctx, grad_probs, grad_idx, grad_gates):
    probs, topk_idx, gates = ctx.saved_tensors
    if grad_gates is None:
        grad_gates = torch.zeros_like(gates)
    grad_logits = topk_softmax_backward_op(grad_probs, grad_gates, probs, topk_idx, gates, ctx.renormalize)
    return grad_logits.to(ctx.logits_dtype), None, None


topk_softmax_op.register_autograd(_topk_backward, setup_context=_topk_setup_context)


class TopKSoftmaxFunction(torch.autograd.Function):
    """(probs, topk_idx, gates) = fused softmax + top-k of logits; backward through probs and gates."""

    @staticmethod
    def forward(logits, top_k, renormalize):
        return topk_softmax_op(logits, top_k, renormalize)

    setup_context = staticmethod(_topk_setup_context)
    backward = staticmethod(_topk_backward)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = True, backend: str = "auto"):
    """Softmax (fp32) + top-k of router logits [T, E] -> (probs [T,E], topk_idx [T,K] int64, gates [T,K]).

    Gates are the top-k probabilities, renormalised to sum to 1 when ``renormalize`` and K > 1.
    Ties go to the lower expert index. Differentiable through probs and gates."""
    if logits.dim() != 2 or logits.dtype not in _FLOATS:
        raise ValueError(f"logits must be a float tensor [T, E]; got {logits.dtype} {tuple(logits.shape)}")
    if not 1 <= int(top_k) <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, E={logits.shape[1]}]; got {top_k}")
    chosen = resolve_backend(backend, "topk_softmax", logits.device)
    if chosen == "torch":
        return _kts.topk_softmax_reference(logits, int(top_k), bool(renormalize))
    return TopKSoftmaxFunction.apply(logits, int(top_k), bool(renormalize))


# ================================================================================== DTR

@torch.library.custom_op("megatron_evomoe::dtr_route", mutates_args=())
def dtr_route_op(z: torch.Tensor, mod: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2_down: torch.Tensor,
                 b2_down: torch.Tensor, w2_up: torch.Tensor, b2_up: torch.Tensor, phi_w: torch.Tensor,
                 phi_b: torch.Tensor, top_k: int, renormalize: bool, activation: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (Triton) DTR forward: (logits, probs, topk_idx, gates, prob_sum, counts, hpre, u, e);
    the last three ([T,H], [T,2R], [T,D] fp32) are saved for the backward."""
    return tuple(_kr.dtr_forward_triton(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                                        renormalize, _act_arg(activation)))


@dtr_route_op.register_fake
def _(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k, renormalize, activation):
    log_choice("dtr_route", "triton", z.device.type, "chosen while tracing for torch.compile")
    T = z.shape[0]
    E, D = phi_w.shape
    H, two_r = w2_down.shape[1], w2_down.shape[2]
    f32 = lambda *shape: z.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (f32(T, E), f32(T, E), z.new_empty((T, top_k), dtype=torch.int64), f32(T, top_k), f32(E),
            z.new_empty((E,), dtype=torch.int64), f32(T, H), f32(T, two_r), f32(T, D))


@torch.library.custom_op("megatron_evomoe::dtr_route_backward", mutates_args=())
def dtr_route_backward_op(grad_logits: torch.Tensor, z: torch.Tensor, mod: torch.Tensor, w1: torch.Tensor,
                          b1: torch.Tensor, w2_down: torch.Tensor, b2_down: torch.Tensor, w2_up: torch.Tensor,
                          b2_up: torch.Tensor, phi_w: torch.Tensor, phi_b: torch.Tensor, hpre: torch.Tensor,
                          u: torch.Tensor, e: torch.Tensor, activation: str, need_dz: bool, need_dparams: bool
                          ) -> list[torch.Tensor]:
    """Fused DTR backward from the total dL/dlogits: [dz, dw1, db1, dw2_down, db2_down, dw2_up, db2_up,
    dphi_w, dphi_b]; the gradients not asked for come back as empty [0] tensors."""
    grads = _kr.dtr_backward_triton(grad_logits, z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b,
                                    hpre, u, e, _act_arg(activation), need_dz=need_dz, need_dparams=need_dparams)
    return [g if g is not None else ref.new_empty((0,)) for g, ref in zip(grads, (z, w1, b1, w2_down, b2_down,
                                                                               w2_up, b2_up, phi_w, phi_b))]


@dtr_route_backward_op.register_fake
def _(grad_logits, z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, hpre, u, e, activation, need_dz,
      need_dparams):
    out = [torch.empty_like(z) if need_dz else z.new_empty((0,))]
    for p in (w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b):
        out.append(torch.empty_like(p) if need_dparams else p.new_empty((0,)))
    return out


_DTR_INPUTS = ("z", "mod", "w1", "b1", "w2_down", "b2_down", "w2_up", "b2_up", "phi_w", "phi_b")


def _dtr_setup_context(ctx, inputs, output):
    *tensors, top_k, renormalize, activation = inputs
    logits, probs, topk_idx, gates, prob_sum, counts, hpre, u, e = output
    ctx.save_for_backward(*tensors, probs, topk_idx, gates, hpre, u, e)
    ctx.renormalize = renormalize
    ctx.activation = activation
    ctx.mark_non_differentiable(topk_idx, counts, hpre, u, e)


def _dtr_backward(ctx, g_logits, g_probs, _g_idx, g_gates, g_prob_sum, _g_counts, _g_hpre, _g_u, _g_e):
    *tensors, probs, topk_idx, gates, hpre, u, e = ctx.saved_tensors
    z = tensors[0]
    need_dz = bool(ctx.needs_input_grad[0])
    need_dparams = any(ctx.needs_input_grad[2:10])
    if not (need_dz or need_dparams):
        return (None,) * 13
    # softmax / top-k part: everything that reaches probs (incl. prob_sum = probs.sum(0)) and gates
    if g_prob_sum is not None:
        g_probs = g_prob_sum[None, :].float().expand_as(probs) + (0 if g_probs is None else g_probs)
    if g_gates is None:
        g_gates = torch.zeros_like(gates)
    grad = topk_softmax_backward_op(g_probs, g_gates, probs, topk_idx, gates, ctx.renormalize)
    if g_logits is not None:
        grad = grad + g_logits.float()
    grads = dtr_route_backward_op(grad, *tensors, hpre, u, e, ctx.activation, need_dz, need_dparams)
    out = [grads[0] if need_dz else None, None]
    out += [g if (need_dparams and ctx.needs_input_grad[i + 2]) else None for i, g in enumerate(grads[1:])]
    return tuple(out) + (None, None, None)


dtr_route_op.register_autograd(_dtr_backward, setup_context=_dtr_setup_context)


class DTRRouteFunction(torch.autograd.Function):
    """Fused DTR forward; backward: softmax/top-k backward kernel, then the DTR backward kernels."""

    @staticmethod
    def forward(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k, renormalize, activation):
        return dtr_route_op(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k, renormalize,
                            activation)

    setup_context = staticmethod(_dtr_setup_context)
    backward = staticmethod(_dtr_backward)


def _check_dtr(z, mod, params, top_k):
    if z.dtype not in _FLOATS:
        raise ValueError(f"z must be float32/float16/bfloat16; got {z.dtype}")
    for name, p in zip(_DTR_INPUTS[2:], params):
        if p.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32/float16/bfloat16; got {p.dtype}")
        if p.device != z.device:
            raise ValueError(f"{name} is on {p.device} but z is on {z.device}")
    if mod.device != z.device:
        raise ValueError(f"mod is on {mod.device} but z is on {z.device}")
    dims = _kr.dtr_dims(z, mod, *params, top_k)
    _kr.check_modality_ids(mod, dims[2])


def dtr_route(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k, renormalize=True,
              activation=None, backend="auto"):
    """Dynamic Token-aware Router over z: [T, C] (layer-normed hidden states) with modality ids mod: [T]
    (0 text, 1 image) and the router parameters w1 [M,H,C], b1 [M,H], w2_down [M,H,2R,C], b2_down [M,2R,C],
    w2_up [M,H,D,R], b2_up [M,D,R], phi_w [E,D], phi_b [E].

    Returns (logits [T,E] fp32, probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32, prob_sum [E] fp32,
    counts [E] int64). ``activation``: None | "gelu" | "silu" between the hypernetwork layers.
    ``backend``: "auto" | "triton" | "torch" (see megatron_evomoe.ops.backend)."""
    params = (w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b)
    act = _act_name(activation)
    _check_dtr(z, mod, params, top_k)
    chosen = resolve_backend(backend, "dtr_route", z.device)
    if chosen == "torch":
        return _kr.dtr_reference_bilinear(z, mod, *params, int(top_k), bool(renormalize), _act_arg(act))
    out = DTRRouteFunction.apply(z, mod, *params, int(top_k), bool(renormalize), act)
    return tuple(out[:6])

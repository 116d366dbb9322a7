"""dtr_route: the fused Dynamic Token-aware Router (DTR) of EvoMoE, differentiable in z and every
router parameter.

Layers: Triton kernels (kernels/dtr_forward.py, kernels/dtr_backward.py) -> ``torch.library`` custom
ops (forward and backward, with fake impls: opaque nodes under torch.compile; the backward is
registered on the forward op with ``register_autograd``; it runs the softmax/top-k backward op of
ops/topk_softmax.py, then the DTR backward op) -> ``dtr_route()``, which picks the backend
(``backend.resolve_backend``: "auto" is compiled Triton on CUDA tensors, PyTorch otherwise;
"triton" on CPU needs TRITON_INTERPRET=1, else BackendUnavailableError).

The PyTorch backend is the bilinear reference of kernels/dtr_reference.py (einsums), differentiable
by autograd. Both backends return

    logits [T,E] fp32, probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32,
    prob_sum [E] fp32 (sum of probs over tokens), counts [E] int64 (assignments)

Gradients flow from logits, probs, gates and prob_sum (the aux loss's G_i is prob_sum / T) to z and
every router parameter; topk_idx and counts are integer and carry none.
"""
from __future__ import annotations

import torch

from megatron_evomoe.kernels.dtr_backward import dtr_backward_triton
from megatron_evomoe.kernels.dtr_config import DTR_PARAM_NAMES, check_modality_ids, dtr_dims
from megatron_evomoe.kernels.dtr_forward import dtr_forward_triton
from megatron_evomoe.kernels.dtr_reference import dtr_reference_bilinear

from .backend import log_choice, resolve_backend
from .topk_softmax import topk_softmax_backward_op

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACT_NAMES = {None: "none", "none": "none", "gelu": "gelu", "silu": "silu"}


def _act_name(activation) -> str:
    if activation not in _ACT_NAMES:
        raise ValueError(f"activation must be one of None, 'none', 'gelu', 'silu'; got {activation!r}")
    return _ACT_NAMES[activation]


def _act_arg(name: str):
    return None if name == "none" else name


@torch.library.custom_op("megatron_evomoe::dtr_route", mutates_args=())
def dtr_route_op(z: torch.Tensor, mod: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2_down: torch.Tensor,
                 b2_down: torch.Tensor, w2_up: torch.Tensor, b2_up: torch.Tensor, phi_w: torch.Tensor,
                 phi_b: torch.Tensor, top_k: int, renormalize: bool, activation: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (Triton) DTR forward: (logits, probs, topk_idx, gates, prob_sum, counts, hpre, u, e);
    the last three ([T,H], [T,2R], [T,D] fp32) are saved for the backward."""
    return tuple(dtr_forward_triton(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
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
    grads = dtr_backward_triton(grad_logits, z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b,
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


def _check_dtr(z, mod, params, top_k):
    if z.dtype not in _FLOATS:
        raise ValueError(f"z must be float32/float16/bfloat16; got {z.dtype}")
    for name, p in zip(DTR_PARAM_NAMES, params):
        if p.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32/float16/bfloat16; got {p.dtype}")
        if p.device != z.device:
            raise ValueError(f"{name} is on {p.device} but z is on {z.device}")
    if mod.device != z.device:
        raise ValueError(f"mod is on {mod.device} but z is on {z.device}")
    dims = dtr_dims(z, mod, *params, top_k)
    check_modality_ids(mod, dims[2])


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
        return dtr_reference_bilinear(z, mod, *params, int(top_k), bool(renormalize), _act_arg(act))
    out = dtr_route_op(z, mod, *params, int(top_k), bool(renormalize), act)
    return tuple(out[:6])

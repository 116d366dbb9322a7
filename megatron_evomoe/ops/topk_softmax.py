"""topk_softmax: fused softmax + top-k of the linear routers' logits, differentiable through probs and gates.

Layers: Triton kernels (kernels/topk_softmax.py) -> ``torch.library`` custom ops (forward and
backward, with fake impls: opaque nodes under torch.compile; the backward op is registered on the
forward one with ``register_autograd``) -> ``topk_softmax()``, which picks the backend
(``backend.resolve_backend``: "auto" is compiled Triton on CUDA tensors, PyTorch otherwise;
"triton" on CPU needs TRITON_INTERPRET=1, else BackendUnavailableError).

The PyTorch backend is the kernel file's reference (softmax + torch.topk), differentiable by
autograd. Both backends return probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_evomoe.kernels import topk_softmax as _k

from .backend import log_choice, resolve_backend

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("megatron_evomoe::topk_softmax", mutates_args=())
def topk_softmax_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Fused (Triton) softmax + top-k: (probs [T,E] fp32, topk_idx [T,K] int64, gates [T,K] fp32)."""
    return _k.topk_softmax_triton(logits, top_k, renormalize)


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
    return _k.topk_softmax_backward_triton(grad_probs, grad_gates, probs, topk_idx, gates, renormalize)


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
        return _k.topk_softmax_reference(logits, int(top_k), bool(renormalize))
    return topk_softmax_op(logits, int(top_k), bool(renormalize))

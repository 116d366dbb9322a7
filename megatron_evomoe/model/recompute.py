"""Activation recompute (`train.recompute`): keep fewer activations, recompute them in backward.

- ``none``: autograd keeps what it needs.
- ``full``: each decoder layer keeps only its input; its whole forward runs again in backward
  (Megatron's "full", torchtitan's "full" AC). Under TP/EP the layer's forward collectives run again
  too, on every rank in the same order, so they stay matched.
- ``selective``: the attention core (SDPA: the scores and probabilities, [B, nh, S, S] in the math
  kernel) and the up half of every FFN and expert MLP (the gate and up projections and the activation:
  three [T, F] tensors for SwiGLU, two for GELU) are recomputed; the FFN keeps its input and the
  activated hidden that the down projection needs. Neither region holds a collective.

A checkpointed forward runs twice: side effects that must count once (the routing statistics of
`MoELayer.routing_hook`) are skipped while `recomputing()` is true. The losses are not side effects:
the recomputed aux loss is discarded by autograd with the rest of the recomputed outputs. State that
the forward reads but that lives only for the top-level call (whether sequence parallelism is active:
parallel/tensor_parallel.py) is captured when the region first runs and restored for its rerun, which
backward starts after that call has returned: objects holding such state register with
`keep_for_recompute`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MODES = ("none", "selective", "full")

_local = threading.local()  # (autograd may run a backward, and so a recompute, on its own thread)
_kept: "weakref.WeakSet" = weakref.WeakSet()  # objects with forward_state() / set_forward_state(value)


def keep_for_recompute(obj) -> None:
    """A rerun sees `obj.forward_state()` as it was in the first forward of its region."""
    _kept.add(obj)


def recomputing() -> bool:
    """True while autograd reruns a checkpointed forward during backward."""
    return getattr(_local, "active", False)


@contextlib.contextmanager
def _recompute_context(forward_states: list):
    previous, _local.active = recomputing(), True
    now = [(obj, obj.forward_state()) for obj, _ in forward_states]
    for obj, value in forward_states:
        obj.set_forward_state(value)
    try:
        yield
    finally:
        _local.active = previous
        for obj, value in now:
            obj.set_forward_state(value)


def _contexts():
    """(around the first forward, around its rerun): called when the region first runs."""
    return contextlib.nullcontext(), _recompute_context([(obj, obj.forward_state()) for obj in list(_kept)])


def recomputed(fn, *args):
    """fn(*args), keeping only the inputs for backward, which runs fn again (only when autograd records)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def apply_recompute(model, mode: str) -> None:
    """Mark every present decoder layer for `mode` (idempotent; parameter names unchanged). Called in
    `parallelize` after every structure change, so a stage's new MLPs (evolving FFN, experts) follow."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute: {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    for layer in model.llm.layers:
        if not hasattr(layer, "attn"):  # an absent pipeline slot
            continue
        layer.recompute = mode
        layer.attn.recompute_core = mode == "selective"
        mlp = getattr(layer.mlp, "experts", layer.mlp)  # the MoE layer's experts, or the FFN
        mlp.recompute_hidden = mode == "selective"

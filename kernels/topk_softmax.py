"""Fused softmax + top-k for the linear MoE router (forward and backward), with its PyTorch reference.

One program handles BLOCK_T rows of ``logits: [T, E]``: softmax in fp32, then top-k by iterative
argmax with masking (K is small, E <= a few hundred), ties going to the lower expert index, the
same order ``torch.topk`` gives on non-tied inputs (descending values). Gates are the top-k
probabilities, renormalised to sum to 1 when ``renormalize`` and K > 1.

The tile helper ``softmax_topk_tile`` is shared with the fused DTR kernel (kernels/dtr_forward.py), so
both routers select experts with exactly the same code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _empty(*shape, **kwargs):
    """Output allocation (a hook: tests poison outputs with NaN to prove that kernels write every element)."""
    return torch.empty(*shape, **kwargs)


# ----------------------------------------------------------------------------- reference

def topk_softmax_reference(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """logits: [T, E] -> probs [T, E] fp32, topk_idx [T, K] int64, gates [T, K] fp32 (differentiable)."""
    probs = torch.softmax(logits.float(), dim=-1)
    gates, topk_idx = torch.topk(probs, top_k, dim=-1)
    if renormalize and top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, topk_idx, gates


def topk_softmax_backward_reference(grad_probs, grad_gates, probs, topk_idx, gates, renormalize: bool):
    """Gradient of the logits from the gradients of probs [T, E] (may be None) and gates [T, K]; fp32."""
    grad_probs = torch.zeros_like(probs) if grad_probs is None else grad_probs.float().clone()
    grad_gates = grad_gates.float()
    if renormalize and topk_idx.shape[-1] > 1:
        # gates = s / sum(s) with s the selected probs: ds_i = (dg_i - sum_k dg_k gates_k) / sum(s)
        sel = torch.gather(probs, -1, topk_idx)
        grad_sel = (grad_gates - (grad_gates * gates).sum(-1, keepdim=True)) / sel.sum(-1, keepdim=True)
    else:
        grad_sel = grad_gates
    grad_probs.scatter_add_(-1, topk_idx, grad_sel)
    return probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))


# ----------------------------------------------------------------------------- shared tile helper

@triton.jit
def softmax_topk_tile(logits, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                      RENORM: tl.constexpr):
    """logits: [BT, EP] fp32 (columns >= E ignored) -> probs [BT, EP], gates [BT, KP], idx [BT, KP] int32,
    chosen [BT, EP] bool (the K selected experts of each row)."""
    BT: tl.constexpr = logits.shape[0]
    ecol = tl.arange(0, EP)
    emask = ecol < E
    x = tl.where(emask[None, :], logits, float("-inf"))
    row_max = tl.max(x, axis=1)
    ex = tl.exp(x - row_max[:, None])
    probs = ex / tl.sum(ex, axis=1)[:, None]
    # Probabilities are >= 0: -1 marks padding columns, -2 marks experts already taken, so padding
    # can never be picked while K <= E real experts remain.
    sel = tl.where(emask[None, :], probs, -1.0)
    kcol = tl.arange(0, KP)
    gates = tl.zeros([BT, KP], dtype=tl.float32)
    idx = tl.zeros([BT, KP], dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(sel, axis=1)
        # lowest index among the maxima: torch.topk's order on non-tied rows, deterministic on ties
        arg = tl.min(tl.where(sel == best[:, None], ecol[None, :], EP), axis=1)
        gates = tl.where(kcol[None, :] == k, best[:, None], gates)
        idx = tl.where(kcol[None, :] == k, arg[:, None], idx)
        sel = tl.where(ecol[None, :] == arg[:, None], -2.0, sel)
    if RENORM:
        if K > 1:
            gates = gates / tl.sum(gates, axis=1)[:, None]
    chosen = sel == -2.0
    return probs, gates, idx, chosen


@triton.jit
def _row_block(T, E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's BLOCK_T token rows: (row mask [BT], rows as int64 [BT], expert columns [EP], top-k
    columns [KP], masks of the valid [BT, EP] and [BT, KP] entries)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    ecol = tl.arange(0, EP)
    kcol = tl.arange(0, KP)
    emask = rmask[:, None] & (ecol[None, :] < E)
    kmask = rmask[:, None] & (kcol[None, :] < K)
    return rmask, rows.to(tl.int64), ecol, kcol, emask, kmask


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _topk_softmax_fwd_kernel(logits_ptr, probs_ptr, idx_ptr, gates_ptr, T, stride_lt,
                             E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr,
                             RENORM: tl.constexpr, BLOCK_T: tl.constexpr):
    rmask, rows64, ecol, kcol, emask, kmask = _row_block(T, E, K, EP, KP, BLOCK_T)
    x = tl.load(logits_ptr + rows64[:, None] * stride_lt + ecol[None, :], mask=emask, other=0.0).to(tl.float32)
    probs, gates, idx, chosen = softmax_topk_tile(x, E, EP, K, KP, RENORM)
    tl.store(probs_ptr + rows64[:, None] * E + ecol[None, :], probs, mask=emask)
    tl.store(gates_ptr + rows64[:, None] * K + kcol[None, :], gates, mask=kmask)
    tl.store(idx_ptr + rows64[:, None] * K + kcol[None, :], idx.to(tl.int64), mask=kmask)


@triton.jit
def _topk_softmax_bwd_kernel(grad_probs_ptr, grad_gates_ptr, probs_ptr, idx_ptr, gates_ptr, grad_logits_ptr, T,
                             E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr,
                             RENORM: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr, BLOCK_T: tl.constexpr):
    rmask, rows64, ecol, kcol, emask, kmask = _row_block(T, E, K, EP, KP, BLOCK_T)
    p = tl.load(probs_ptr + rows64[:, None] * E + ecol[None, :], mask=emask, other=0.0)
    gg = tl.load(grad_gates_ptr + rows64[:, None] * K + kcol[None, :], mask=kmask, other=0.0).to(tl.float32)
    idx = tl.load(idx_ptr + rows64[:, None] * K + kcol[None, :], mask=kmask, other=EP).to(tl.int32)
    if HAS_GRAD_PROBS:
        gp = tl.load(grad_probs_ptr + rows64[:, None] * E + ecol[None, :], mask=emask, other=0.0).to(tl.float32)
    else:
        gp = tl.zeros([BLOCK_T, EP], dtype=tl.float32)
    gsel = gg
    if RENORM:
        if K > 1:
            g = tl.load(gates_ptr + rows64[:, None] * K + kcol[None, :], mask=kmask, other=0.0)
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k in tl.static_range(K):
                idx_k = tl.sum(tl.where(kcol[None, :] == k, idx, 0), axis=1)
                total += tl.sum(tl.where(ecol[None, :] == idx_k[:, None], p, 0.0), axis=1)
            total = tl.where(rmask, total, 1.0)
            gsel = (gg - tl.sum(gg * g, axis=1)[:, None]) / total[:, None]
    for k in tl.static_range(K):
        idx_k = tl.sum(tl.where(kcol[None, :] == k, idx, 0), axis=1)
        gsel_k = tl.sum(tl.where(kcol[None, :] == k, gsel, 0.0), axis=1)
        gp += tl.where(ecol[None, :] == idx_k[:, None], gsel_k[:, None], 0.0)
    dl = p * (gp - tl.sum(gp * p, axis=1)[:, None])
    tl.store(grad_logits_ptr + rows64[:, None] * E + ecol[None, :], dl, mask=emask)


# ----------------------------------------------------------------------------- launchers

def _pads(num_experts: int, top_k: int):
    return triton.next_power_of_2(num_experts), triton.next_power_of_2(top_k)


def _block_t(ep: int) -> int:
    # keep a [BLOCK_T, EP] fp32 tile around 4k elements (32 registers a thread at 4 warps)
    return max(1, min(128, 4096 // ep))


def topk_softmax_triton(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Fused kernel: logits [T, E] -> probs [T, E] fp32, topk_idx [T, K] int64, gates [T, K] fp32."""
    assert logits.dim() == 2 and 1 <= top_k <= logits.shape[1]
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    probs = _empty(num_tokens, num_experts, device=logits.device, dtype=torch.float32)
    topk_idx = _empty(num_tokens, top_k, device=logits.device, dtype=torch.int64)
    gates = _empty(num_tokens, top_k, device=logits.device, dtype=torch.float32)
    if num_tokens == 0:
        return probs, topk_idx, gates
    ep, kp = _pads(num_experts, top_k)
    block_t = _block_t(ep)
    grid = (triton.cdiv(num_tokens, block_t),)
    _topk_softmax_fwd_kernel[grid](logits, probs, topk_idx, gates, num_tokens, logits.stride(0),
                                   E=num_experts, K=top_k, EP=ep, KP=kp, RENORM=bool(renormalize),
                                   BLOCK_T=block_t, num_warps=4)
    return probs, topk_idx, gates


def topk_softmax_backward_triton(grad_probs, grad_gates, probs, topk_idx, gates, renormalize: bool):
    """Fused backward: grad of logits [T, E] fp32 from grad_probs [T, E] (or None) and grad_gates [T, K]."""
    num_tokens, num_experts = probs.shape
    top_k = topk_idx.shape[1]
    grad_logits = _empty(num_tokens, num_experts, device=probs.device, dtype=torch.float32)
    if num_tokens == 0:
        return grad_logits
    ep, kp = _pads(num_experts, top_k)
    block_t = _block_t(ep)
    has_gp = grad_probs is not None
    grad_probs = grad_probs.contiguous() if has_gp else probs  # dummy pointer, never read
    grid = (triton.cdiv(num_tokens, block_t),)
    _topk_softmax_bwd_kernel[grid](grad_probs, grad_gates.contiguous(), probs.contiguous(), topk_idx.contiguous(),
                                   gates.contiguous(), grad_logits, num_tokens,
                                   E=num_experts, K=top_k, EP=ep, KP=kp, RENORM=bool(renormalize),
                                   HAS_GRAD_PROBS=has_gp, BLOCK_T=block_t, num_warps=4)
    return grad_logits


# ----------------------------------------------------------------------------- AOT report

def _register_aot():
    from megatron_evomoe.kernels.aot import register_aot

    configs = []
    for e, k in ((4, 1), (64, 2), (128, 8)):
        ep, kp = _pads(e, k)
        configs.append(dict(E=e, K=k, EP=ep, KP=kp, RENORM=True, BLOCK_T=_block_t(ep), num_warps=4))
    register_aot(_topk_softmax_fwd_kernel,
                 {"logits_ptr": "*bf16", "probs_ptr": "*fp32", "idx_ptr": "*i64", "gates_ptr": "*fp32",
                  "T": "i32", "stride_lt": "i32"},
                 configs, name="topk_softmax_fwd")
    register_aot(_topk_softmax_bwd_kernel,
                 {"grad_probs_ptr": "*fp32", "grad_gates_ptr": "*fp32", "probs_ptr": "*fp32", "idx_ptr": "*i64",
                  "gates_ptr": "*fp32", "grad_logits_ptr": "*fp32", "T": "i32"},
                 [dict(c, HAS_GRAD_PROBS=True) for c in configs], name="topk_softmax_bwd")


_register_aot()

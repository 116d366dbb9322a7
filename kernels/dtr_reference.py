"""PyTorch references of the Dynamic Token-aware Router (DTR) of EvoMoE, which the Triton kernels
(dtr_forward.py, dtr_backward.py) are tested against.

Math, for token z: [C] of modality m (0 text, 1 image), with the per-modality hypernetwork
(w1 [M, H, C], b1 [M, H], w2_down [M, H, 2R, C], b2_down [M, 2R, C], w2_up [M, H, D, R], b2_up [M, D, R])
and the shared phi (phi_w [E, D], phi_b [E])::

    h      = act(w1[m] @ z + b1[m])                              # [H]
    u      = sum_j h_j (w2_down[m, j] @ z) + b2_down[m] @ z     # [2R]  = Theta_down(z) @ z
    a      = silu(u[:R]) * u[R:]                                 # [R]   SwiGLU
    e      = sum_j h_j (w2_up[m, j] @ a) + b2_up[m] @ a         # [D]   = Theta_up(z) @ a
    logits = phi_w @ e + phi_b                                   # [E]
    probs  = softmax(logits); top-k; gates (renormalised when asked and K > 1)

Theta_down(z) = sum_j h_j w2_down[m, j] + b2_down[m] is never built by the bilinear reference (it is
T*2R*C floats, 2 GiB at 16k tokens, R=8, C=2048): like the kernel, it computes
P = z @ w2_down[m].reshape(H*2R, C)^T and contracts P with h. It is the ops' "torch" backend (what
models run on CPU). The materialised reference builds Theta_down and Theta_up, as the paper writes
the DTR (tests and benchmarks only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_evomoe.kernels.dtr_config import activation_id
from megatron_evomoe.kernels.permute import expert_histogram_reference
from megatron_evomoe.kernels.topk_softmax import topk_softmax_reference


def apply_activation(x: torch.Tensor, activation) -> torch.Tensor:
    act = activation_id(activation)
    if act == 1:
        return F.gelu(x)
    if act == 2:
        return F.silu(x)
    return x


def _stats(probs, topk_idx, num_experts):
    prob_sum = probs.sum(dim=0)
    counts = expert_histogram_reference(topk_idx, num_experts)  # scatter_add: static shape, no host sync
    return prob_sum, counts


def _route(logits, top_k, renormalize, num_experts):
    probs, topk_idx, gates = topk_softmax_reference(logits, top_k, renormalize)
    prob_sum, counts = _stats(probs, topk_idx, num_experts)
    return logits, probs, topk_idx, gates, prob_sum, counts


def _per_modality_logits(z, mod, w1, b1, phi_w, phi_b, activation, embed):
    """logits [T, E] fp32 = phi_w e + phi_b, with e [T, D] = embed(m, z_m, h_m) over the tokens of each
    modality m: z_m [Tm, C] fp32, h_m = act(w1[m] z_m + b1[m]) [Tm, H].

    Eager gathers each modality's tokens (Tm is data-dependent); under torch.compile every token goes
    through each modality's weights and a select keeps its own (static shapes: no graph break, no
    host sync; M = 2, so twice the router's FLOPs, only there)."""
    zf = z.float()
    e = zf.new_zeros(z.shape[0], phi_w.shape[1])
    static = torch.compiler.is_compiling()
    for m in range(w1.shape[0]):
        sel = None if static else (mod == m).nonzero(as_tuple=True)[0]
        if sel is not None and sel.numel() == 0:
            continue
        zm = zf if sel is None else zf[sel]                                          # [Tm, C]
        h = apply_activation(zm @ w1[m].float().t() + b1[m].float(), activation)    # [Tm, H]
        em = embed(m, zm, h)                                                         # [Tm, D]
        e = torch.where((mod == m)[:, None], em, e) if sel is None else e.index_copy(0, sel, em)
    return e @ phi_w.float().t() + phi_b.float()


def dtr_logits_bilinear(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, activation=None):
    """DTR logits [T, E] fp32 with the bilinear form (einsums), tokens grouped by modality."""
    _, hyper, two_r, hidden = w2_down.shape
    rank, emb = two_r // 2, w2_up.shape[2]

    def embed(m, zm, h):
        p = (zm @ w2_down[m].float().reshape(hyper * two_r, hidden).t()).view(-1, hyper, two_r)
        u = torch.einsum("tj,tjr->tr", h, p) + zm @ b2_down[m].float().t()   # [Tm, 2R]
        a = F.silu(u[:, :rank]) * u[:, rank:]                                # [Tm, R]
        q = (a @ w2_up[m].float().reshape(hyper * emb, rank).t()).view(-1, hyper, emb)
        return torch.einsum("tj,tjd->td", h, q) + a @ b2_up[m].float().t()   # [Tm, D]

    return _per_modality_logits(z, mod, w1, b1, phi_w, phi_b, activation, embed)


def dtr_reference_bilinear(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                           renormalize=True, activation=None):
    """The PyTorch DTR (what models use on CPU) -> logits, probs, topk_idx, gates, prob_sum, counts."""
    logits = dtr_logits_bilinear(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, activation)
    return _route(logits, top_k, renormalize, phi_w.shape[0])


def dtr_reference_materialized(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                               renormalize=True, activation=None):
    """The DTR as the paper writes it: builds Theta_down [T, 2R, C] and Theta_up [T, D, R] for every
    token (T*2R*C floats; tests and benchmarks only)."""
    rank = w2_down.shape[2] // 2

    def embed(m, zm, h):
        theta_down = torch.einsum("tj,jrc->trc", h, w2_down[m].float()) + b2_down[m].float()   # [Tm, 2R, C]
        u = torch.einsum("trc,tc->tr", theta_down, zm)
        a = F.silu(u[:, :rank]) * u[:, rank:]
        theta_up = torch.einsum("tj,jdr->tdr", h, w2_up[m].float()) + b2_up[m].float()         # [Tm, D, R]
        return torch.einsum("tdr,tr->td", theta_up, a)

    logits = _per_modality_logits(z, mod, w1, b1, phi_w, phi_b, activation, embed)
    return _route(logits, top_k, renormalize, phi_w.shape[0])

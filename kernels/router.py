"""Fused Dynamic Token-aware Router (DTR) of EvoMoE: forward and backward Triton kernels, with the
PyTorch references they are tested against.

Math, for token z: [C] of modality m (0 text, 1 image), with the per-modality hypernetwork
(w1 [M, H, C], b1 [M, H], w2_down [M, H, 2R, C], b2_down [M, 2R, C], w2_up [M, H, D, R], b2_up [M, D, R])
and the shared phi (phi_w [E, D], phi_b [E])::

    h      = act(w1[m] @ z + b1[m])                              # [H]
    u      = sum_j h_j (w2_down[m, j] @ z) + b2_down[m] @ z     # [2R]  = Theta_down(z) @ z
    a      = silu(u[:R]) * u[R:]                                 # [R]   SwiGLU
    e      = sum_j h_j (w2_up[m, j] @ a) + b2_up[m] @ a         # [D]   = Theta_up(z) @ a
    logits = phi_w @ e + phi_b                                   # [E]
    probs  = softmax(logits); top-k; gates (renormalised when asked and K > 1)

Theta_down(z) = sum_j h_j w2_down[m, j] + b2_down[m] is never built (it is T*2R*C floats, 2 GiB
at 16k tokens, R=8, C=2048): the kernel computes P = z @ w2_down[m].reshape(H*2R, C)^T for a
block of tokens, tile by tile over C, and contracts P with h in registers (a bilinear form).

Modalities: tokens are grouped by modality (a stable argsort of ``mod`` on the host side, no
device sync: the grid is an upper bound, cdiv(T, BT) + M - 1 blocks, and each program finds its
modality and rows from the per-modality offsets in device memory). Every block then has a single
modality, so its weight tiles are plain 2-D tiles and no FLOPs are spent on the other modality's
hypernetwork. The alternative, computing the block with both modalities' weights and selecting
per row, doubles the dominant GEMM (z @ w2_down^T) for every block.

Kernels (all over the modality-grouped token order, gathering z rows through ``perm``):
  _dtr_fwd_kernel        per token block: one pass over C for h = w1 z + b1 and b2_down z, then
                         NUM_J passes for the bilinear u (HJ hypernetwork rows j each; the z block is
                         re-read from L2, the price of keeping the accumulators in registers), SwiGLU,
                         e, logits, softmax, top-k and per-block expert statistics. Saves hpre [T, H],
                         u [T, 2R], e [T, D] (small per-token activations, never per-token weights).
  _dtr_bwd_token_kernel  per token block, from ge = dL/de = dL/dlogits @ phi_w (torch): gu = dL/du
                         [T, 2R] and ghpre = dL/d(w1 z + b1) [T, H]; recomputes P = z @ w2_down^T
                         (NUM_J more passes over z) for the dL/dh term that needs it.
  _dtr_bwd_dz_kernel     per (token block, C tile): dz = ghpre @ w1[m] + gu @ b2_down[m] + (h (x) gu) @ w2_down[m].
  _dtr_bwd_dw_kernel     per (modality, j chunk, C tile, token split): dw2_down, dw1, db2_down as
                         sums over the modality's tokens of outer products with z.
The small parameter gradients (db1, w2_up, b2_up, phi) are GEMMs over the saved per-token
activations ([T, M*H] x [T, D*R] at most), done in torch.

Determinism: nothing uses atomics. Per-block expert statistics and per-split weight-gradient
partials are written to scratch buffers and summed by torch in a fixed order, so results are
bitwise reproducible run to run. The price: a [splits, M, H*2R, C] fp32 scratch buffer (splits is
about 2 * SMs / (M * NUM_J * C tiles); a few tens of MiB at the paper's sizes) and one more read of
it. fp32 atomic_add into [M, H*2R, C] would save that memory but make every weight gradient depend
on the order in which blocks finish.

Padding: tl.arange and tl.dot want power-of-two sizes and dot dimensions >= 16, so H, D, E are padded
to HP, DP, EP >= 16 and R to RP (power of two) for the bilinear contraction (the dominant GEMM, where
padding would waste FLOPs) and to RA >= 16 where r is a dot dimension. Per-token vectors are moved
between the two r layouts through their global-memory copy (store, barrier, load), which is cheaper
than shuffling registers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megatron_evomoe.kernels.topk_softmax import softmax_topk_tile, topk_softmax_reference

NUM_MODALITIES = 2
ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "silu": 2}


def _empty(*shape, **kwargs):
    """Output allocation (a hook: tests poison outputs with NaN to prove that kernels write every element)."""
    return torch.empty(*shape, **kwargs)


def activation_id(activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'none', 'gelu', 'silu'; got {activation!r}")
    return ACTIVATIONS[activation]


def _apply_activation(x: torch.Tensor, activation) -> torch.Tensor:
    act = activation_id(activation)
    if act == 1:
        return F.gelu(x)
    if act == 2:
        return F.silu(x)
    return x


# ============================================================================= shape checks

DTR_PARAM_NAMES = ("w1", "b1", "w2_down", "b2_down", "w2_up", "b2_up", "phi_w", "phi_b")


def dtr_dims(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k):
    """Validate shapes; returns (T, C, M, H, R, D, E). Raises ValueError naming the bad field."""
    if z.dim() != 2:
        raise ValueError(f"z must be [T, C]; got shape {tuple(z.shape)}")
    num_tokens, hidden = z.shape
    if mod.shape != (num_tokens,) or mod.dtype.is_floating_point or mod.dtype.is_complex:
        raise ValueError(f"mod must be an integer (or bool image-mask) tensor [T={num_tokens}]; "
                         f"got {tuple(mod.shape)} {mod.dtype}")
    if w1.dim() != 3 or w1.shape[2] != hidden:
        raise ValueError(f"w1 must be [M, H, C={hidden}]; got {tuple(w1.shape)}")
    num_mod, hyper = w1.shape[:2]
    if w2_down.dim() != 4 or w2_down.shape[0] != num_mod or w2_down.shape[1] != hyper \
            or w2_down.shape[3] != hidden or w2_down.shape[2] % 2:
        raise ValueError(f"w2_down must be [M={num_mod}, H={hyper}, 2R, C={hidden}]; got {tuple(w2_down.shape)}")
    rank = w2_down.shape[2] // 2
    if w2_up.dim() != 4 or w2_up.shape[0] != num_mod or w2_up.shape[1] != hyper or w2_up.shape[3] != rank:
        raise ValueError(f"w2_up must be [M={num_mod}, H={hyper}, D, R={rank}]; got {tuple(w2_up.shape)}")
    emb = w2_up.shape[2]
    if phi_w.dim() != 2 or phi_w.shape[1] != emb:
        raise ValueError(f"phi_w must be [E, D={emb}]; got {tuple(phi_w.shape)}")
    num_experts = phi_w.shape[0]
    expected = {"b1": (num_mod, hyper), "b2_down": (num_mod, 2 * rank, hidden), "b2_up": (num_mod, emb, rank),
                "phi_b": (num_experts,)}
    for name, t in (("b1", b1), ("b2_down", b2_down), ("b2_up", b2_up), ("phi_b", phi_b)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {list(expected[name])}; got {list(t.shape)}")
    if not 1 <= int(top_k) <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}]; got {top_k}")
    return num_tokens, hidden, num_mod, hyper, rank, emb, num_experts


# ============================================================================= references

def _stats(probs, topk_idx, num_experts):
    prob_sum = probs.sum(dim=0)
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts)
    return prob_sum, counts


def _route(logits, top_k, renormalize, num_experts):
    probs, topk_idx, gates = topk_softmax_reference(logits, top_k, renormalize)
    prob_sum, counts = _stats(probs, topk_idx, num_experts)
    return logits, probs, topk_idx, gates, prob_sum, counts


def dtr_logits_bilinear(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, activation=None):
    """DTR logits [T, E] fp32 with the bilinear form (einsums), tokens grouped by modality."""
    num_tokens = z.shape[0]
    num_mod, hyper, two_r, hidden = w2_down.shape
    rank, emb = two_r // 2, w2_up.shape[2]
    zf = z.float()
    e = zf.new_zeros(num_tokens, emb)
    for m in range(num_mod):
        sel = (mod == m).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        zm = zf[sel]                                                          # [Tm, C]
        h = _apply_activation(zm @ w1[m].float().t() + b1[m].float(), activation)   # [Tm, H]
        p = (zm @ w2_down[m].float().reshape(hyper * two_r, hidden).t()).view(-1, hyper, two_r)
        u = torch.einsum("tj,tjr->tr", h, p) + zm @ b2_down[m].float().t()   # [Tm, 2R]
        a = F.silu(u[:, :rank]) * u[:, rank:]                                # [Tm, R]
        q = (a @ w2_up[m].float().reshape(hyper * emb, rank).t()).view(-1, hyper, emb)
        em = torch.einsum("tj,tjd->td", h, q) + a @ b2_up[m].float().t()     # [Tm, D]
        e = e.index_copy(0, sel, em)
    return e @ phi_w.float().t() + phi_b.float()


def dtr_reference_bilinear(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                           renormalize=True, activation=None):
    """The PyTorch DTR (what models use on CPU) -> logits, probs, topk_idx, gates, prob_sum, counts."""
    logits = dtr_logits_bilinear(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, activation)
    return _route(logits, top_k, renormalize, phi_w.shape[0])


def dtr_reference_materialized(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                               renormalize=True, activation=None):
    """The DTR as the paper writes it: builds Theta_down [T, 2R, C] and Theta_up [T, D, R] for every
    token (T*2R*C floats; tests and benchmarks only)."""
    num_tokens = z.shape[0]
    num_mod, _, two_r, hidden = w2_down.shape
    rank, emb = two_r // 2, w2_up.shape[2]
    zf = z.float()
    e = zf.new_zeros(num_tokens, emb)
    for m in range(num_mod):
        sel = (mod == m).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        zm = zf[sel]
        h = _apply_activation(zm @ w1[m].float().t() + b1[m].float(), activation)
        theta_down = torch.einsum("tj,jrc->trc", h, w2_down[m].float()) + b2_down[m].float()   # [Tm, 2R, C]
        u = torch.einsum("trc,tc->tr", theta_down, zm)
        a = F.silu(u[:, :rank]) * u[:, rank:]
        theta_up = torch.einsum("tj,jdr->tdr", h, w2_up[m].float()) + b2_up[m].float()         # [Tm, D, R]
        e = e.index_copy(0, sel, torch.einsum("tdr,tr->td", theta_up, a))
    logits = e @ phi_w.float().t() + phi_b.float()
    return _route(logits, top_k, renormalize, phi_w.shape[0])


# ============================================================================= Triton kernels
#
# Tile rules that keep the compiled kernels in registers (checked by `python -m
# megatron_evomoe.kernels.aot`: no spills on sm_80 / sm_90 at the registered shapes):
# * Triton lays out the tl.dot of a loop body that holds more than one dot with all warps along M
#   (its "chained dot" rule), so the token tile is BLOCK_T = 16 * num_warps: one 16-row MMA tile per
#   warp (with fewer rows the warps would compute the same rows), each thread holding N/2 fp32
#   accumulators of an [BLOCK_T, N] result. N is bounded by chunking the hypernetwork rows j.
# * Chunk loops are runtime loops (`range`), not `tl.static_range`: unrolled copies let the
#   compiler hoist every copy's pipeline prologue (the z tile's pointers) to the top of the kernel
#   and keep them all live, which spilled.
# * Per-token vectors needed in another chunking or another r padding are read back from their
#   global-memory copy (store, barrier, load) instead of being sliced in registers.
# * The small fp32 GEMMs (phase 2 of the forward, the backward's (j, d) and (d, r) contractions) use
#   3xTF32 with B operands of at most 16-64 columns: sm_80 keeps MMA B operands in registers.

@triton.jit
def _act(x, ACT: tl.constexpr):
    y = x
    if ACT == 1:  # exact (erf) GELU, as torch.nn.functional.gelu
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    if ACT == 2:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    d = x * 0.0 + 1.0
    if ACT == 1:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    if ACT == 2:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    return d


@triton.jit
def _block_rows(pid, off_ptr, M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block ``pid`` of the modality-grouped token order -> (modality, first row, end row of that modality).
    Blocks never straddle modalities; programs past the last block get an empty row range."""
    m = pid * 0
    row0 = pid * 0
    row_end = pid * 0
    first = pid * 0
    for mm in tl.static_range(M):
        lo = tl.load(off_ptr + mm)
        hi = tl.load(off_ptr + mm + 1)
        nblk = (hi - lo + BLOCK_T - 1) // BLOCK_T
        mine = (pid >= first) & (pid < first + nblk)
        m = tl.where(mine, mm, m)
        row0 = tl.where(mine, lo + (pid - first) * BLOCK_T, row0)
        row_end = tl.where(mine, hi, row_end)
        first += nblk
    return m, row0, row_end


@triton.jit
def _rows_h_and_bias(z_rows, rmask, w1_m, b2d_m, C,
                     H: tl.constexpr, R: tl.constexpr, HP: tl.constexpr, RA: tl.constexpr,
                     OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over C: acc_h [BT, HP] = z @ w1[m]^T and acc_bg / acc_bl [BT, RA] = z @ b2_down[m, :R / R:]^T
    (RA >= 16 columns, the first R real)."""
    cb = tl.arange(0, BLOCK_C)
    hp = tl.arange(0, HP)
    ra = tl.arange(0, RA)
    acc_h = tl.zeros([BLOCK_T, HP], dtype=tl.float32)
    acc_bg = tl.zeros([BLOCK_T, RA], dtype=tl.float32)
    acc_bl = tl.zeros([BLOCK_T, RA], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cb
        cmask = cc < C
        zt = tl.load(z_rows + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        zt = zt.to(OP_DTYPE).to(DOT_DTYPE)
        w1t = tl.load(w1_m + hp[None, :] * C + cc[:, None], mask=(hp[None, :] < H) & cmask[:, None], other=0.0)
        acc_h = tl.dot(zt, w1t.to(OP_DTYPE).to(DOT_DTYPE), acc_h, input_precision=PRECISION)
        bmask = (ra[None, :] < R) & cmask[:, None]
        bg = tl.load(b2d_m + ra[None, :] * C + cc[:, None], mask=bmask, other=0.0)
        acc_bg = tl.dot(zt, bg.to(OP_DTYPE).to(DOT_DTYPE), acc_bg, input_precision=PRECISION)
        bl = tl.load(b2d_m + (R + ra[None, :]) * C + cc[:, None], mask=bmask, other=0.0)
        acc_bl = tl.dot(zt, bl.to(OP_DTYPE).to(DOT_DTYPE), acc_bl, input_precision=PRECISION)
    return acc_h, acc_bg, acc_bl


@triton.jit
def _rows_p_chunk(z_rows, rmask, w2d_m, C, jc,
                  H: tl.constexpr, R: tl.constexpr, HJ: tl.constexpr, RP: tl.constexpr,
                  OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over C for hypernetwork rows j in [jc*HJ, jc*HJ + HJ): acc_g / acc_l [BT, HJ*RP] =
    z @ w2_down[m, j, r]^T and z @ w2_down[m, j, R + r]^T, columns (j, r) with r fastest."""
    cb = tl.arange(0, BLOCK_C)
    jr = tl.arange(0, HJ * RP)
    jj = jc * HJ + jr // RP
    rr = jr % RP
    wmask = (jj < H) & (rr < R)
    wrow = (jj * (2 * R) + rr) * C                    # row (j, r) of w2_down[m] viewed as [H*2R, C]
    acc_g = tl.zeros([BLOCK_T, HJ * RP], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_T, HJ * RP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cb
        cmask = cc < C
        zt = tl.load(z_rows + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        zt = zt.to(OP_DTYPE).to(DOT_DTYPE)
        m2 = wmask[None, :] & cmask[:, None]
        wg = tl.load(w2d_m + wrow[None, :] + cc[:, None], mask=m2, other=0.0)
        acc_g = tl.dot(zt, wg.to(OP_DTYPE).to(DOT_DTYPE), acc_g, input_precision=PRECISION)
        wl = tl.load(w2d_m + R * C + wrow[None, :] + cc[:, None], mask=m2, other=0.0)
        acc_l = tl.dot(zt, wl.to(OP_DTYPE).to(DOT_DTYPE), acc_l, input_precision=PRECISION)
    return acc_g, acc_l


@triton.jit
def _load_rows(ptr, tok, rmask, col0, NCOL: tl.constexpr, ROW_LEN: tl.constexpr, VALID):
    """[BT, NCOL] fp32 block of a row-major [T, ROW_LEN] fp32 tensor: columns col0 + (0..NCOL), the
    ones >= col0 + VALID (padding) and the masked rows read as 0."""
    cols = tl.arange(0, NCOL)
    mask = rmask[:, None] & (cols[None, :] < VALID)
    return tl.load(ptr + tok[:, None] * ROW_LEN + col0 + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, val, tok, rmask, col0, NCOL: tl.constexpr, ROW_LEN: tl.constexpr, VALID):
    cols = tl.arange(0, NCOL)
    mask = rmask[:, None] & (cols[None, :] < VALID)
    tl.store(ptr + tok[:, None] * ROW_LEN + col0 + cols[None, :], val, mask=mask)


@triton.jit
def _dtr_fwd_kernel(
    z_ptr, perm_ptr, off_ptr,
    w1_ptr, b1_ptr, w2d_ptr, b2d_ptr, w2u_ptr, b2u_ptr, phiw_ptr, phib_ptr,
    logits_ptr, probs_ptr, idx_ptr, gates_ptr, psum_ptr, cnt_ptr, hpre_ptr, u_ptr, e_ptr,
    C,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, D: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
    HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr, RP: tl.constexpr, RA: tl.constexpr,
    DP: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, ACT: tl.constexpr, RENORM: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    m, row0, row_end = _block_rows(pid, off_ptr, M, BLOCK_T)
    srow = row0 + tl.arange(0, BLOCK_T)
    rmask = srow < row_end
    tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)   # [BT] original token ids
    m64 = m.to(tl.int64)
    z_rows = z_ptr + tok[:, None] * C
    w2u_m = w2u_ptr + m64 * (H * D * R)
    hp = tl.arange(0, HP)
    ecol = tl.arange(0, EP)
    emask = ecol < E

    # ---- h = w1 z + b1 and b2_down z (one pass over C)
    acc_h, acc_bg, acc_bl = _rows_h_and_bias(z_rows, rmask, w1_ptr + m64 * (H * C), b2d_ptr + m64 * (2 * R * C), C,
                                             H, R, HP, RA, OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
    hpre = acc_h + tl.load(b1_ptr + m * H + hp, mask=hp < H, other=0.0).to(tl.float32)[None, :]
    _store_rows(hpre_ptr, hpre, tok, rmask, 0, HP, H, H)
    # RA columns -> RP columns (the ones past R are zero): fold the column groups
    ug = tl.sum(tl.reshape(acc_bg, [BLOCK_T, RA // RP, RP]), axis=1)
    ul = tl.sum(tl.reshape(acc_bl, [BLOCK_T, RA // RP, RP]), axis=1)
    tl.debug_barrier()  # hpre is read back chunk by chunk

    # ---- u += sum_j h_j (w2_down[m, j] z): bilinear, HJ rows j per pass over C
    for jc in range(NUM_J):
        h = _act(_load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)   # padded j: act(0) = 0
        acc_g, acc_l = _rows_p_chunk(z_rows, rmask, w2d_ptr + m64 * (H * 2 * R * C), C, jc, H, R, HJ, RP,
                                     OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
        ug += tl.sum(tl.reshape(acc_g, [BLOCK_T, HJ, RP]) * h[:, :, None], axis=1)
        ul += tl.sum(tl.reshape(acc_l, [BLOCK_T, HJ, RP]) * h[:, :, None], axis=1)
    a = ug * tl.sigmoid(ug) * ul                                         # [BT, RP] SwiGLU
    _store_rows(u_ptr, ug, tok, rmask, 0, RP, 2 * R, R)
    _store_rows(u_ptr, ul, tok, rmask, R, RP, 2 * R, R)
    tl.debug_barrier()  # u is read back in the RA layout

    # ---- e = b2_up[m] a + sum_j h_j (w2_up[m, j] a): GEMMs over r and over (j, r), 16 values of d at
    # a time (the B operands of the small fp32 GEMMs stay at 16 columns: sm_80 holds them in registers);
    # logits = phi_w e + phi_b accumulated over the same d chunks
    ug_a = _load_rows(u_ptr, tok, rmask, 0, RA, 2 * R, R)
    ul_a = _load_rows(u_ptr, tok, rmask, R, RA, 2 * R, R)
    a_a = ug_a * tl.sigmoid(ug_a) * ul_a                                 # [BT, RA]
    ra = tl.arange(0, RA)
    jr = tl.arange(0, HJ * RP)
    dl = tl.arange(0, 16)
    logits = tl.zeros([BLOCK_T, EP], dtype=tl.float32)
    for dc in range(DP // 16):
        dd = dc * 16 + dl
        dmask = dd < D
        b2u_t = tl.load(b2u_ptr + m64 * (D * R) + dd[None, :] * R + ra[:, None],
                        mask=(ra[:, None] < R) & dmask[None, :], other=0.0).to(tl.float32)   # [RA, 16]
        e = tl.dot(a_a, b2u_t, input_precision="tf32x3")                   # [BT, 16]
        for jc in range(NUM_J):
            h = _act(_load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)
            g = tl.reshape(h[:, :, None] * a[:, None, :], [BLOCK_T, HJ * RP])  # (j, r), r fastest
            jj = jc * HJ + jr // RP
            rr = jr % RP
            wu = tl.load(w2u_m + (jj * (D * R) + rr)[:, None] + dd[None, :] * R,
                         mask=((jj < H) & (rr < R))[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            e = tl.dot(g, wu, e, input_precision="tf32x3")
        _store_rows(e_ptr, e, tok, rmask, dc * 16, 16, D, D - dc * 16)
        phi_t = tl.load(phiw_ptr + ecol[None, :] * D + dd[:, None], mask=emask[None, :] & dmask[:, None],
                        other=0.0).to(tl.float32)                          # [16, EP]
        logits = tl.dot(e, phi_t, logits, input_precision="tf32x3")

    # ---- softmax, top-k, per-block statistics
    logits += tl.load(phib_ptr + ecol, mask=emask, other=0.0).to(tl.float32)[None, :]
    probs, gates, idx, chosen = softmax_topk_tile(logits, E, EP, K, KP, RENORM)
    _store_rows(logits_ptr, logits, tok, rmask, 0, EP, E, E)
    _store_rows(probs_ptr, probs, tok, rmask, 0, EP, E, E)
    _store_rows(gates_ptr, gates, tok, rmask, 0, KP, K, K)
    _store_rows(idx_ptr, idx.to(tl.int64), tok, rmask, 0, KP, K, K)
    tl.store(psum_ptr + pid * E + ecol, tl.sum(tl.where(rmask[:, None], probs, 0.0), axis=0), mask=emask)
    tl.store(cnt_ptr + pid * E + ecol, tl.sum((chosen & rmask[:, None]).to(tl.int32), axis=0), mask=emask)


@triton.jit
def _dtr_bwd_token_kernel(
    z_ptr, perm_ptr, off_ptr,
    w2d_ptr, w2u_ptr, b2u_ptr,
    ge_ptr, hpre_ptr, u_ptr, gu_ptr, ghpre_ptr,
    C,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr, HJX: tl.constexpr, HJY: tl.constexpr,
    DC: tl.constexpr, RP: tl.constexpr, RA: tl.constexpr, DP: tl.constexpr, ACT: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ge = dL/de [T, D] -> gu = dL/du [T, 2R] and ghpre = dL/d(w1 z + b1) [T, H]."""
    pid = tl.program_id(0)
    m, row0, row_end = _block_rows(pid, off_ptr, M, BLOCK_T)
    srow = row0 + tl.arange(0, BLOCK_T)
    rmask = srow < row_end
    tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)
    m64 = m.to(tl.int64)
    w2u_m = w2u_ptr + m64 * (H * D * R)
    ra = tl.arange(0, RA)
    amask = ra < R
    dcol = tl.arange(0, DP)
    dmask = dcol < D

    # dL/da = b2_up[m]^T ge + sum_j h_j w2_up[m, j]^T ge: GEMMs over d and over (j, d), HJX rows j at a time
    ge = _load_rows(ge_ptr, tok, rmask, 0, DP, D, D)                         # [BT, DP]
    b2u = tl.load(b2u_ptr + m64 * (D * R) + dcol[:, None] * R + ra[None, :], mask=dmask[:, None] & amask[None, :],
                  other=0.0).to(tl.float32)                                  # [DP, RA]
    ga = tl.dot(ge, b2u, input_precision="tf32x3")                          # [BT, RA]
    jd = tl.arange(0, HJX * DP)
    for jx in range(HP // HJX):
        h = _act(_load_rows(hpre_ptr, tok, rmask, jx * HJX, HJX, H, H - jx * HJX), ACT)
        x = tl.reshape(h[:, :, None] * ge[:, None, :], [BLOCK_T, HJX * DP])  # (j, d), d fastest
        jj = jx * HJX + jd // DP
        dd = jd % DP
        wu = tl.load(w2u_m + (jj * (D * R) + dd * R)[:, None] + ra[None, :],
                     mask=((jj < H) & (dd < D))[:, None] & amask[None, :], other=0.0).to(tl.float32)
        ga = tl.dot(x, wu, ga, input_precision="tf32x3")
    ug = _load_rows(u_ptr, tok, rmask, 0, RA, 2 * R, R)
    ul = _load_rows(u_ptr, tok, rmask, R, RA, 2 * R, R)
    sg = tl.sigmoid(ug)
    # silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x)
    _store_rows(gu_ptr, ga * ul * sg * (1.0 + ug * (1.0 - sg)), tok, rmask, 0, RA, 2 * R, R)
    _store_rows(gu_ptr, ga * ug * sg, tok, rmask, R, RA, 2 * R, R)

    # dL/dh_j, second half: ge . (w2_up[m, j] a) = sum_{d, r} ge_d a_r w2_up[m, j, d, r], DC values of d at a time
    ug_p = _load_rows(u_ptr, tok, rmask, 0, RP, 2 * R, R)
    ul_p = _load_rows(u_ptr, tok, rmask, R, RP, 2 * R, R)
    a_p = ug_p * tl.sigmoid(ug_p) * ul_p                                    # [BT, RP]
    dr = tl.arange(0, DC * RP)
    for jy in range(HP // HJY):
        hj = jy * HJY + tl.arange(0, HJY)
        gh2 = tl.zeros([BLOCK_T, HJY], dtype=tl.float32)
        for dc in range(DP // DC):
            ge_c = _load_rows(ge_ptr, tok, rmask, dc * DC, DC, D, D - dc * DC)
            y = tl.reshape(ge_c[:, :, None] * a_p[:, None, :], [BLOCK_T, DC * RP])   # (d, r), r fastest
            d_of = dc * DC + dr // RP
            r_of = dr % RP
            wu_t = tl.load(w2u_m + hj[None, :] * (D * R) + (d_of * R + r_of)[:, None],
                           mask=(hj[None, :] < H) & ((d_of < D) & (r_of < R))[:, None], other=0.0).to(tl.float32)
            gh2 = tl.dot(y, wu_t, gh2, input_precision="tf32x3")           # [BT, HJY]
        _store_rows(ghpre_ptr, gh2, tok, rmask, jy * HJY, HJY, H, H - jy * HJY)
    tl.debug_barrier()  # gu and the partial ghpre are read back below

    # dL/dh_j, first half: gu . (w2_down[m, j] z), the bilinear P recomputed chunk by chunk
    gug = _load_rows(gu_ptr, tok, rmask, 0, RP, 2 * R, R)
    gul = _load_rows(gu_ptr, tok, rmask, R, RP, 2 * R, R)
    z_rows = z_ptr + tok[:, None] * C
    for jc in range(NUM_J):
        acc_g, acc_l = _rows_p_chunk(z_rows, rmask, w2d_ptr + m64 * (H * 2 * R * C), C, jc, H, R, HJ, RP,
                                     OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
        gh = tl.sum(tl.reshape(acc_g, [BLOCK_T, HJ, RP]) * gug[:, None, :], axis=2)
        gh += tl.sum(tl.reshape(acc_l, [BLOCK_T, HJ, RP]) * gul[:, None, :], axis=2)
        gh += _load_rows(ghpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ)
        hpre = _load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ)
        _store_rows(ghpre_ptr, gh * _act_grad(hpre, ACT), tok, rmask, jc * HJ, HJ, H, H - jc * HJ)


@triton.jit
def _dtr_bwd_dz_kernel(
    dz_ptr, perm_ptr, off_ptr, w1_ptr, w2d_ptr, b2d_ptr, hpre_ptr, gu_ptr, ghpre_ptr,
    C,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr,
    RP: tl.constexpr, RA: tl.constexpr, ACT: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz[t, c tile] = ghpre @ w1[m] + gu @ b2_down[m] + (h (x) gu) @ w2_down[m]."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    m, row0, row_end = _block_rows(pid, off_ptr, M, BLOCK_T)
    srow = row0 + tl.arange(0, BLOCK_T)
    rmask = srow < row_end
    tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)
    m64 = m.to(tl.int64)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    w2d_m = w2d_ptr + m64 * (H * 2 * R * C)
    b2d_m = b2d_ptr + m64 * (2 * R * C)
    hp = tl.arange(0, HP)
    ra = tl.arange(0, RA)

    gh = _load_rows(ghpre_ptr, tok, rmask, 0, HP, H, H)
    w1t = tl.load(w1_ptr + m64 * (H * C) + hp[:, None] * C + cc[None, :], mask=(hp[:, None] < H) & cmask[None, :],
                  other=0.0)                                                  # [HP, BC]
    acc = tl.dot(gh.to(OP_DTYPE).to(DOT_DTYPE), w1t.to(OP_DTYPE).to(DOT_DTYPE), input_precision=PRECISION)
    bmask = (ra[:, None] < R) & cmask[None, :]
    bg = tl.load(b2d_m + ra[:, None] * C + cc[None, :], mask=bmask, other=0.0)          # [RA, BC]
    gug_a = _load_rows(gu_ptr, tok, rmask, 0, RA, 2 * R, R)
    acc = tl.dot(gug_a.to(OP_DTYPE).to(DOT_DTYPE), bg.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
    bl = tl.load(b2d_m + (R + ra[:, None]) * C + cc[None, :], mask=bmask, other=0.0)
    gul_a = _load_rows(gu_ptr, tok, rmask, R, RA, 2 * R, R)
    acc = tl.dot(gul_a.to(OP_DTYPE).to(DOT_DTYPE), bl.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
    gug = _load_rows(gu_ptr, tok, rmask, 0, RP, 2 * R, R)
    gul = _load_rows(gu_ptr, tok, rmask, R, RP, 2 * R, R)
    jr = tl.arange(0, HJ * RP)
    for jc in range(NUM_J):
        h = _act(_load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)
        jj = jc * HJ + jr // RP
        rr = jr % RP
        wrow = (jj * (2 * R) + rr) * C
        wmask = ((jj < H) & (rr < R))[:, None] & cmask[None, :]
        xg = tl.reshape(h[:, :, None] * gug[:, None, :], [BLOCK_T, HJ * RP])
        wg = tl.load(w2d_m + wrow[:, None] + cc[None, :], mask=wmask, other=0.0)      # [HJ*RP, BC]
        acc = tl.dot(xg.to(OP_DTYPE).to(DOT_DTYPE), wg.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
        xl = tl.reshape(h[:, :, None] * gul[:, None, :], [BLOCK_T, HJ * RP])
        wl = tl.load(w2d_m + R * C + wrow[:, None] + cc[None, :], mask=wmask, other=0.0)
        acc = tl.dot(xl.to(OP_DTYPE).to(DOT_DTYPE), wl.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(dz_ptr + tok[:, None] * C + cc[None, :], acc.to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _dtr_bwd_dw_kernel(
    z_ptr, perm_ptr, off_ptr, hpre_ptr, gu_ptr, ghpre_ptr, dw2d_ptr, dw1_ptr, db2d_ptr,
    C, NUM_SPLITS,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr,
    RP: tl.constexpr, RA: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums over the tokens of one modality (one token split of them, one C tile). No atomics: each
    program writes its own slice of a [NUM_SPLITS, M, rows, C] fp32 partial that torch then sums.
    MODE 0 (grid axis 0 = m * NUM_J + j chunk): dw2_down[m, j, r] = sum_t h_j gu_r z.
    MODE 1 (grid axis 0 = m):                 dw1[m] = sum_t ghpre z,  db2_down[m] = sum_t gu z."""
    pid0 = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    if MODE == 0:
        m = pid0 // NUM_J
        jc = pid0 % NUM_J
    else:
        m = pid0
        jc = 0
    lo = tl.load(off_ptr + m)
    hi = tl.load(off_ptr + m + 1)
    nblk = (hi - lo + BLOCK_T - 1) // BLOCK_T
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    rows = tl.arange(0, BLOCK_T)
    part = (pid_s * M + m).to(tl.int64)
    if MODE == 0:
        acc_g = tl.zeros([HJ * RP, BLOCK_C], dtype=tl.float32)
        acc_l = tl.zeros([HJ * RP, BLOCK_C], dtype=tl.float32)
        for ib in range(pid_s, nblk, NUM_SPLITS):
            srow = lo + ib * BLOCK_T + rows
            rmask = srow < hi
            tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)
            zt = tl.load(z_ptr + tok[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            zt = zt.to(OP_DTYPE).to(DOT_DTYPE)
            h = _act(_load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)
            gug = _load_rows(gu_ptr, tok, rmask, 0, RP, 2 * R, R)
            gul = _load_rows(gu_ptr, tok, rmask, R, RP, 2 * R, R)
            xg = tl.reshape(h[:, :, None] * gug[:, None, :], [BLOCK_T, HJ * RP]).to(OP_DTYPE).to(DOT_DTYPE)
            acc_g = tl.dot(tl.trans(xg), zt, acc_g, input_precision=PRECISION)
            xl = tl.reshape(h[:, :, None] * gul[:, None, :], [BLOCK_T, HJ * RP]).to(OP_DTYPE).to(DOT_DTYPE)
            acc_l = tl.dot(tl.trans(xl), zt, acc_l, input_precision=PRECISION)
        jr = tl.arange(0, HJ * RP)
        jj = jc * HJ + jr // RP
        rr = jr % RP
        wrow = (part * (H * 2 * R) + jj * (2 * R) + rr) * C
        wmask = ((jj < H) & (rr < R))[:, None] & cmask[None, :]
        tl.store(dw2d_ptr + wrow[:, None] + cc[None, :], acc_g, mask=wmask)
        tl.store(dw2d_ptr + R * C + wrow[:, None] + cc[None, :], acc_l, mask=wmask)
    else:
        hp = tl.arange(0, HP)
        ra = tl.arange(0, RA)
        acc_w1 = tl.zeros([HP, BLOCK_C], dtype=tl.float32)
        acc_bg = tl.zeros([RA, BLOCK_C], dtype=tl.float32)
        acc_bl = tl.zeros([RA, BLOCK_C], dtype=tl.float32)
        for ib in range(pid_s, nblk, NUM_SPLITS):
            srow = lo + ib * BLOCK_T + rows
            rmask = srow < hi
            tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)
            zt = tl.load(z_ptr + tok[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            zt = zt.to(OP_DTYPE).to(DOT_DTYPE)
            gh = _load_rows(ghpre_ptr, tok, rmask, 0, HP, H, H).to(OP_DTYPE).to(DOT_DTYPE)
            acc_w1 = tl.dot(tl.trans(gh), zt, acc_w1, input_precision=PRECISION)
            gug = _load_rows(gu_ptr, tok, rmask, 0, RA, 2 * R, R).to(OP_DTYPE).to(DOT_DTYPE)
            acc_bg = tl.dot(tl.trans(gug), zt, acc_bg, input_precision=PRECISION)
            gul = _load_rows(gu_ptr, tok, rmask, R, RA, 2 * R, R).to(OP_DTYPE).to(DOT_DTYPE)
            acc_bl = tl.dot(tl.trans(gul), zt, acc_bl, input_precision=PRECISION)
        tl.store(dw1_ptr + (part * H + hp[:, None]) * C + cc[None, :], acc_w1,
                 mask=(hp[:, None] < H) & cmask[None, :])
        bmask = (ra[:, None] < R) & cmask[None, :]
        tl.store(db2d_ptr + (part * (2 * R) + ra[:, None]) * C + cc[None, :], acc_bg, mask=bmask)
        tl.store(db2d_ptr + (part * (2 * R) + R + ra[:, None]) * C + cc[None, :], acc_bl, mask=bmask)


# ============================================================================= launch configuration

@dataclass(frozen=True)
class DtrConfig:
    """Padded sizes and tiles (constexprs) of the DTR kernels for one router shape.

    HP, RP, DP, EP, KP: H, R, D, E, K padded to powers of two (HP, DP, EP >= 16: tl.dot dimensions);
    RA = max(16, RP): r where it is a tl.dot dimension. HJ hypernetwork rows per pass over C
    (NUM_J = HP / HJ passes), HJ*RP columns per bilinear accumulator. HJX, HJY, DC: chunks of j, j
    and d in the backward's small GEMMs over (j, d) and (d, r) (at most 64 columns each).
    BLOCK_T = 16 * num_warps tokens per program."""
    HP: int
    HJ: int
    NUM_J: int
    HJX: int
    HJY: int
    DC: int
    RP: int
    RA: int
    DP: int
    EP: int
    KP: int
    BLOCK_T: int
    BLOCK_C: int
    num_warps: int


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def dtr_config(H: int, R: int, D: int, E: int, K: int = 1, *, num_warps: int = 4, block_c: int = 64,
               acc_cols: int = 64, block_t: int | None = None) -> DtrConfig:
    """``acc_cols``: columns of each bilinear accumulator (HJ*RP), i.e. fp32 registers per thread
    at BLOCK_T = 16 * num_warps. ``block_t`` other than 16 * num_warps: interpreter tests only."""
    hp, rp, dp = _pow2_at_least(H, 16), _pow2_at_least(R), _pow2_at_least(D, 16)
    hj = min(hp, max(acc_cols // rp, 16 // rp, 1))  # powers of two; HJ*RP >= 16 (a tl.dot dimension)
    return DtrConfig(HP=hp, HJ=hj, NUM_J=hp // hj, HJX=min(hp, max(1, 64 // dp)), HJY=16,
                     DC=min(dp, max(16 // rp, 64 // rp, 1)), RP=rp,
                     RA=max(16, rp), DP=dp, EP=_pow2_at_least(E, 16), KP=_pow2_at_least(K),
                     BLOCK_T=block_t or 16 * num_warps, BLOCK_C=block_c, num_warps=num_warps)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(z, *weights):
    """(operand dtype, tl.dot dtype, fp32 precision) of the C-sized GEMMs.

    bf16/fp16 tensor-core GEMMs with fp32 accumulation when z and the C-sized weights share that
    dtype (fp32 operands computed in the kernel, e.g. h (x) gu, are rounded to it, as a bf16 autograd
    GEMM would); fp32 otherwise, as 3xTF32 on GPU (close to fp32 accuracy, unlike plain TF32).
    Under TRITON_INTERPRET=1 bf16 operands are rounded to bf16 and then fed to tl.dot as fp32: the
    triton 3.9 interpreter keeps bf16 as uint16 and its tl.dot multiplies the raw bit patterns;
    bf16 values are exact in fp32, so the products are those of the GPU's bf16 MMA."""
    dtypes = {z.dtype, *(w.dtype for w in weights)}
    if len(dtypes) == 1 and z.dtype in (torch.bfloat16, torch.float16):
        op = tl.bfloat16 if z.dtype == torch.bfloat16 else tl.float16
        return op, (tl.float32 if (_interpreting() and op == tl.bfloat16) else op), "tf32"
    return tl.float32, tl.float32, "tf32x3"


def modality_schedule(mod: torch.Tensor, num_modalities: int):
    """perm [T] int32: token ids grouped by modality (stable); offsets [M+1] int32 (device, no sync)."""
    perm = torch.argsort(mod.to(torch.int32), stable=True).to(torch.int32)
    counts = torch.bincount(mod.reshape(-1).long(), minlength=num_modalities)[:num_modalities]
    offsets = torch.zeros(num_modalities + 1, dtype=torch.int32, device=mod.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, offsets


def check_modality_ids(mod: torch.Tensor, num_modalities: int):
    """Out-of-range ids would silently drop tokens from the schedule: refuse them (async on CUDA)."""
    bad = (mod < 0) | (mod >= num_modalities)
    if mod.is_cuda:
        torch._assert_async(~bad.any(), f"mod must hold modality ids in [0, {num_modalities})")
    elif mod.numel() and bool(bad.any()):
        raise ValueError(f"mod must hold modality ids in [0, {num_modalities}); "
                         f"got values {sorted(set(mod[bad].tolist()))[:5]}")


def _params(w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b):
    return [t.contiguous() for t in (w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b)]


KERNELS = ("fwd", "token", "dz", "dw_w2down", "dw_w1")


def default_config(kernel: str, H: int, R: int, D: int, E: int, K: int = 1, fp32: bool = False) -> DtrConfig:
    """The tiles each kernel launches with (those the AOT report checks for spills, sm_80 and sm_90).

    fp32 operands run as 3xTF32, whose hi/lo operand splits live in registers on sm_80: narrower
    C tiles and accumulators there."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if kernel == "dw_w2down":
        return dtr_config(H, R, D, E, K, block_c=16 if fp32 else 64)
    if kernel == "dw_w1":
        return dtr_config(H, R, D, E, K, block_c=32)
    if kernel == "dz":
        return dtr_config(H, R, D, E, K, block_c=32 if fp32 else 64, acc_cols=32 if fp32 else 64)
    return dtr_config(H, R, D, E, K, block_c=16 if fp32 else 64, acc_cols=32 if fp32 else 64)


# ============================================================================= launchers

def dtr_forward_triton(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                       renormalize=True, activation=None, config: DtrConfig | None = None):
    """Fused DTR forward. Returns (logits [T,E] fp32, probs [T,E] fp32, topk_idx [T,K] int64,
    gates [T,K] fp32, prob_sum [E] fp32, counts [E] int64, hpre [T,H] fp32, u [T,2R] fp32, e [T,D] fp32);
    the last three are what the backward needs (no per-token weights are kept)."""
    T, C, M, H, R, D, E = dtr_dims(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k)
    K = int(top_k)
    act = activation_id(activation)
    op_dtype, dot_dtype, precision = _dot_dtype(z, w1, w2_down, b2_down)
    cfg = config or default_config("fwd", H, R, D, E, K, fp32=op_dtype == tl.float32)
    z = z.contiguous()
    w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b = _params(w1, b1, w2_down, b2_down, w2_up, b2_up,
                                                                   phi_w, phi_b)
    dev = z.device
    f32 = dict(device=dev, dtype=torch.float32)
    logits = _empty(T, E, **f32)
    probs = _empty(T, E, **f32)
    topk_idx = _empty(T, K, device=dev, dtype=torch.int64)
    gates = _empty(T, K, **f32)
    hpre = _empty(T, H, **f32)
    u = _empty(T, 2 * R, **f32)
    e = _empty(T, D, **f32)
    if T == 0:
        return (logits, probs, topk_idx, gates, torch.zeros(E, **f32),
                torch.zeros(E, device=dev, dtype=torch.int64), hpre, u, e)
    check_modality_ids(mod, M)
    perm, offsets = modality_schedule(mod, M)
    num_blocks = triton.cdiv(T, cfg.BLOCK_T) + M - 1
    psum = _empty(num_blocks, E, **f32)
    cnt = _empty(num_blocks, E, device=dev, dtype=torch.int32)
    _dtr_fwd_kernel[(num_blocks,)](
        z, perm, offsets, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b,
        logits, probs, topk_idx, gates, psum, cnt, hpre, u, e, C,
        M=M, H=H, R=R, D=D, E=E, K=K, HP=cfg.HP, HJ=cfg.HJ, NUM_J=cfg.NUM_J, RP=cfg.RP, RA=cfg.RA, DP=cfg.DP,
        EP=cfg.EP, KP=cfg.KP, ACT=act, RENORM=bool(renormalize), OP_DTYPE=op_dtype, DOT_DTYPE=dot_dtype,
        PRECISION=precision, BLOCK_T=cfg.BLOCK_T, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps, num_stages=2)
    # fixed-order reductions of the per-block statistics: deterministic
    return logits, probs, topk_idx, gates, psum.sum(0), cnt.sum(0, dtype=torch.int64), hpre, u, e


def _default_splits(device, num_tiles: int, num_token_blocks: int) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_token_blocks, (2 * sms + num_tiles - 1) // num_tiles))


def dtr_backward_triton(grad_logits, z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, hpre, u, e,
                        activation=None, need_dz=True, need_dparams=True, num_splits: int | None = None,
                        config: DtrConfig | None = None):
    """Fused DTR backward from dL/dlogits [T, E] (softmax/top-k already folded in) and the saved
    (hpre, u, e). Returns (dz, dw1, db1, dw2_down, db2_down, dw2_up, db2_up, dphi_w, dphi_b) in the
    dtypes of their inputs; dz is None when not need_dz, the parameter grads None when not need_dparams.
    ``config`` (tests) overrides the tiles of every kernel."""
    T, C, M, H, R, D, E = dtr_dims(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, 1)
    act = activation_id(activation)
    z = z.contiguous()
    w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b = _params(w1, b1, w2_down, b2_down, w2_up, b2_up,
                                                                   phi_w, phi_b)
    g = grad_logits.float().contiguous()
    ge = g @ phi_w.float()                                                  # [T, D] dL/de
    hpre, u, e = hpre.contiguous(), u.contiguous(), e.contiguous()
    dev = z.device
    f32 = dict(device=dev, dtype=torch.float32)
    op_dtype, dot_dtype, precision = _dot_dtype(z, w1, w2_down, b2_down)
    dtypes = dict(OP_DTYPE=op_dtype, DOT_DTYPE=dot_dtype, PRECISION=precision)
    fp32 = op_dtype == tl.float32
    gu = _empty(T, 2 * R, **f32)
    ghpre = _empty(T, H, **f32)
    if T > 0:
        check_modality_ids(mod, M)
        perm, offsets = modality_schedule(mod, M)
        c = config or default_config("token", H, R, D, E, fp32=fp32)
        _dtr_bwd_token_kernel[(triton.cdiv(T, c.BLOCK_T) + M - 1,)](
            z, perm, offsets, w2_down, w2_up, b2_up, ge, hpre, u, gu, ghpre, C,
            M=M, H=H, R=R, D=D, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, HJX=c.HJX, HJY=c.HJY, DC=c.DC, RP=c.RP, RA=c.RA,
            DP=c.DP, ACT=act, BLOCK_T=c.BLOCK_T, BLOCK_C=c.BLOCK_C, num_warps=c.num_warps, num_stages=2, **dtypes)

    dz = None
    if need_dz:
        dz = _empty(z.shape, device=dev, dtype=z.dtype)
        if T > 0:
            c = config or default_config("dz", H, R, D, E, fp32=fp32)
            _dtr_bwd_dz_kernel[(triton.cdiv(T, c.BLOCK_T) + M - 1, triton.cdiv(C, c.BLOCK_C))](
                dz, perm, offsets, w1, w2_down, b2_down, hpre, gu, ghpre, C,
                M=M, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, RP=c.RP, RA=c.RA, ACT=act,
                BLOCK_T=c.BLOCK_T, BLOCK_C=c.BLOCK_C, num_warps=c.num_warps, num_stages=2, **dtypes)
    if not need_dparams:
        return (dz,) + (None,) * 8

    # MODE 0: HJ*RP accumulator rows (64) over 4 warps; MODE 1: HP + 2 RA rows, narrower C tiles
    cw0 = config or default_config("dw_w2down", H, R, D, E, fp32=fp32)
    cw1 = config or default_config("dw_w1", H, R, D, E, fp32=fp32)
    tiles0 = M * cw0.NUM_J * triton.cdiv(C, cw0.BLOCK_C)
    splits = num_splits or _default_splits(dev, tiles0, triton.cdiv(T, cw0.BLOCK_T))
    alloc = _empty if T > 0 else torch.zeros   # every element is written when the kernels run
    dw2d = alloc(splits, M, H, 2 * R, C, **f32)
    dw1 = alloc(splits, M, H, C, **f32)
    db2d = alloc(splits, M, 2 * R, C, **f32)
    if T > 0:
        for mode, c, axis0 in ((0, cw0, M * cw0.NUM_J), (1, cw1, M)):
            _dtr_bwd_dw_kernel[(axis0, triton.cdiv(C, c.BLOCK_C), splits)](
                z, perm, offsets, hpre, gu, ghpre, dw2d, dw1, db2d, C, splits,
                M=M, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, RP=c.RP, RA=c.RA, ACT=act, MODE=mode,
                BLOCK_T=c.BLOCK_T, BLOCK_C=c.BLOCK_C, num_warps=c.num_warps, num_stages=2, **dtypes)

    # Small gradients: GEMMs over the saved per-token activations, per modality through a one-hot
    # (fixed order, deterministic; O(T*(M*H + D*R)) memory, nothing C-sized).
    onehot = F.one_hot(mod.long(), M).to(torch.float32)                     # [T, M]
    h = _apply_activation(hpre, activation)
    a = F.silu(u[:, :R]) * u[:, R:]
    dphi_w = g.t() @ e
    dphi_b = g.sum(0)
    db1 = onehot.t() @ ghpre
    db2u = ((onehot[:, :, None] * ge[:, None, :]).reshape(T, M * D).t() @ a).view(M, D, R)
    dw2u = ((onehot[:, :, None] * h[:, None, :]).reshape(T, M * H).t()
            @ (ge[:, :, None] * a[:, None, :]).reshape(T, D * R)).view(M, H, D, R)
    grads = (dw1.sum(0), db1, dw2d.sum(0), db2d.sum(0), dw2u, db2u, dphi_w, dphi_b)
    params = (w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b)
    return (dz,) + tuple(gr.to(p.dtype) for gr, p in zip(grads, params))


# ============================================================================= AOT report

# (H, R, D, E, K): the paper's router at the benchmark sizes, and a large one (bf16); the paper's in fp32
AOT_SHAPES = ((32, 8, 16, 4, 1), (64, 16, 64, 64, 2))
AOT_SHAPES_FP32 = ((32, 8, 16, 4, 1),)


def _aot_configs(shapes, fp32):
    dt = tl.float32 if fp32 else tl.bfloat16
    common = dict(M=NUM_MODALITIES, ACT=0, OP_DTYPE=dt, DOT_DTYPE=dt, PRECISION="tf32x3" if fp32 else "tf32",
                  num_stages=2)
    out = {k: [] for k in KERNELS}
    for H, R, D, E, K in shapes:
        cfg = {k: default_config(k, H, R, D, E, K, fp32) for k in KERNELS}

        def tiles(c):
            return dict(common, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, RP=c.RP, RA=c.RA, BLOCK_T=c.BLOCK_T,
                        BLOCK_C=c.BLOCK_C, num_warps=c.num_warps)

        c = cfg["fwd"]
        out["fwd"].append(dict(tiles(c), D=D, E=E, K=K, DP=c.DP, EP=c.EP, KP=c.KP, RENORM=True))
        c = cfg["token"]
        out["token"].append(dict(tiles(c), D=D, HJX=c.HJX, HJY=c.HJY, DC=c.DC, DP=c.DP))
        out["dz"].append(tiles(cfg["dz"]))
        out["dw_w2down"].append(dict(tiles(cfg["dw_w2down"]), MODE=0))
        out["dw_w1"].append(dict(tiles(cfg["dw_w1"]), MODE=1))
    return out


def _register_aot():
    from megatron_evomoe.kernels.aot import register_aot

    index = {"perm_ptr": "*i32", "off_ptr": "*i32", "C": "i32"}
    for suffix, fp32, shapes in (("", False, AOT_SHAPES), ("_fp32", True, AOT_SHAPES_FP32)):
        x = "*fp32" if fp32 else "*bf16"   # z and the router parameters
        f = "*fp32"

        def ptrs(t, *names):
            return {n: t for n in names}

        cfgs = _aot_configs(shapes, fp32)
        sig = {
            "fwd": {**index, **ptrs(x, "z_ptr", "w1_ptr", "b1_ptr", "w2d_ptr", "b2d_ptr", "w2u_ptr", "b2u_ptr",
                                    "phiw_ptr", "phib_ptr"),
                    **ptrs(f, "logits_ptr", "probs_ptr", "gates_ptr", "psum_ptr", "hpre_ptr", "u_ptr", "e_ptr"),
                    "idx_ptr": "*i64", "cnt_ptr": "*i32"},
            "token": {**index, **ptrs(x, "z_ptr", "w2d_ptr", "w2u_ptr", "b2u_ptr"),
                      **ptrs(f, "ge_ptr", "hpre_ptr", "u_ptr", "gu_ptr", "ghpre_ptr")},
            "dz": {**index, **ptrs(x, "dz_ptr", "w1_ptr", "w2d_ptr", "b2d_ptr"), **ptrs(f, "hpre_ptr", "gu_ptr",
                                                                                         "ghpre_ptr")},
            "dw": {**index, "z_ptr": x, "NUM_SPLITS": "i32",
                   **ptrs(f, "hpre_ptr", "gu_ptr", "ghpre_ptr", "dw2d_ptr", "dw1_ptr", "db2d_ptr")},
        }
        # C is 16-divisible in every real model (and Triton specialises on it at run time)
        for name, fn, key, sig_key in (("dtr_fwd", _dtr_fwd_kernel, "fwd", "fwd"),
                                       ("dtr_bwd_token", _dtr_bwd_token_kernel, "token", "token"),
                                       ("dtr_bwd_dz", _dtr_bwd_dz_kernel, "dz", "dz"),
                                       ("dtr_bwd_dw_w2down", _dtr_bwd_dw_kernel, "dw_w2down", "dw"),
                                       ("dtr_bwd_dw_w1", _dtr_bwd_dw_kernel, "dw_w1", "dw")):
            register_aot(fn, sig[sig_key], cfgs[key], name=name + suffix, divisible_by_16=("C",))


_register_aot()

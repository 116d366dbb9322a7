"""Fused forward of the Dynamic Token-aware Router (DTR) of EvoMoE: one Triton kernel and its launcher.
The math is in dtr_reference.py (the PyTorch references the kernel is tested against), the tiles and
the modality schedule in dtr_config.py, the device functions shared with the backward in dtr_tiles.py.

Theta_down(z) = sum_j h_j w2_down[m, j] + b2_down[m] is never built (it is T*2R*C floats, 2 GiB
at 16k tokens, R=8, C=2048): the kernel computes P = z @ w2_down[m].reshape(H*2R, C)^T for a
block of tokens, tile by tile over C, and contracts P with h in registers (a bilinear form).

_dtr_fwd_kernel, per block of the modality-grouped token order (z rows gathered through ``perm``):
NUM_H passes over C for h = w1 z + b1 (HK rows of w1 each; b2_down z in the first), then NUM_J
passes for the bilinear u (HJ hypernetwork rows j each; the z block is re-read from L2, the price of
keeping the accumulators in registers), SwiGLU, e, logits, softmax, top-k and per-block expert
statistics. Saves hpre [T, H], u [T, 2R], e [T, D] (small per-token activations, never per-token
weights) for the backward.

Determinism: no atomics. The per-block expert statistics are written to scratch buffers and summed
by torch in a fixed order, so results are bitwise reproducible run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_evomoe.kernels.dtr_config import (DtrConfig, activation_id, check_modality_ids, contiguous_params,
                                                default_config, dot_dtypes, dtr_dims, modality_schedule,
                                                register_dtr_aot)
from megatron_evomoe.kernels.dtr_tiles import apply_act, block_tokens, load_rows, rows_p_chunk, store_rows
from megatron_evomoe.kernels.topk_softmax import softmax_topk_tile


def _empty(*shape, **kwargs):
    """Output allocation (a hook: tests poison outputs with NaN to prove that kernels write every element)."""
    return torch.empty(*shape, **kwargs)


@triton.jit
def _rows_h_and_bias(z_rows, rmask, w1_m, b2d_m, C, h0,
                     H: tl.constexpr, R: tl.constexpr, HK: tl.constexpr, RA: tl.constexpr, WITH_BIAS: tl.constexpr,
                     OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over C: acc_h [BT, HK] = z @ w1[m, h0:h0+HK]^T and, if WITH_BIAS, acc_bg / acc_bl [BT, RA] =
    z @ b2_down[m, :R / R:]^T (RA >= 16 columns, the first R real; zeros otherwise)."""
    cb = tl.arange(0, BLOCK_C)
    hk = h0 + tl.arange(0, HK)
    ra = tl.arange(0, RA)
    acc_h = tl.zeros([BLOCK_T, HK], dtype=tl.float32)
    acc_bg = tl.zeros([BLOCK_T, RA], dtype=tl.float32)
    acc_bl = tl.zeros([BLOCK_T, RA], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cb
        cmask = cc < C
        zt = tl.load(z_rows + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        zt = zt.to(OP_DTYPE).to(DOT_DTYPE)
        w1t = tl.load(w1_m + hk[None, :] * C + cc[:, None], mask=(hk[None, :] < H) & cmask[:, None], other=0.0)
        acc_h = tl.dot(zt, w1t.to(OP_DTYPE).to(DOT_DTYPE), acc_h, input_precision=PRECISION)
        if WITH_BIAS:
            bmask = (ra[None, :] < R) & cmask[:, None]
            bg = tl.load(b2d_m + ra[None, :] * C + cc[:, None], mask=bmask, other=0.0)
            acc_bg = tl.dot(zt, bg.to(OP_DTYPE).to(DOT_DTYPE), acc_bg, input_precision=PRECISION)
            bl = tl.load(b2d_m + (R + ra[None, :]) * C + cc[:, None], mask=bmask, other=0.0)
            acc_bl = tl.dot(zt, bl.to(OP_DTYPE).to(DOT_DTYPE), acc_bl, input_precision=PRECISION)
    return acc_h, acc_bg, acc_bl


@triton.jit
def _dtr_fwd_kernel(
    z_ptr, perm_ptr, off_ptr,
    w1_ptr, b1_ptr, w2d_ptr, b2d_ptr, w2u_ptr, b2u_ptr, phiw_ptr, phib_ptr,
    logits_ptr, probs_ptr, idx_ptr, gates_ptr, psum_ptr, cnt_ptr, hpre_ptr, u_ptr, e_ptr,
    C,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, D: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
    HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr, HK: tl.constexpr, NUM_H: tl.constexpr,
    RP: tl.constexpr, RA: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, ACT: tl.constexpr,
    RENORM: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    m, tok, rmask = block_tokens(pid, perm_ptr, off_ptr, M, BLOCK_T)   # tok: [BT] original token ids
    m64 = m.to(tl.int64)
    z_rows = z_ptr + tok[:, None] * C
    w2u_m = w2u_ptr + m64 * (H * D * R)
    hk = tl.arange(0, HK)
    ecol = tl.arange(0, EP)
    emask = ecol < E
    w1_m = w1_ptr + m64 * (H * C)
    b1_m = b1_ptr + m * H

    # ---- h = w1 z + b1, HK rows of w1 per pass over C; b2_down z in the first pass
    acc_h, acc_bg, acc_bl = _rows_h_and_bias(z_rows, rmask, w1_m, b2d_ptr + m64 * (2 * R * C), C, 0,
                                             H, R, HK, RA, True, OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
    hpre = acc_h + tl.load(b1_m + hk, mask=hk < H, other=0.0).to(tl.float32)[None, :]
    store_rows(hpre_ptr, hpre, tok, rmask, 0, HK, H, H)
    for hc in range(1, NUM_H):
        acc_h, _, _ = _rows_h_and_bias(z_rows, rmask, w1_m, b2d_ptr, C, hc * HK, H, R, HK, RA, False,
                                       OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
        hpre = acc_h + tl.load(b1_m + hc * HK + hk, mask=hc * HK + hk < H, other=0.0).to(tl.float32)[None, :]
        store_rows(hpre_ptr, hpre, tok, rmask, hc * HK, HK, H, H - hc * HK)
    # RA columns -> RP columns (the ones past R are zero): fold the column groups
    ug = tl.sum(tl.reshape(acc_bg, [BLOCK_T, RA // RP, RP]), axis=1)
    ul = tl.sum(tl.reshape(acc_bl, [BLOCK_T, RA // RP, RP]), axis=1)
    tl.debug_barrier()  # hpre is read back chunk by chunk

    # ---- u += sum_j h_j (w2_down[m, j] z): bilinear, HJ rows j per pass over C
    for jc in range(NUM_J):
        h = apply_act(load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)   # padded j: act(0) = 0
        acc_g, acc_l = rows_p_chunk(z_rows, rmask, w2d_ptr + m64 * (H * 2 * R * C), C, jc, H, R, HJ, RP,
                                    OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
        ug += tl.sum(tl.reshape(acc_g, [BLOCK_T, HJ, RP]) * h[:, :, None], axis=1)
        ul += tl.sum(tl.reshape(acc_l, [BLOCK_T, HJ, RP]) * h[:, :, None], axis=1)
    a = ug * tl.sigmoid(ug) * ul                                         # [BT, RP] SwiGLU
    store_rows(u_ptr, ug, tok, rmask, 0, RP, 2 * R, R)
    store_rows(u_ptr, ul, tok, rmask, R, RP, 2 * R, R)
    tl.debug_barrier()  # u is read back in the RA layout

    # ---- e = b2_up[m] a + sum_j h_j (w2_up[m, j] a): GEMMs over r and over (j, r), 16 values of d at
    # a time (the B operands of the small fp32 GEMMs stay at 16 columns: sm_80 holds them in registers);
    # logits = phi_w e + phi_b accumulated over the same d chunks
    ug_a = load_rows(u_ptr, tok, rmask, 0, RA, 2 * R, R)
    ul_a = load_rows(u_ptr, tok, rmask, R, RA, 2 * R, R)
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
            h = apply_act(load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)
            g = tl.reshape(h[:, :, None] * a[:, None, :], [BLOCK_T, HJ * RP])  # (j, r), r fastest
            jj = jc * HJ + jr // RP
            rr = jr % RP
            wu = tl.load(w2u_m + (jj * (D * R) + rr)[:, None] + dd[None, :] * R,
                         mask=((jj < H) & (rr < R))[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            e = tl.dot(g, wu, e, input_precision="tf32x3")
        store_rows(e_ptr, e, tok, rmask, dc * 16, 16, D, D - dc * 16)
        phi_t = tl.load(phiw_ptr + ecol[None, :] * D + dd[:, None], mask=emask[None, :] & dmask[:, None],
                        other=0.0).to(tl.float32)                          # [16, EP]
        logits = tl.dot(e, phi_t, logits, input_precision="tf32x3")

    # ---- softmax, top-k, per-block statistics
    logits += tl.load(phib_ptr + ecol, mask=emask, other=0.0).to(tl.float32)[None, :]
    probs, gates, idx, chosen = softmax_topk_tile(logits, E, EP, K, KP, RENORM)
    store_rows(logits_ptr, logits, tok, rmask, 0, EP, E, E)
    store_rows(probs_ptr, probs, tok, rmask, 0, EP, E, E)
    store_rows(gates_ptr, gates, tok, rmask, 0, KP, K, K)
    store_rows(idx_ptr, idx.to(tl.int64), tok, rmask, 0, KP, K, K)
    tl.store(psum_ptr + pid * E + ecol, tl.sum(tl.where(rmask[:, None], probs, 0.0), axis=0), mask=emask)
    tl.store(cnt_ptr + pid * E + ecol, tl.sum((chosen & rmask[:, None]).to(tl.int32), axis=0), mask=emask)


# ============================================================================= launcher

def dtr_forward_triton(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k,
                       renormalize=True, activation=None, config: DtrConfig | None = None):
    """Fused DTR forward. Returns (logits [T,E] fp32, probs [T,E] fp32, topk_idx [T,K] int64,
    gates [T,K] fp32, prob_sum [E] fp32, counts [E] int64, hpre [T,H] fp32, u [T,2R] fp32, e [T,D] fp32);
    the last three are what the backward needs (no per-token weights are kept)."""
    T, C, M, H, R, D, E = dtr_dims(z, mod, w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b, top_k)
    K = int(top_k)
    act = activation_id(activation)
    op_dtype, dot_dtype, precision = dot_dtypes(z, w1, w2_down, b2_down)
    cfg = config or default_config("fwd", H, R, D, E, K, fp32=op_dtype == tl.float32)
    z = z.contiguous()
    w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b = contiguous_params(
        w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b)
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
        M=M, H=H, R=R, D=D, E=E, K=K, HP=cfg.HP, HJ=cfg.HJ, NUM_J=cfg.NUM_J, HK=cfg.HK, NUM_H=cfg.NUM_H,
        RP=cfg.RP, RA=cfg.RA, DP=cfg.DP, EP=cfg.EP, KP=cfg.KP, ACT=act, RENORM=bool(renormalize), OP_DTYPE=op_dtype,
        DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_T=cfg.BLOCK_T, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps,
        num_stages=2)
    # fixed-order reductions of the per-block statistics: deterministic
    return logits, probs, topk_idx, gates, psum.sum(0), cnt.sum(0, dtype=torch.int64), hpre, u, e


# ============================================================================= AOT report (kernels/aot.py)

register_dtr_aot([("dtr_fwd", _dtr_fwd_kernel, "fwd", "fwd")])

"""Fused backward of the Dynamic Token-aware Router (DTR) of EvoMoE: three Triton kernels and their
launcher. The forward (and what it saves) is dtr_forward.py, the math dtr_reference.py, the tiles and
the modality schedule dtr_config.py, the shared device functions dtr_tiles.py.

Kernels (all over the modality-grouped token order, gathering z rows through ``perm``):
  _dtr_bwd_token_kernel  per token block, from ge = dL/de = dL/dlogits @ phi_w (torch): gu = dL/du
                         [T, 2R] and ghpre = dL/d(w1 z + b1) [T, H]; recomputes P = z @ w2_down^T
                         (NUM_J more passes over z) for the dL/dh term that needs it.
  _dtr_bwd_dz_kernel     per (token block, C tile): dz = ghpre @ w1[m] + gu @ b2_down[m] + (h (x) gu) @ w2_down[m].
  _dtr_bwd_dw_kernel     per (modality, j chunk or h chunk, C tile, token split): dw2_down, dw1,
                         db2_down as sums over the modality's tokens of outer products with z.
The small parameter gradients (db1, w2_up, b2_up, phi) are GEMMs over the saved per-token
activations ([T, M*H] x [T, D*R] at most), done in torch.

Determinism: nothing uses atomics. Per-split weight-gradient partials are written to scratch
buffers and summed by torch in a fixed order, so results are bitwise reproducible run to run. The
price: a [splits, M, H*2R, C] fp32 scratch buffer (splits is about 2 * SMs / (M * NUM_J * C tiles);
a few tens of MiB at the paper's sizes) and one more read of it. fp32 atomic_add into [M, H*2R, C]
would save that memory but make every weight gradient depend on the order in which blocks finish.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megatron_evomoe.kernels.dtr_config import (DtrConfig, activation_id, check_modality_ids, contiguous_params,
                                                default_config, dot_dtypes, dtr_dims, modality_schedule,
                                                register_dtr_aot)
from megatron_evomoe.kernels.dtr_reference import apply_activation
from megatron_evomoe.kernels.dtr_tiles import (act_grad, apply_act, block_tokens, load_rows, rows_p_chunk,
                                               store_rows)


def _empty(*shape, **kwargs):
    """Output allocation (a hook: tests poison outputs with NaN to prove that kernels write every element)."""
    return torch.empty(*shape, **kwargs)


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
    m, tok, rmask = block_tokens(pid, perm_ptr, off_ptr, M, BLOCK_T)
    m64 = m.to(tl.int64)
    w2u_m = w2u_ptr + m64 * (H * D * R)
    ra = tl.arange(0, RA)
    amask = ra < R
    dcol = tl.arange(0, DP)
    dmask = dcol < D

    # dL/da = b2_up[m]^T ge + sum_j h_j w2_up[m, j]^T ge: GEMMs over d and over (j, d), HJX rows j at a time
    ge = load_rows(ge_ptr, tok, rmask, 0, DP, D, D)                         # [BT, DP]
    b2u = tl.load(b2u_ptr + m64 * (D * R) + dcol[:, None] * R + ra[None, :], mask=dmask[:, None] & amask[None, :],
                  other=0.0).to(tl.float32)                                  # [DP, RA]
    ga = tl.dot(ge, b2u, input_precision="tf32x3")                          # [BT, RA]
    jd = tl.arange(0, HJX * DP)
    for jx in range(HP // HJX):
        h = apply_act(load_rows(hpre_ptr, tok, rmask, jx * HJX, HJX, H, H - jx * HJX), ACT)
        x = tl.reshape(h[:, :, None] * ge[:, None, :], [BLOCK_T, HJX * DP])  # (j, d), d fastest
        jj = jx * HJX + jd // DP
        dd = jd % DP
        wu = tl.load(w2u_m + (jj * (D * R) + dd * R)[:, None] + ra[None, :],
                     mask=((jj < H) & (dd < D))[:, None] & amask[None, :], other=0.0).to(tl.float32)
        ga = tl.dot(x, wu, ga, input_precision="tf32x3")
    ug = load_rows(u_ptr, tok, rmask, 0, RA, 2 * R, R)
    ul = load_rows(u_ptr, tok, rmask, R, RA, 2 * R, R)
    sg = tl.sigmoid(ug)
    # silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x)
    store_rows(gu_ptr, ga * ul * sg * (1.0 + ug * (1.0 - sg)), tok, rmask, 0, RA, 2 * R, R)
    store_rows(gu_ptr, ga * ug * sg, tok, rmask, R, RA, 2 * R, R)

    # dL/dh_j, second half: ge . (w2_up[m, j] a) = sum_{d, r} ge_d a_r w2_up[m, j, d, r], DC values of d at a time
    ug_p = load_rows(u_ptr, tok, rmask, 0, RP, 2 * R, R)
    ul_p = load_rows(u_ptr, tok, rmask, R, RP, 2 * R, R)
    a_p = ug_p * tl.sigmoid(ug_p) * ul_p                                    # [BT, RP]
    dr = tl.arange(0, DC * RP)
    for jy in range(HP // HJY):
        hj = jy * HJY + tl.arange(0, HJY)
        gh2 = tl.zeros([BLOCK_T, HJY], dtype=tl.float32)
        for dc in range(DP // DC):
            ge_c = load_rows(ge_ptr, tok, rmask, dc * DC, DC, D, D - dc * DC)
            y = tl.reshape(ge_c[:, :, None] * a_p[:, None, :], [BLOCK_T, DC * RP])   # (d, r), r fastest
            d_of = dc * DC + dr // RP
            r_of = dr % RP
            wu_t = tl.load(w2u_m + hj[None, :] * (D * R) + (d_of * R + r_of)[:, None],
                           mask=(hj[None, :] < H) & ((d_of < D) & (r_of < R))[:, None], other=0.0).to(tl.float32)
            gh2 = tl.dot(y, wu_t, gh2, input_precision="tf32x3")           # [BT, HJY]
        store_rows(ghpre_ptr, gh2, tok, rmask, jy * HJY, HJY, H, H - jy * HJY)
    tl.debug_barrier()  # gu and the partial ghpre are read back below

    # dL/dh_j, first half: gu . (w2_down[m, j] z), the bilinear P recomputed chunk by chunk
    gug = load_rows(gu_ptr, tok, rmask, 0, RP, 2 * R, R)
    gul = load_rows(gu_ptr, tok, rmask, R, RP, 2 * R, R)
    z_rows = z_ptr + tok[:, None] * C
    for jc in range(NUM_J):
        acc_g, acc_l = rows_p_chunk(z_rows, rmask, w2d_ptr + m64 * (H * 2 * R * C), C, jc, H, R, HJ, RP,
                                    OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_T, BLOCK_C)
        gh = tl.sum(tl.reshape(acc_g, [BLOCK_T, HJ, RP]) * gug[:, None, :], axis=2)
        gh += tl.sum(tl.reshape(acc_l, [BLOCK_T, HJ, RP]) * gul[:, None, :], axis=2)
        gh += load_rows(ghpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ)
        hpre = load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ)
        store_rows(ghpre_ptr, gh * act_grad(hpre, ACT), tok, rmask, jc * HJ, HJ, H, H - jc * HJ)


@triton.jit
def _dtr_bwd_dz_kernel(
    dz_ptr, perm_ptr, off_ptr, w1_ptr, w2d_ptr, b2d_ptr, hpre_ptr, gu_ptr, ghpre_ptr,
    C,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr,
    HK: tl.constexpr, NUM_H: tl.constexpr, RP: tl.constexpr, RA: tl.constexpr, ACT: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz[t, c tile] = ghpre @ w1[m] + gu @ b2_down[m] + (h (x) gu) @ w2_down[m]."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    m, tok, rmask = block_tokens(pid, perm_ptr, off_ptr, M, BLOCK_T)
    m64 = m.to(tl.int64)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    w2d_m = w2d_ptr + m64 * (H * 2 * R * C)
    b2d_m = b2d_ptr + m64 * (2 * R * C)
    ra = tl.arange(0, RA)

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for hc in range(NUM_H):   # HK rows of w1 at a time: an [BT, HP] operand would not fit in registers
        hk = hc * HK + tl.arange(0, HK)
        gh = load_rows(ghpre_ptr, tok, rmask, hc * HK, HK, H, H - hc * HK)
        w1t = tl.load(w1_ptr + m64 * (H * C) + hk[:, None] * C + cc[None, :], mask=(hk[:, None] < H) & cmask[None, :],
                      other=0.0)                                              # [HK, BC]
        acc = tl.dot(gh.to(OP_DTYPE).to(DOT_DTYPE), w1t.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
    bmask = (ra[:, None] < R) & cmask[None, :]
    bg = tl.load(b2d_m + ra[:, None] * C + cc[None, :], mask=bmask, other=0.0)          # [RA, BC]
    gug_a = load_rows(gu_ptr, tok, rmask, 0, RA, 2 * R, R)
    acc = tl.dot(gug_a.to(OP_DTYPE).to(DOT_DTYPE), bg.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
    bl = tl.load(b2d_m + (R + ra[:, None]) * C + cc[None, :], mask=bmask, other=0.0)
    gul_a = load_rows(gu_ptr, tok, rmask, R, RA, 2 * R, R)
    acc = tl.dot(gul_a.to(OP_DTYPE).to(DOT_DTYPE), bl.to(OP_DTYPE).to(DOT_DTYPE), acc, input_precision=PRECISION)
    gug = load_rows(gu_ptr, tok, rmask, 0, RP, 2 * R, R)
    gul = load_rows(gu_ptr, tok, rmask, R, RP, 2 * R, R)
    jr = tl.arange(0, HJ * RP)
    for jc in range(NUM_J):
        h = apply_act(load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)
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
def _modality_block(z_ptr, perm_ptr, lo, hi, ib, cc, cmask, C, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    """Token block ib of one modality's rows [lo, hi) of the grouped order: (token ids [BT] int64,
    row mask [BT], z tile [BT, BC] as a tl.dot operand)."""
    srow = lo + ib * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = srow < hi
    tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)
    zt = tl.load(z_ptr + tok[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    return tok, rmask, zt.to(OP_DTYPE).to(DOT_DTYPE)


@triton.jit
def _dtr_bwd_dw_kernel(
    z_ptr, perm_ptr, off_ptr, hpre_ptr, gu_ptr, ghpre_ptr, dw2d_ptr, dw1_ptr, db2d_ptr,
    C, NUM_SPLITS,
    M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, HP: tl.constexpr, HJ: tl.constexpr, NUM_J: tl.constexpr,
    HK: tl.constexpr, NUM_H: tl.constexpr, RP: tl.constexpr, RA: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
    OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums over the tokens of one modality (one token split of them, one C tile). No atomics: each
    program writes its own slice of a [NUM_SPLITS, M, rows, C] fp32 partial that torch then sums.
    MODE 0 (grid axis 0 = m * NUM_J + j chunk): dw2_down[m, j, r] = sum_t h_j gu_r z.
    MODE 1 (grid axis 0 = m * NUM_H + h chunk): dw1[m, HK rows] = sum_t ghpre z; the h chunk 0
                                               programs also db2_down[m] = sum_t gu z."""
    pid0 = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    if MODE == 0:
        m = pid0 // NUM_J
        jc = pid0 % NUM_J
    else:
        m = pid0 // NUM_H
        jc = pid0 % NUM_H
    lo = tl.load(off_ptr + m)
    hi = tl.load(off_ptr + m + 1)
    nblk = (hi - lo + BLOCK_T - 1) // BLOCK_T
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    part = (pid_s * M + m).to(tl.int64)
    if MODE == 0:
        acc_g = tl.zeros([HJ * RP, BLOCK_C], dtype=tl.float32)
        acc_l = tl.zeros([HJ * RP, BLOCK_C], dtype=tl.float32)
        for ib in range(pid_s, nblk, NUM_SPLITS):
            tok, rmask, zt = _modality_block(z_ptr, perm_ptr, lo, hi, ib, cc, cmask, C, OP_DTYPE, DOT_DTYPE, BLOCK_T)
            h = apply_act(load_rows(hpre_ptr, tok, rmask, jc * HJ, HJ, H, H - jc * HJ), ACT)
            gug = load_rows(gu_ptr, tok, rmask, 0, RP, 2 * R, R)
            gul = load_rows(gu_ptr, tok, rmask, R, RP, 2 * R, R)
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
        hk = jc * HK + tl.arange(0, HK)
        ra = tl.arange(0, RA)
        acc_w1 = tl.zeros([HK, BLOCK_C], dtype=tl.float32)
        acc_bg = tl.zeros([RA, BLOCK_C], dtype=tl.float32)
        acc_bl = tl.zeros([RA, BLOCK_C], dtype=tl.float32)
        for ib in range(pid_s, nblk, NUM_SPLITS):
            tok, rmask, zt = _modality_block(z_ptr, perm_ptr, lo, hi, ib, cc, cmask, C, OP_DTYPE, DOT_DTYPE, BLOCK_T)
            gh = load_rows(ghpre_ptr, tok, rmask, jc * HK, HK, H, H - jc * HK).to(OP_DTYPE).to(DOT_DTYPE)
            acc_w1 = tl.dot(tl.trans(gh), zt, acc_w1, input_precision=PRECISION)
            if jc == 0:   # uniform per program: the other h chunks skip the bias GEMMs
                gug = load_rows(gu_ptr, tok, rmask, 0, RA, 2 * R, R).to(OP_DTYPE).to(DOT_DTYPE)
                acc_bg = tl.dot(tl.trans(gug), zt, acc_bg, input_precision=PRECISION)
                gul = load_rows(gu_ptr, tok, rmask, R, RA, 2 * R, R).to(OP_DTYPE).to(DOT_DTYPE)
                acc_bl = tl.dot(tl.trans(gul), zt, acc_bl, input_precision=PRECISION)
        tl.store(dw1_ptr + (part * H + hk[:, None]) * C + cc[None, :], acc_w1,
                 mask=(hk[:, None] < H) & cmask[None, :])
        if jc == 0:
            bmask = (ra[:, None] < R) & cmask[None, :]
            tl.store(db2d_ptr + (part * (2 * R) + ra[:, None]) * C + cc[None, :], acc_bg, mask=bmask)
            tl.store(db2d_ptr + (part * (2 * R) + R + ra[:, None]) * C + cc[None, :], acc_bl, mask=bmask)


# ============================================================================= launcher

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
    w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b = contiguous_params(
        w1, b1, w2_down, b2_down, w2_up, b2_up, phi_w, phi_b)
    g = grad_logits.float().contiguous()
    ge = g @ phi_w.float()                                                  # [T, D] dL/de
    hpre, u, e = hpre.contiguous(), u.contiguous(), e.contiguous()
    dev = z.device
    f32 = dict(device=dev, dtype=torch.float32)
    op_dtype, dot_dtype, precision = dot_dtypes(z, w1, w2_down, b2_down)
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
                M=M, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, HK=c.HK, NUM_H=c.NUM_H, RP=c.RP, RA=c.RA, ACT=act,
                BLOCK_T=c.BLOCK_T, BLOCK_C=c.BLOCK_C, num_warps=c.num_warps, num_stages=2, **dtypes)
    if not need_dparams:
        return (dz,) + (None,) * 8

    # MODE 0: HJ*RP accumulator rows (64) over 4 warps; MODE 1: HK + 2 RA rows, narrower C tiles
    cw0 = config or default_config("dw_w2down", H, R, D, E, fp32=fp32)
    cw1 = config or default_config("dw_w1", H, R, D, E, fp32=fp32)
    tiles0 = M * cw0.NUM_J * triton.cdiv(C, cw0.BLOCK_C)
    splits = num_splits or _default_splits(dev, tiles0, triton.cdiv(T, cw0.BLOCK_T))
    alloc = _empty if T > 0 else torch.zeros   # every element is written when the kernels run
    dw2d = alloc(splits, M, H, 2 * R, C, **f32)
    dw1 = alloc(splits, M, H, C, **f32)
    db2d = alloc(splits, M, 2 * R, C, **f32)
    if T > 0:
        for mode, c, axis0 in ((0, cw0, M * cw0.NUM_J), (1, cw1, M * cw1.NUM_H)):
            _dtr_bwd_dw_kernel[(axis0, triton.cdiv(C, c.BLOCK_C), splits)](
                z, perm, offsets, hpre, gu, ghpre, dw2d, dw1, db2d, C, splits,
                M=M, H=H, R=R, HP=c.HP, HJ=c.HJ, NUM_J=c.NUM_J, HK=c.HK, NUM_H=c.NUM_H, RP=c.RP, RA=c.RA, ACT=act,
                MODE=mode,
                BLOCK_T=c.BLOCK_T, BLOCK_C=c.BLOCK_C, num_warps=c.num_warps, num_stages=2, **dtypes)

    # Small gradients: GEMMs over the saved per-token activations, per modality through a one-hot
    # (fixed order, deterministic; O(T*(M*H + D*R)) memory, nothing C-sized).
    onehot = F.one_hot(mod.long(), M).to(torch.float32)                     # [T, M]
    h = apply_activation(hpre, activation)
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


# ============================================================================= AOT report (kernels/aot.py)

register_dtr_aot([("dtr_bwd_token", _dtr_bwd_token_kernel, "token", "token"),
                  ("dtr_bwd_dz", _dtr_bwd_dz_kernel, "dz", "dz"),
                  ("dtr_bwd_dw_w2down", _dtr_bwd_dw_kernel, "dw_w2down", "dw"),
                  ("dtr_bwd_dw_w1", _dtr_bwd_dw_kernel, "dw_w1", "dw")])

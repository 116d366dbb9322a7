"""Triton device functions shared by the DTR forward (dtr_forward.py) and backward (dtr_backward.py)
kernels: activations, the modality-grouped block schedule, the bilinear P chunk, per-token row I/O.

Tile rules that keep the compiled kernels in registers (checked by `python -m
megatron_evomoe.kernels.aot`: no spills on sm_80 / sm_90 at the registered shapes):

* Triton lays out the tl.dot of a loop body that holds more than one dot with all warps along M
  (its "chained dot" rule), so the token tile is BLOCK_T = 16 * num_warps: one 16-row MMA tile per
  warp (with fewer rows the warps would compute the same rows), each thread holding N/2 fp32
  accumulators of an [BLOCK_T, N] result. N is bounded by chunking the hypernetwork rows j.
* Chunk loops are runtime loops (`range`), not `tl.static_range`: unrolled copies let the
  compiler hoist every copy's pipeline prologue (the z tile's pointers) to the top of the kernel
  and keep them all live, which spilled.
* GEMMs as wide as the hypernetwork (w1 z, ghpre @ w1, ghpre^T z) go HK rows of w1 at a time: at
  H = 256 an [BT, H] accumulator or operand alone is 128 fp32 registers per thread.
* Per-token vectors needed in another chunking or another r padding are read back from their
  global-memory copy (store, barrier, load) instead of being sliced in registers.
* The small fp32 GEMMs (phase 2 of the forward, the backward's (j, d) and (d, r) contractions) use
  3xTF32 with B operands of at most 16-64 columns: sm_80 keeps MMA B operands in registers.
"""
import triton
import triton.language as tl


@triton.jit
def apply_act(x, ACT: tl.constexpr):
    y = x
    if ACT == 1:  # exact (erf) GELU, as torch.nn.functional.gelu
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    if ACT == 2:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    d = x * 0.0 + 1.0
    if ACT == 1:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    if ACT == 2:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    return d


@triton.jit
def block_rows(pid, off_ptr, M: tl.constexpr, BLOCK_T: tl.constexpr):
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
def block_tokens(pid, perm_ptr, off_ptr, M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block ``pid`` of the modality-grouped token order -> (modality, the block's original token ids
    [BT] int64 (read through perm), row mask [BT])."""
    m, row0, row_end = block_rows(pid, off_ptr, M, BLOCK_T)
    srow = row0 + tl.arange(0, BLOCK_T)
    rmask = srow < row_end
    tok = tl.load(perm_ptr + srow, mask=rmask, other=0).to(tl.int64)
    return m, tok, rmask


@triton.jit
def rows_p_chunk(z_rows, rmask, w2d_m, C, jc,
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
def load_rows(ptr, tok, rmask, col0, NCOL: tl.constexpr, ROW_LEN: tl.constexpr, VALID):
    """[BT, NCOL] fp32 block of a row-major [T, ROW_LEN] fp32 tensor: columns col0 + (0..NCOL), the
    ones >= col0 + VALID (padding) and the masked rows read as 0."""
    cols = tl.arange(0, NCOL)
    mask = rmask[:, None] & (cols[None, :] < VALID)
    return tl.load(ptr + tok[:, None] * ROW_LEN + col0 + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, val, tok, rmask, col0, NCOL: tl.constexpr, ROW_LEN: tl.constexpr, VALID):
    cols = tl.arange(0, NCOL)
    mask = rmask[:, None] & (cols[None, :] < VALID)
    tl.store(ptr + tok[:, None] * ROW_LEN + col0 + cols[None, :], val, mask=mask)

"""Grouped GEMM over expert-sorted tokens: forward, dgrad and wgrad (Triton), with the PyTorch reference.

Tokens are sorted by expert. ``offsets: [E]`` (int32 or int64) holds the cumulative end row of each
expert, like ``torch._grouped_mm``'s ``offs``: expert e owns rows ``[offsets[e-1], offsets[e])``,
expert 0 starting at row 0.

    forward  y[rows_e]  = x[rows_e] @ w[e]          x: [T, K], w: [E, K, N] -> y: [T, N]
    dgrad    dx[rows_e] = dy[rows_e] @ w[e]^T       dy: [T, N]              -> dx: [T, K]
    wgrad    dw[e]      = x[rows_e]^T @ dy[rows_e]                          -> dw: [E, K, N]

Rows at or past ``offsets[-1]`` belong to no expert: their ``y`` / ``dx`` rows are written as zeros
and they add nothing to ``dw``. Experts with zero rows get ``dw[e] = 0``. ``offsets`` should be
non-decreasing and within [0, T]; that is not checked (it would need a host sync), but the kernels
clamp every row range into [0, T] so that bad offsets give wrong numbers, never out-of-bounds
memory accesses.

Tile schedule (forward and dgrad): see kernels/grouped_gemm_tiles.py. Each program owns one (row tile,
column tile) pair, visited in grouped (L2-friendly) order over a 1-D grid bounded by
``num_row_tiles(T, E, BLOCK_M) * cdiv(N, BLOCK_N)``; the tail rows past ``offsets[-1]`` are zero-filled
by the same code path. kernels/grouped_gemm_tma.py is the same schedule, persistent, with TMA loads.

wgrad maps one program to (expert, output tile of dw[e]), the tiles of one expert in grouped order,
and reduces over that expert's rows with a loop whose trip count comes from the offsets (zero trips
for an empty expert -> dw[e] = 0).

All kernels accumulate in fp32 and store in the input dtype. fp32 inputs use IEEE fp32 products
unless ``torch.backends.cuda.matmul.allow_tf32`` is set (the same switch torch.matmul follows).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatron_evomoe.kernels.grouped_gemm_tiles import e_pow2, expert_rows, grouped_order, num_row_tiles, row_tile

# Tile configurations the autotuner chooses among (also compiled ahead of time by kernels/aot.py).
# Every one keeps BLOCK_M a multiple of 64 rows per warpgroup and num_warps a multiple of 4, so that
# sm_90 lowers tl.dot to wgmma (HGMMA); sm_80 uses mma.sync with the same tiles. The two largest
# (128x256 with BLOCK_K 64, 128x128 with BLOCK_K 128) are the large-expert tiles (K, N >= 2048); their
# stages are sized to fit sm_80's 163 KiB of shared memory per block as well as sm_90's 227 KiB
# (bf16: 48 KiB and 64 KiB per stage).
GROUP_M = 8  # row tiles per group of the grouped tile order (kernels/grouped_gemm_tiles.py)
FWD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=GROUP_M, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=4, num_stages=4),
]
# wgrad tiles dw[e]: BLOCK_M over K (rows of dw), BLOCK_N over N, BLOCK_K over the expert's tokens;
# the same tiles, the smallest one stepping over 32 tokens at a time.
WGRAD_CONFIGS = [*FWD_CONFIGS[:-1],
                 dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=GROUP_M, num_warps=4, num_stages=4)]
# Tiles used under TRITON_INTERPRET=1 when the caller gives none (the interpreter cannot autotune
# usefully and runs each program in numpy; small tiles keep odd sizes covering several tiles, and
# GROUP_M=3 leaves a short last group at most shapes).
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=3)

_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_configs(configs):
    return [
        triton.Config({k: c[k] for k in _TILE_KEYS}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in configs
    ]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, offsets_ptr,
    num_rows, N, K, num_experts,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """c[rows_e] = a[rows_e] @ b[e]; a: [T, K], b: [E, K, N] (any strides), c: [T, N].
    Forward uses b = w; dgrad uses b = w.transpose(1, 2). 1-D grid over (row tile, column tile)."""
    num_tiles_m = tl.cdiv(num_rows, BLOCK_M) + num_experts + 1  # = num_row_tiles()
    tile_m, tile_n = grouped_order(tl.program_id(0), num_tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = row_tile(offsets_ptr, num_experts, num_rows, tile_m, BLOCK_M, E_POW2)
    # The tail pseudo-expert (and ids past the last tile) reduce over nothing -> zeros are stored.
    k_len = tl.where(expert < num_experts, K, 0)

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    col_ok = cols < N
    # int64 addressing: T * K can pass 2**31 elements for large token counts.
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be
              + ks[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:  # interpreter only, see dot_upcast
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_mm_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, offsets_ptr,
    num_rows, K, N,
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    stride_dwe, stride_dwk, stride_dwn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """dw[e, tile] = x[rows_e]^T @ dy[rows_e]; BLOCK_M runs over K, BLOCK_N over N, BLOCK_K over rows."""
    expert = tl.program_id(0)
    tile_m, tile_n = grouped_order(tl.program_id(1), tl.cdiv(K, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    row_start, row_end = expert_rows(offsets_ptr, expert, num_rows)

    ks = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)   # rows of dw[e]
    ns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)   # cols of dw[e]
    ts = tl.arange(0, BLOCK_K)                      # token offsets within a chunk
    k_ok = ks < K
    n_ok = ns < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(row_start, row_end, BLOCK_K):
        rows = t0 + ts
        t_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        # x^T tile [BLOCK_M, BLOCK_K] read straight from x: [T, K] (no transposed copy).
        xt = tl.load(x_ptr + rows64[None, :] * stride_xm + ks[:, None] * stride_xk,
                     mask=k_ok[:, None] & t_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_UPCAST:  # interpreter only, see dot_upcast
            xt = xt.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=DOT_PRECISION)

    dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_dwe
               + ks.to(tl.int64)[:, None] * stride_dwk + ns[None, :] * stride_dwn)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


# Autotuned launchers. The key carries the B strides too: dgrad runs the forward kernel on w^T, and
# a (K, N) pair can occur with both layouts in one model (fc1 forward vs fc2 dgrad).
_grouped_mm_autotuned = triton.autotune(
    configs=_triton_configs(FWD_CONFIGS), key=["N", "K", "stride_bk", "stride_bn"]
)(_grouped_mm_kernel)
_grouped_mm_wgrad_autotuned = triton.autotune(
    configs=_triton_configs(WGRAD_CONFIGS), key=["N", "K"]
)(_grouped_mm_wgrad_kernel)


# --------------------------------------------------------------------------------------------------
# Python launchers
# --------------------------------------------------------------------------------------------------
def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """True under TRITON_INTERPRET=1 for bf16: the triton 3.9 interpreter keeps bf16 as uint16 and its
    tl.dot multiplies the raw bit patterns (triton-lang/triton#11584, not supported upstream). bf16
    operands are exact in fp32 and the product is accumulated in fp32 anyway, so upcasting first gives
    the numbers the GPU's bf16 MMA gives. Always False for compiled kernels."""
    return dtype == torch.bfloat16 and interpreting()


def check_offsets(offsets: torch.Tensor, device: torch.device) -> None:
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"offsets must be a non-empty 1-D tensor [E], got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.device != device:
        raise ValueError(f"offsets is on {offsets.device} but the operands are on {device}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")


def launch(autotuned, raw, grid, args, meta, config):
    """Run the autotuned kernel, or `raw` at one explicit tile config (always under the interpreter,
    where autotuning would time every config in numpy). `meta` holds the fixed constexprs."""
    if config is None and not interpreting():
        autotuned[grid](*args, **meta)
        return
    cfg = dict(INTERPRET_CONFIG if config is None else config)
    cfg.setdefault("GROUP_M", GROUP_M)
    if interpreting():  # the interpreter has no warps or pipeline stages
        cfg.pop("num_warps", None)
        cfg.pop("num_stages", None)
    raw[grid](*args, **meta, **cfg)


def _check_ab(name: str, a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, w_dim: int, shapes: str) -> None:
    """a: [T, w.shape[w_dim]] against w: [E, K, N] and offsets: [E]; ``shapes`` names the layout."""
    check_float(name, a)
    if a.dim() != 2 or w.dim() != 3 or a.shape[1] != w.shape[w_dim]:
        raise ValueError(f"expected {shapes}, got {tuple(a.shape)} and {tuple(w.shape)}")
    if a.dtype != w.dtype:
        raise ValueError(f"{name} and w must share a dtype, got {a.dtype} and {w.dtype}")
    if w.shape[0] != offsets.shape[0]:
        raise ValueError(f"w has {w.shape[0]} experts but offsets has {offsets.shape[0]} entries")
    check_offsets(offsets, a.device)


def check_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    _check_ab("x", x, w, offsets, 1, "x: [T, K] and w: [E, K, N]")


def check_dgrad(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    _check_ab("dy", dy, w, offsets, 2, "dy: [T, N] and w: [E, K, N]")


def check_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> None:
    check_float("x", x)
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"expected x: [T, K] and dy: [T, N], got {tuple(x.shape)} and {tuple(dy.shape)}")
    if x.dtype != dy.dtype:
        raise ValueError(f"x and dy must share a dtype, got {x.dtype} and {dy.dtype}")
    check_offsets(offsets, x.device)


def ab_output(a: torch.Tensor, n: int, k: int, out: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """(c: [T, n] to write, whether it is already complete): nothing to compute without rows or
    columns, zeros without a reduction dim."""
    c = out if out is not None else torch.empty((a.shape[0], n), device=a.device, dtype=a.dtype)
    if k == 0 and a.shape[0] > 0 and n > 0:
        c.zero_()
    return c, a.shape[0] == 0 or n == 0 or k == 0


def _grouped_mm_ab(a, b, offsets, out, config):
    """c[rows_e] = a[rows_e] @ b[e] for b: [E, K, N] with any strides."""
    T, K = a.shape
    E, _, N = b.shape
    c, done = ab_output(a, N, K, out)
    if done:
        return c
    offsets = offsets.contiguous()

    def grid(meta):
        return (num_row_tiles(T, E, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, c, offsets, T, N, K, E,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1))
    meta = dict(E_POW2=e_pow2(E), DOT_PRECISION=dot_precision(a.dtype), DOT_UPCAST=dot_upcast(a.dtype))
    launch(_grouped_mm_autotuned, _grouped_mm_kernel, grid, args, meta, config)
    return c


def grouped_mm_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y[rows_e] = x[rows_e] @ w[e]. x: [T, K], w: [E, K, N], offsets: [E] -> y: [T, N] (x.dtype).

    ``config`` forces one tile configuration (keys BLOCK_M, BLOCK_N, BLOCK_K[, GROUP_M, num_warps,
    num_stages]) instead of autotuning; ``out`` is written in place (every element)."""
    check_fwd(x, w, offsets)
    return _grouped_mm_ab(x, w, offsets, out, config)


def grouped_mm_dgrad(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                     out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """dx[rows_e] = dy[rows_e] @ w[e]^T. dy: [T, N], w: [E, K, N] -> dx: [T, K] (dy.dtype)."""
    check_dgrad(dy, w, offsets)
    return _grouped_mm_ab(dy, w.transpose(1, 2), offsets, out, config)


def grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor,
                     out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """dw[e] = x[rows_e]^T @ dy[rows_e]. x: [T, K], dy: [T, N] -> dw: [E, K, N] (x.dtype)."""
    check_wgrad(x, dy, offsets)
    T, K = x.shape
    N = dy.shape[1]
    E = offsets.shape[0]
    dw = out if out is not None else torch.empty((E, K, N), device=x.device, dtype=x.dtype)
    if K == 0 or N == 0:
        return dw
    offsets = offsets.contiguous()

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]))

    args = (x, dy, dw, offsets, T, K, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2))
    meta = dict(DOT_PRECISION=dot_precision(x.dtype), DOT_UPCAST=dot_upcast(x.dtype))
    launch(_grouped_mm_wgrad_autotuned, _grouped_mm_wgrad_kernel, grid, args, meta, config)
    return dw


# --------------------------------------------------------------------------------------------------
# PyTorch reference: a dumb per-expert loop (syncs with the host; for tests, and the ops' torch backend
# where torch._grouped_mm refuses the inputs)
# --------------------------------------------------------------------------------------------------
def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(v) for v in offsets.tolist()]
    return list(zip([0] + ends[:-1], ends))


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows_e] = x[rows_e] @ w[e] in fp32, cast to x.dtype; rows past offsets[-1] are 0."""
    y = torch.zeros((x.shape[0], w.shape[2]), device=x.device, dtype=torch.float32)
    for e, (lo, hi) in enumerate(_bounds(offsets)):
        if hi > lo:
            y[lo:hi] = x[lo:hi].float() @ w[e].float()
    return y.to(x.dtype)


def grouped_mm_dgrad_reference(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dx[rows_e] = dy[rows_e] @ w[e]^T; rows past offsets[-1] are 0."""
    return grouped_mm_reference(dy, w.transpose(1, 2), offsets)


def grouped_mm_wgrad_reference(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows_e]^T @ dy[rows_e]; 0 for experts without rows."""
    E = offsets.shape[0]
    dw = torch.zeros((E, x.shape[1], dy.shape[1]), device=x.device, dtype=torch.float32)
    for e, (lo, hi) in enumerate(_bounds(offsets)):
        if hi > lo:
            dw[e] = x[lo:hi].float().t() @ dy[lo:hi].float()
    return dw.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile registration (see kernels/aot.py)
# --------------------------------------------------------------------------------------------------
def _register_aot() -> None:
    from megatron_evomoe.kernels.aot import register_aot

    # The hot path: model dims (and so the strides) are multiples of 16 elements, which the runtime
    # specialises on; without it loads cannot be vectorised and are not pipelined (cp.async).
    hot_divisible = ("N", "K", "stride_am", "stride_be", "stride_bk", "stride_bn", "stride_cm",
                     "stride_xm", "stride_dym", "stride_dwe", "stride_dwk")
    # E_POW2=256 (up to 255 experts, e.g. Qwen3's 128) is the widest schedule vector we expect; the
    # register count barely depends on it. Unit strides are constants, as the runtime specialises them.
    fixed = dict(E_POW2=256, DOT_PRECISION="ieee", DOT_UPCAST=False, stride_ak=1, stride_cn=1)
    fwd_sig = {
        "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "offsets_ptr": "*i32",
        "num_rows": "i32", "N": "i32", "K": "i32", "num_experts": "i32",
        "stride_am": "i32", "stride_ak": "constexpr",
        "stride_be": "i32", "stride_bk": "i32", "stride_bn": "constexpr",
        "stride_cm": "i32", "stride_cn": "constexpr",
    }
    register_aot(
        _grouped_mm_kernel, fwd_sig,
        [dict(c, **fixed, stride_bn=1) for c in FWD_CONFIGS],
        name="grouped_mm_fwd", hgmma_expected=True, divisible_by_16=hot_divisible,
    )
    # dgrad = the same kernel on w^T: B is contiguous along K instead of N.
    dgrad_sig = dict(fwd_sig, stride_bk="constexpr", stride_bn="i32")
    register_aot(
        _grouped_mm_kernel, dgrad_sig,
        [dict(c, **fixed, stride_bk=1) for c in FWD_CONFIGS],
        name="grouped_mm_dgrad", hgmma_expected=True, divisible_by_16=hot_divisible,
    )
    wgrad_sig = {
        "x_ptr": "*bf16", "dy_ptr": "*bf16", "dw_ptr": "*bf16", "offsets_ptr": "*i32",
        "num_rows": "i32", "K": "i32", "N": "i32",
        "stride_xm": "i32", "stride_xk": "constexpr",
        "stride_dym": "i32", "stride_dyn": "constexpr",
        "stride_dwe": "i32", "stride_dwk": "i32", "stride_dwn": "constexpr",
    }
    register_aot(
        _grouped_mm_wgrad_kernel, wgrad_sig,
        [dict(c, DOT_PRECISION="ieee", DOT_UPCAST=False, stride_xk=1, stride_dyn=1, stride_dwn=1)
         for c in WGRAD_CONFIGS],
        name="grouped_mm_wgrad", hgmma_expected=True, divisible_by_16=hot_divisible,
    )


_register_aot()

"""Grouped GEMM for sm_90 with TMA loads: forward and dgrad on a persistent grid, wgrad (Triton).

Same semantics, offsets and tail rows as kernels/grouped_gemm.py (read its docstring first). On Hopper,
grouped_mm's "auto" times this variant against the cp.async kernel and torch._grouped_mm per shape
(ops/backend_timing.py) where the layout allows TMA; the cp.async kernel runs everywhere else.

    forward  c[rows_e] = a[rows_e] @ w[e]      a = x: [T, K], w: [E, K, N]
    dgrad    c[rows_e] = a[rows_e] @ w[e]^T    a = dy: [T, N]
    wgrad    dw[e] = x[rows_e]^T @ dy[rows_e]

Loads. Device-side tensor descriptors (``tl.make_tensor_descriptor``, TMA on sm_90: UTMALDG in the
SASS, checked by kernels/aot.py): a over the whole [T, R] matrix, w as one 3-D [E, *, *] tensor so
that a tile never crosses into the next expert's weights and the reduction tail past R is zero-filled
by the hardware. dgrad loads w[e] tiles as [BLOCK_N, BLOCK_K] and transposes them in shared memory
(wgmma reads either major order), so w is never copied. A row tile of a may run past its expert's
last row into the next expert's rows: those rows only feed output rows this tile does not own, which
the epilogue masks. The epilogue is therefore a masked store, not a TMA store, which would write the
whole tile over the next expert's rows.

wgrad reduces over an expert's rows, so there a row past the expert's end must read as zero: each
program builds its x and dy descriptors with ``row_end`` (its expert's end) as the row count, so that
TMA zero-fills the last partial step instead of reading the next expert's rows. It keeps the
(expert, dw tile) grid of the cp.async wgrad kernel.

Schedule (forward, dgrad). ``min(#SMs, #tiles)`` programs each loop over the tile ids ``pid, pid + #programs, ...`` of
the grouped order (kernels/grouped_gemm_tiles.py), so consecutive waves share activation and weight
tiles in L2 and no program launch is spent on the bound's empty tiles past the real tile count.

TMA needs 16-byte aligned base pointers and row strides and unit last strides: ``tma_layout_ok``
says whether a call qualifies (bf16/fp16: K and N multiples of 8 for contiguous tensors).
Descriptors built on the device need a small global workspace per program, from the allocator this
module hands to ``triton.set_allocator`` before each launch (in the launching thread: autograd's
backward runs in another thread, and the allocator is a context variable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_evomoe.kernels.grouped_gemm import (GROUP_M, ab_output, check_dgrad, check_fwd, check_wgrad,
                                                  dot_precision, dot_upcast, interpreting, launch)
from megatron_evomoe.kernels.grouped_gemm_tiles import e_pow2, expert_rows, grouped_order, num_row_tiles, row_tile

# sm_90 only, so the stages may use up to 227 KiB of shared memory (bf16 128x256x64: 48 KiB a stage).
TMA_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=GROUP_M, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=GROUP_M, num_warps=8, num_stages=4),
]  # no small tiles: where they win (few rows per expert) the cp.async kernel is timed against these
# Programs under TRITON_INTERPRET=1: a few, so that each one loops over several tiles.
INTERPRET_PROGRAMS = 3


@triton.jit
def _grouped_mm_tma_kernel(
    a_ptr, w_ptr, c_ptr, offsets_ptr,
    num_rows, N, K, num_experts,
    stride_am, stride_we, stride_wr, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr, W_TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """c[rows_e] = a[rows_e] @ B_e; a: [T, K], c: [T, N] (unit column strides). B_e = w[e] with w:
    [E, K, N], or w[e]^T with W_TRANSPOSED and w: [E, N, K] (unit last stride, row stride stride_wr)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[num_rows, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if W_TRANSPOSED:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts, N, K], strides=[stride_we, stride_wr, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts, K, N], strides=[stride_we, stride_wr, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    num_tiles_m = tl.cdiv(num_rows, BLOCK_M) + num_experts + 1  # = num_row_tiles()
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles_m * num_tiles_n, tl.num_programs(0)):
        tile_m, tile_n = grouped_order(tile, num_tiles_m, num_tiles_n, GROUP_M)
        expert, row_start, row_end = row_tile(offsets_ptr, num_experts, num_rows, tile_m, BLOCK_M, E_POW2)
        k_len = tl.where(expert < num_experts, K, 0)  # tail rows and empty ids: store zeros / nothing
        col0 = tile_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_len, BLOCK_K):
            a = a_desc.load([row_start, k0])  # [BLOCK_M, BLOCK_K]
            if W_TRANSPOSED:
                b = tl.trans(w_desc.load([expert, col0, k0]).reshape(BLOCK_N, BLOCK_K))
            else:
                b = w_desc.load([expert, k0, col0]).reshape(BLOCK_K, BLOCK_N)
            if DOT_UPCAST:  # interpreter only, see grouped_gemm.dot_upcast
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@triton.jit
def _grouped_mm_wgrad_tma_kernel(
    x_ptr, dy_ptr, dw_ptr, offsets_ptr,
    num_rows, K, N,
    stride_xm, stride_dym, stride_dwe, stride_dwk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """dw[e, tile] = x[rows_e]^T @ dy[rows_e]; BLOCK_M over K, BLOCK_N over N, BLOCK_K over rows.
    x: [T, K], dy: [T, N], dw: [E, K, N], unit last strides."""
    expert = tl.program_id(0)
    tile_m, tile_n = grouped_order(tl.program_id(1), tl.cdiv(K, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    row_start, row_end = expert_rows(offsets_ptr, expert, num_rows)
    # rows >= row_end (the next expert's) read as zeros; at least one row for an empty expert's
    # descriptor, which is then never loaded from
    rows = tl.maximum(row_end, 1)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, K], strides=[stride_xm, 1], block_shape=[BLOCK_K, BLOCK_M])
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[rows, N], strides=[stride_dym, 1],
                                        block_shape=[BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(row_start, row_end, BLOCK_K):
        xt = tl.trans(x_desc.load([t0, tile_m * BLOCK_M]))  # [BLOCK_M, BLOCK_K], transposed in shared memory
        dy = dy_desc.load([t0, tile_n * BLOCK_N])  # [BLOCK_K, BLOCK_N]
        if DOT_UPCAST:  # interpreter only, see grouped_gemm.dot_upcast
            xt = xt.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=DOT_PRECISION)
    ks = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_dwe + ks.to(tl.int64)[:, None] * stride_dwk + ns[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(ks < K)[:, None] & (ns < N)[None, :])


def _autotuned(kernel, key):
    return triton.autotune(
        configs=[triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                               num_stages=c["num_stages"]) for c in TMA_CONFIGS],
        key=key,
    )(kernel)


_grouped_mm_tma_autotuned = _autotuned(_grouped_mm_tma_kernel, ["N", "K", "W_TRANSPOSED"])
_grouped_mm_wgrad_tma_autotuned = _autotuned(_grouped_mm_wgrad_tma_kernel, ["N", "K"])


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA operand: 16-byte aligned base, unit last stride, 16-byte multiples for the other strides."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for s in t.stride()[:-1]))


def tma_layout_ok(*operands: torch.Tensor) -> bool:
    """Whether every operand (a: [T, R] and w: [E, *, *]; or x and dy) can be loaded with TMA."""
    return all(t.dtype in (torch.float16, torch.bfloat16, torch.float32) and _tma_ok(t) for t in operands)


def tma_available(device: torch.device) -> bool:
    """TMA exists from sm_90 on; the interpreter emulates the descriptors anywhere."""
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _workspace(size: int, alignment: int, stream):
    # the descriptors' global scratch, on the current device (the one Triton launches on)
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _num_programs(device: torch.device) -> int:
    if interpreting():
        return INTERPRET_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _require_tma_layout(*operands: torch.Tensor) -> None:
    if not tma_layout_ok(*operands):
        raise ValueError("grouped GEMM TMA variant: operands need 16-byte aligned pointers and row strides "
                         f"and unit last strides (got strides {[tuple(t.stride()) for t in operands]})")


def _launch_tma(a, w, offsets, out, transposed, config, num_programs):
    """c[rows_e] = a[rows_e] @ (w[e]^T if transposed else w[e])."""
    T, K = a.shape
    E = w.shape[0]
    N = w.shape[1] if transposed else w.shape[2]
    _require_tma_layout(a, w)
    c, done = ab_output(a, N, K, out)
    if done:
        return c
    offsets = offsets.contiguous()
    programs = num_programs or _num_programs(a.device)

    def grid(meta):
        return (min(programs, num_row_tiles(T, E, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    args = (a, w, c, offsets, T, N, K, E, a.stride(0), w.stride(0), w.stride(1), c.stride(0))
    meta = dict(E_POW2=e_pow2(E), W_TRANSPOSED=transposed, DOT_PRECISION=dot_precision(a.dtype),
                DOT_UPCAST=dot_upcast(a.dtype))
    triton.set_allocator(_workspace)
    launch(_grouped_mm_tma_autotuned, _grouped_mm_tma_kernel, grid, args, meta, config)
    return c


def grouped_mm_fwd_tma(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None,
                       config: dict | None = None, num_programs: int | None = None) -> torch.Tensor:
    """y[rows_e] = x[rows_e] @ w[e], as grouped_gemm.grouped_mm_fwd; ValueError where TMA cannot load
    the operands (``tma_layout_ok``). ``num_programs`` overrides the persistent grid (default: #SMs)."""
    check_fwd(x, w, offsets)
    return _launch_tma(x, w, offsets, out, False, config, num_programs)


def grouped_mm_dgrad_tma(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None,
                         config: dict | None = None, num_programs: int | None = None) -> torch.Tensor:
    """dx[rows_e] = dy[rows_e] @ w[e]^T, as grouped_gemm.grouped_mm_dgrad (w: [E, K, N] read in place)."""
    check_dgrad(dy, w, offsets)
    return _launch_tma(dy, w, offsets, out, True, config, num_programs)


def grouped_mm_wgrad_tma(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None,
                         config: dict | None = None) -> torch.Tensor:
    """dw[e] = x[rows_e]^T @ dy[rows_e], as grouped_gemm.grouped_mm_wgrad; ValueError where TMA cannot
    load x or dy."""
    check_wgrad(x, dy, offsets)
    _require_tma_layout(x, dy)
    T, K = x.shape
    N, E = dy.shape[1], offsets.shape[0]
    dw = out if out is not None else torch.empty((E, K, N), device=x.device, dtype=x.dtype)
    if K == 0 or N == 0:
        return dw
    if dw.stride(2) != 1:
        raise ValueError(f"out must have a unit last stride, got strides {tuple(dw.stride())}")

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]))

    args = (x, dy, dw, offsets.contiguous(), T, K, N, x.stride(0), dy.stride(0), dw.stride(0), dw.stride(1))
    meta = dict(DOT_PRECISION=dot_precision(x.dtype), DOT_UPCAST=dot_upcast(x.dtype))
    triton.set_allocator(_workspace)
    launch(_grouped_mm_wgrad_tma_autotuned, _grouped_mm_wgrad_tma_kernel, grid, args, meta, config)
    return dw


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile registration (see kernels/aot.py): sm_90 only, UTMALDG and HGMMA expected.
# --------------------------------------------------------------------------------------------------
def _register_aot() -> None:
    from megatron_evomoe.kernels.aot import register_aot

    sig = {
        "a_ptr": "*bf16", "w_ptr": "*bf16", "c_ptr": "*bf16", "offsets_ptr": "*i32",
        "num_rows": "i32", "N": "i32", "K": "i32", "num_experts": "i32",
        "stride_am": "i32", "stride_we": "i32", "stride_wr": "i32", "stride_cm": "i32",
    }
    fixed = dict(E_POW2=256, DOT_PRECISION="ieee", DOT_UPCAST=False)
    for name, transposed in (("grouped_mm_fwd_tma", False), ("grouped_mm_dgrad_tma", True)):
        register_aot(_grouped_mm_tma_kernel, sig, [dict(c, **fixed, W_TRANSPOSED=transposed) for c in TMA_CONFIGS],
                     name=name, hgmma_expected=True, tma_expected=True, archs=(90,),
                     divisible_by_16=("N", "K", "stride_am", "stride_we", "stride_wr", "stride_cm"))
    wgrad_sig = {
        "x_ptr": "*bf16", "dy_ptr": "*bf16", "dw_ptr": "*bf16", "offsets_ptr": "*i32",
        "num_rows": "i32", "K": "i32", "N": "i32",
        "stride_xm": "i32", "stride_dym": "i32", "stride_dwe": "i32", "stride_dwk": "i32",
    }
    register_aot(_grouped_mm_wgrad_tma_kernel, wgrad_sig,
                 [dict(c, DOT_PRECISION="ieee", DOT_UPCAST=False) for c in TMA_CONFIGS],
                 name="grouped_mm_wgrad_tma", hgmma_expected=True, tma_expected=True, archs=(90,),
                 divisible_by_16=("N", "K", "stride_xm", "stride_dym", "stride_dwe", "stride_dwk"))


_register_aot()

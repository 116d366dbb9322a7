"""Grouped GEMM Triton kernels (forward, dgrad, wgrad) against the per-expert loop reference.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes. The `gpu` tests
run the same checks compiled and autotuned on CUDA (run them with TRITON_INTERPRET=0).
"""
import pytest
import torch

from megatron_evomoe.kernels import grouped_gemm as gg
from megatron_evomoe.kernels import grouped_gemm_tma as gt

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    # bf16/fp16 outputs are rounded once from fp32 sums; the interpreter also truncates instead of
    # rounding to nearest, so allow about two bf16 ulps.
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _offsets(counts, device, dtype=torch.int32):
    return torch.tensor(counts, device=device, dtype=torch.int64).cumsum(0).to(dtype)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


CP_ASYNC = (gg.grouped_mm_fwd, gg.grouped_mm_dgrad, gg.grouped_mm_wgrad)
TMA = (gt.grouped_mm_fwd_tma, gt.grouped_mm_dgrad_tma, gt.grouped_mm_wgrad_tma)


def check_all(counts, K, N, dtype, device, tail=0, config=None, offsets_dtype=torch.int32, seed=0,
              kernels=CP_ASYNC, **launch):
    """fwd, dgrad and wgrad (``kernels``; wgrad skipped where None) vs the reference, every output
    element poisoned with NaN beforehand; ``launch`` goes to fwd and dgrad (the TMA variant's grid)."""
    fwd, dgrad, wgrad = kernels
    g = torch.Generator().manual_seed(seed)
    E, T = len(counts), sum(counts) + tail
    offsets = _offsets(counts, device, offsets_dtype)
    x = torch.randn(T, K, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(E, K, N, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(T, N, generator=g).to(device=device, dtype=dtype)

    y = fwd(x, w, offsets, out=_nan((T, N), dtype, device), config=config, **launch)
    dx = dgrad(dy, w, offsets, out=_nan((T, K), dtype, device), config=config, **launch)
    cases = [("y", y, gg.grouped_mm_reference(x, w, offsets)),
             ("dx", dx, gg.grouped_mm_dgrad_reference(dy, w, offsets))]
    if wgrad is not None:
        dw = wgrad(x, dy, offsets, out=_nan((E, K, N), dtype, device), config=config)
        cases.append(("dw", dw, gg.grouped_mm_wgrad_reference(x, dy, offsets)))
    for name, got, ref in cases:
        assert not torch.isnan(got).any(), f"{name}: some elements were never written"
        torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")
    # Exact structural zeros: tail rows, and the weight gradient of experts without rows.
    assert (y[sum(counts):] == 0).all() and (dx[sum(counts):] == 0).all()
    for e, c in enumerate(counts if wgrad is not None else ()):
        if c == 0:
            assert (dw[e] == 0).all(), f"dw[{e}] of an empty expert must be 0"


# (counts per expert, K, N, rows past offsets[-1]): odd sizes, none a multiple of the tiles.
LAYOUTS = {
    "empty_experts": ([0, 37, 0, 5, 21, 0], 40, 50, 0),  # first, middle and last experts empty
    "single_expert": ([45], 33, 19, 0),
    "many_experts_tail": ([3, 0, 17, 1, 9, 0, 2, 30, 4, 0, 6, 1, 0, 8, 5], 24, 36, 7),  # E=15: E+1 = 16 lanes
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grouped_gemm_matches_reference(layout, dtype):
    counts, K, N, tail = LAYOUTS[layout]
    check_all(counts, K, N, dtype, "cpu", tail=tail)


def test_grouped_gemm_fp16_int64_offsets_small_tiles():
    # 16-row tiles: many tiles per expert, and int64 offsets.
    check_all([20, 0, 33], 35, 18, torch.float16, "cpu", tail=3, offsets_dtype=torch.int64,
              config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))


def test_grouped_gemm_large_row_tile_over_many_experts():
    # BLOCK_M much larger than each expert: every tile is partial, several experts per tile count.
    check_all([5, 9, 0, 3, 7, 1, 0, 2, 4, 6, 8, 2, 1, 0, 3, 5, 7, 9, 11, 2], 16, 17, torch.float32, "cpu",
              config=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16))


def test_grouped_gemm_large_expert_tiles():
    """The 128x256 (BLOCK_K 64) and 128x128 (BLOCK_K 128) configurations: two column tiles of 256 and
    two reduction steps of 128, both with a partial last one, a 128-row tile split across experts."""
    for cfg in (c for c in gg.FWD_CONFIGS if c["BLOCK_N"] == 256 or c["BLOCK_K"] == 128):
        check_all([130, 0, 7], 136, 264, torch.bfloat16, "cpu", tail=2, config=cfg)


def test_grouped_tile_order_covers_every_tile():
    """GROUP_M 1 (plain column order), 2 (short last group over 7 row tiles) and larger than the row
    tile count: every output tile written once with the right expert's weights."""
    for group_m in (1, 2, 16):
        check_all([9, 0, 20, 3], 16, 24, torch.float32, "cpu", tail=5,
                  config=dict(BLOCK_M=8, BLOCK_N=8, BLOCK_K=16, GROUP_M=group_m))


def test_grouped_gemm_no_rows_at_all():
    # Every expert empty: y and dx are all tail rows (zeros), dw is all zeros.
    check_all([0, 0, 0], 20, 24, torch.float32, "cpu", tail=11)


# TMA needs 16-byte row strides: K and N multiples of 8 elements (bf16), of 4 (fp32).
TMA_LAYOUTS = {
    "empty_experts": ([0, 37, 0, 5, 21, 0], 40, 48, 3),  # first, middle and last experts empty, tail rows
    "many_experts": ([3, 0, 17, 1, 9, 0, 2, 30, 4, 0, 6, 1, 0, 8, 5], 24, 32, 7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(TMA_LAYOUTS))
def test_tma_persistent_matches_reference(layout, dtype):
    """The TMA variant: forward and dgrad (descriptor loads past an expert's rows and past K / N,
    masked epilogue, persistent programs, 3 under the interpreter, looping over the grouped order)
    and wgrad (per-expert descriptors: the next expert's rows read as zeros)."""
    counts, K, N, tail = TMA_LAYOUTS[layout]
    check_all(counts, K, N, dtype, "cpu", tail=tail, kernels=TMA)


def test_tma_persistent_configs_and_grid_sizes():
    # The autotuned configurations, and grids of 1 program (all tiles) to more programs than tiles.
    for cfg in gt.TMA_CONFIGS:
        check_all([130, 0, 7], 136, 264, torch.bfloat16, "cpu", tail=2, config=cfg, kernels=TMA)
    for programs in (1, 64):
        check_all([20, 0, 33], 16, 24, torch.float32, "cpu", tail=3, kernels=TMA, num_programs=programs,
                  config=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2))


def test_tma_rejects_unaligned_layouts(monkeypatch):
    x, w, off = torch.randn(8, 12, dtype=torch.bfloat16), torch.randn(2, 12, 16, dtype=torch.bfloat16), \
        torch.tensor([3, 8], dtype=torch.int32)
    assert not gt.tma_layout_ok(x, w)  # 12 bf16 = 24-byte rows
    with pytest.raises(ValueError, match="16-byte aligned"):
        gt.grouped_mm_fwd_tma(x, w, off)
    assert gt.tma_layout_ok(x[:, :8], w[:, :8]) is False  # the slice keeps the 24-byte rows
    assert gt.tma_layout_ok(x[:, :8].contiguous(), w[:, :8].contiguous())
    with pytest.raises(ValueError, match="16-byte aligned"):
        gt.grouped_mm_wgrad_tma(x, torch.randn(8, 16, dtype=torch.bfloat16), off)
    # compiled (not interpreted), TMA is for CUDA devices of sm_90 and later only
    assert gt.tma_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not gt.tma_available(torch.device("cpu"))


def test_grouped_gemm_zero_tokens():
    x = torch.empty(0, 8)
    w = torch.randn(2, 8, 4)
    off = torch.zeros(2, dtype=torch.int32)
    assert gg.grouped_mm_fwd(x, w, off).shape == (0, 4)
    dw = gg.grouped_mm_wgrad(x, torch.empty(0, 4), off, out=_nan((2, 8, 4), torch.float32, "cpu"))
    assert (dw == 0).all()


def test_grouped_gemm_rejects_bad_arguments():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="offsets"):
        gg.grouped_mm_fwd(x, w, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        gg.grouped_mm_fwd(x.double(), w.double(), torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="share a dtype"):
        gg.grouped_mm_fwd(x.half(), w, torch.tensor([2, 4], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grouped_gemm_matches_reference_cuda(layout, dtype):
    counts, K, N, tail = LAYOUTS[layout]
    check_all(counts, K, N, dtype, "cuda", tail=tail)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_grouped_gemm_cuda_model_sized(dtype):
    # Skewed load, zero-row experts, dims multiple of 16 (the autotuned hot path, wgmma on sm_90).
    counts = [700, 0, 3, 129, 0, 64, 1, 127]
    check_all(counts, 512, 384, dtype, "cuda")
    for cfg in gg.FWD_CONFIGS:  # every config the autotuner may pick
        check_all(counts, 256, 192, dtype, "cuda", config=cfg)


@pytest.mark.gpu
def test_tma_persistent_cuda_model_sized():
    # sm_90 only (TMA); every config the autotuner may pick, skewed load and empty experts.
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    counts = [700, 0, 3, 129, 0, 64, 1, 127]
    check_all(counts, 512, 384, torch.bfloat16, "cuda", tail=5, kernels=TMA)
    for cfg in gt.TMA_CONFIGS:
        check_all(counts, 256, 264, torch.bfloat16, "cuda", config=cfg, kernels=TMA)


def test_grouped_gemm_bad_offsets_stay_in_bounds():
    """Offsets past T, negative or decreasing are a caller bug that cannot be checked without a host
    sync; the kernels clamp row ranges into [0, T] so that such offsets never touch memory outside
    the tensors. The tensors here are views into NaN-padded buffers: an out-of-bounds read would
    bring NaN into the result, an out-of-bounds write would overwrite the padding."""
    T, K, N, pad = 10, 16, 16, 4

    def padded(rows, cols, fill):
        buf = torch.full((rows + 2 * pad, cols), fill)
        return buf, buf[pad:pad + rows]

    _, x = padded(T, K, float("nan"))
    _, dy = padded(T, N, float("nan"))
    x.copy_(torch.randn(T, K))
    dy.copy_(torch.randn(T, N))
    w = torch.randn(3, K, N)
    for bad in ([4, 2, 50], [-3, 6, 8], [12, 13, 14]):
        off = torch.tensor(bad, dtype=torch.int32)
        y_buf, y = padded(T, N, 7.0)
        dx_buf, dx = padded(T, K, 7.0)
        dw_buf = torch.full((5, K, N), 7.0)
        gg.grouped_mm_fwd(x, w, off, out=y)
        gg.grouped_mm_dgrad(dy, w, off, out=dx)
        gg.grouped_mm_wgrad(x, dy, off, out=dw_buf[1:4])
        for name, buf, inner in (("y", y_buf, y), ("dx", dx_buf, dx)):
            assert torch.isfinite(inner).all(), f"{bad}: {name} read out of bounds"
            assert (buf[:pad] == 7).all() and (buf[pad + T:] == 7).all(), f"{bad}: {name} written out of bounds"
        assert torch.isfinite(dw_buf[1:4]).all() and (dw_buf[0] == 7).all() and (dw_buf[4] == 7).all()

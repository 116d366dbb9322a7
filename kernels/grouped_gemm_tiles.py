"""Tile schedule of the grouped GEMM kernels: which (expert, rows) a tile id owns, and in which order
the (row tile, column tile) pairs are visited.

Row tiles. Without padding the inputs or syncing with the host, every program works out for itself
which (expert, row tile) it owns: it loads all E offsets as one vector, turns them into per-expert
tile counts for its own BLOCK_M (so autotuning BLOCK_M needs no host-side schedule), takes an
inclusive cumsum, and counts how many experts end at or before its tile id. The number of row tiles
is bounded by ``cdiv(T, BLOCK_M) + E + 1`` (``num_row_tiles``); ids past the real tile count see an
empty row range and do no work. An extra pseudo-expert E covers the tail rows past ``offsets[-1]``
so that they are zero-filled by the same code path.

Grouped order. Row tiles are consecutive in memory along the activations, column tiles along the
weights. Visiting every column tile of one row tile before the next (or every row tile of one
column) makes each program re-read a full panel of the other operand from DRAM: at T=16k rows,
K=2048 and N=5632 the activations were read N / BLOCK_N ~ 22 times. ``grouped_order`` walks
GROUP_M row tiles down one column tile, then the same GROUP_M row tiles down the next, so that the
programs running at once share GROUP_M activation tiles and one weight panel in L2.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_tile(offsets_ptr, num_experts, num_rows, tile_id, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row, end row) of row tile ``tile_id``; expert == num_experts is the tail past
    offsets[-1]; an id past the last tile returns an empty range."""
    e = tl.arange(0, E_POW2)
    ends = tl.load(offsets_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
    ends = tl.where(e < num_experts, ends, num_rows)  # tail pseudo-expert (and padding) end at T
    prev = tl.load(offsets_ptr + e - 1, mask=(e >= 1) & (e <= num_experts), other=0).to(tl.int32)
    starts = tl.where(e > num_experts, num_rows, prev)  # padding lanes: empty [T, T)
    ends = tl.minimum(tl.maximum(ends, 0), num_rows)  # memory safety against bad offsets
    starts = tl.minimum(tl.maximum(starts, 0), num_rows)
    counts = tl.maximum(ends - starts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)  # inclusive
    expert = tl.sum((cum <= tile_id).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, cum - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (tile_id - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), 0)  # 0 when expert >= E_POW2 (id past last tile)
    return expert, row_start, row_end


@triton.jit
def expert_rows(offsets_ptr, expert, num_rows):
    """[first row, end row) of ``expert`` (wgrad), clamped into [0, T] for memory safety."""
    row_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    row_end = tl.load(offsets_ptr + expert).to(tl.int32)
    return tl.minimum(tl.maximum(row_start, 0), num_rows), tl.minimum(tl.maximum(row_end, 0), num_rows)


@triton.jit
def grouped_order(tile, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) of linear tile id ``tile``: GROUP_M row tiles per column tile, column after
    column, then the next GROUP_M row tiles (a short last group where num_tiles_m is not a multiple)."""
    tiles_per_group = GROUP_M * num_tiles_n
    group = tile // tiles_per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_tiles_m - first_m, GROUP_M)
    in_group = tile % tiles_per_group
    return first_m + in_group % group_m, in_group // group_m


def num_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of any offsets (each expert and the tail add at most one partial)."""
    return triton.cdiv(num_rows, block_m) + num_experts + 1


def e_pow2(num_experts: int) -> int:
    """Lanes of the schedule vector: E experts + the tail pseudo-expert."""
    return max(16, triton.next_power_of_2(num_experts + 1))

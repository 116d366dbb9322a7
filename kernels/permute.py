"""Token permute / unpermute for MoE dispatch (Triton), with the PyTorch reference.

Semantics are the permutation contract of ``megatron_evomoe/ops/_ext.py`` (shared by the CUDA
extension, these Triton kernels and the PyTorch backend). T tokens, K slots per token (top-k),
E experts, C channels; slot (t, k) is the flat index s = t*K + k.

    permute    x: [T, C], topk_idx: [T, K] expert ids
               -> x_perm: [T*K, C]  slots stably sorted by expert (increasing s within an expert)
                  row_map: [T, K]   int64, x_perm[row_map[t, k]] == x[t]
                  counts: [E]       int64 slots per expert (grouped GEMM offsets = cumsum(counts))
    unpermute  y_perm: [N, C] -> y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]]   (gates None: 1)

Slots whose id is outside [0, E) (e.g. -1 for a dropped token) are not counted, get row_map -1
and take no row; the rows after sum(counts) are zero so that x_perm always has T*K rows (no host
sync). unpermute skips row_map entries outside [0, N).

Gradients: permute's grad_x = unpermute(grad_x_perm, row_map, None); unpermute's
grad_y_perm[row_map[t, k]] = gates[t, k] * grad_y[t] (zero for rows no slot owns) and
grad_gates[t, k] = <grad_y[t], y_perm[row_map[t, k]]> (0 for dropped slots), from one fused kernel
plus a kernel that zeroes only the unowned rows.

Nothing syncs with the host: counts come from a histogram kernel (tl.histogram per block, then
atomic adds), the row order from a stable device sort of the expert ids (torch.sort, a radix sort
on CUDA). Sums over k and C accumulate in fp32; outputs take the dtype of the tensor they mirror
(y, grad_x, grad_y_perm: the permuted/unpermuted activations' dtype; grad_gates: gates.dtype).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Launch tiles (tokens x channels). The kernels are bandwidth bound: 256 channels = 512 B of bf16
# per row chunk keeps 16-byte vector accesses with 4 warps.
HIST_BLOCK = 1024
ROWS_CONFIG = dict(BLOCK_T=16, BLOCK_C=256, num_warps=4)  # permute / gather-sum / zero rows
UNPERMUTE_BWD_CONFIG = dict(BLOCK_R=16, BLOCK_C=256, num_warps=4)
# Under the interpreter the same kernels run with small tiles so that odd sizes span several tiles.
INTERPRET_TILES = dict(BLOCK_T=8, BLOCK_C=32, BLOCK_R=8, HIST_BLOCK=64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _histogram_kernel(idx_ptr, counts_ptr, n, num_experts, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """counts[e] += #{i in this block : idx[i] == e}; ids outside [0, E) are not counted."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    ids = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int32)
    ok = ok & (ids >= 0) & (ids < num_experts)
    hist = tl.histogram(tl.where(ok, ids, 0), E_POW2, mask=ok)
    bins = tl.arange(0, E_POW2)
    tl.atomic_add(counts_ptr + bins, hist.to(tl.int64), mask=(bins < num_experts) & (hist > 0), sem="relaxed")


@triton.jit
def _permute_kernel(
    x_ptr, slot_row_ptr, idx_ptr, out_ptr,
    T, C, num_experts,
    stride_xt, stride_or,
    TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[slot_row[t, k]] = x[t] if slot (t, k) is routed, else 0. slot_row is a bijection of the
    T*K slots onto the T*K rows (dropped slots at the end), so every row is written once; each x
    row is read once and written K times."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = ts < T
    ok = t_ok[:, None] & (cs < C)[None, :]
    x = tl.load(x_ptr + ts.to(tl.int64)[:, None] * stride_xt + cs[None, :], mask=ok, other=0.0)
    for k in tl.static_range(TOPK):
        slots = ts * TOPK + k
        rows = tl.load(slot_row_ptr + slots, mask=t_ok, other=0).to(tl.int64)
        ids = tl.load(idx_ptr + slots, mask=t_ok, other=-1)
        routed = (ids >= 0) & (ids < num_experts)
        val = tl.where(routed[:, None], x, tl.zeros_like(x))
        tl.store(out_ptr + rows[:, None] * stride_or + cs[None, :], val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_sum_kernel(
    src_ptr, row_map_ptr, gate_ptr, dst_ptr,
    T, C, num_src_rows,
    stride_sr, stride_dt,
    TOPK: tl.constexpr, HAS_GATES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[t] = sum_k gate[t, k] * src[row_map[t, k]] over rows in [0, N) (gate 1 without gates),
    accumulated in fp32."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = ts < T
    c_ok = cs < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        rows = tl.load(row_map_ptr + ts * TOPK + k, mask=t_ok, other=-1).to(tl.int64)
        r_ok = t_ok & (rows >= 0) & (rows < num_src_rows)
        val = tl.load(src_ptr + rows[:, None] * stride_sr + cs[None, :], mask=r_ok[:, None] & c_ok[None, :],
                      other=0.0).to(tl.float32)
        if HAS_GATES:
            gate = tl.load(gate_ptr + ts * TOPK + k, mask=r_ok, other=0.0).to(tl.float32)
            val = val * gate[:, None]
        acc += val
    tl.store(dst_ptr + ts.to(tl.int64)[:, None] * stride_dt + cs[None, :], acc.to(dst_ptr.dtype.element_ty),
             mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _unpermute_bwd_kernel(
    grad_y_ptr, y_perm_ptr, row_map_ptr, gate_ptr, grad_y_perm_ptr, grad_gate_ptr,
    num_slots, C, num_rows,
    stride_gyt, stride_ypr, stride_gypr,
    TOPK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Over slots s = t*K + k, each program walking all of C (so no atomics):
    grad_y_perm[row_map[s]] = gate[s] * grad_y[t];  grad_gate[s] = sum_c grad_y[t, c] * y_perm[row_map[s], c]."""
    ss = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s_ok = ss < num_slots
    ts = (ss // TOPK).to(tl.int64)
    rows = tl.load(row_map_ptr + ss, mask=s_ok, other=-1).to(tl.int64)
    r_ok = s_ok & (rows >= 0) & (rows < num_rows)
    gate = tl.load(gate_ptr + ss, mask=r_ok, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (cs < C)[None, :]
        gy = tl.load(grad_y_ptr + ts[:, None] * stride_gyt + cs[None, :], mask=ok, other=0.0).to(tl.float32)
        yp = tl.load(y_perm_ptr + rows[:, None] * stride_ypr + cs[None, :], mask=ok, other=0.0).to(tl.float32)
        dot += tl.sum(gy * yp, axis=1)
        tl.store(grad_y_perm_ptr + rows[:, None] * stride_gypr + cs[None, :],
                 (gy * gate[:, None]).to(grad_y_perm_ptr.dtype.element_ty), mask=ok)
    tl.store(grad_gate_ptr + ss, dot.to(grad_gate_ptr.dtype.element_ty), mask=s_ok)


@triton.jit
def _zero_unowned_rows_kernel(dst_ptr, owned_ptr, N, C, stride_dr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[r] = 0 for rows r with owned[r] == 0; owned rows are not touched (so this costs ~nothing
    when every row has a slot, the dropless case)."""
    rs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rs < N
    owned = tl.load(owned_ptr + rs, mask=r_ok, other=1)
    ok = (r_ok & (owned == 0))[:, None] & (cs < C)[None, :]
    zeros = tl.zeros((BLOCK_T, BLOCK_C), dtype=dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + rs.to(tl.int64)[:, None] * stride_dr + cs[None, :], zeros, mask=ok)


# --------------------------------------------------------------------------------------------------
# Python launchers
# --------------------------------------------------------------------------------------------------
def _tiles(config: dict) -> dict:
    """Tile constexprs (and num_warps when compiled) for a launch."""
    if _interpreting():
        return {k: INTERPRET_TILES[k] for k in config if k in INTERPRET_TILES}
    return dict(config)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride and assume unit channel stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_permute_args(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, C], got shape {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [T, K] with T = {x.shape[0]}, got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if topk_idx.device != x.device:
        raise ValueError(f"topk_idx is on {topk_idx.device} but x is on {x.device}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def check_unpermute_args(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None) -> None:
    if y_perm.dim() != 2:
        raise ValueError(f"y_perm must be [N, C], got shape {tuple(y_perm.shape)}")
    if row_map.dim() != 2 or row_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_map must be an int32/int64 [T, K] tensor, got {row_map.dtype} {tuple(row_map.shape)}")
    if row_map.device != y_perm.device:
        raise ValueError(f"row_map is on {row_map.device} but y_perm is on {y_perm.device}")
    if gates is not None and (gates.shape != row_map.shape or gates.device != y_perm.device):
        raise ValueError(f"gates must be [T, K] = {tuple(row_map.shape)} on {y_perm.device}, "
                         f"got {tuple(gates.shape)} on {gates.device}")


def expert_histogram(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """counts: [E] int64, slots routed to each expert (ids outside [0, E) not counted)."""
    flat = topk_idx.reshape(-1).contiguous()
    counts = torch.zeros(num_experts, device=flat.device, dtype=torch.int64)
    n = flat.numel()
    if n == 0:
        return counts
    block = INTERPRET_TILES["HIST_BLOCK"] if _interpreting() else HIST_BLOCK
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    _histogram_kernel[(triton.cdiv(n, block),)](flat, counts, n, num_experts, BLOCK=block, E_POW2=e_pow2)
    return counts


def _expert_keys(topk_idx: torch.Tensor, num_experts: int):
    """(key [T*K], routed [T*K] bool): each slot's expert id, E for a dropped slot (id outside [0, E))."""
    flat = topk_idx.reshape(-1)
    routed = (flat >= 0) & (flat < num_experts)
    return torch.where(routed, flat, torch.full_like(flat, num_experts)), routed


def _expert_order(topk_idx: torch.Tensor, num_experts: int):
    """The slots in stable expert order, dropped slots last, without a host sync: (slot_of_row [T*K],
    row_of_slot [T*K] int64, routed, key). A stable device sort of the keys gives the slots in row
    order; scattering aranges inverts it."""
    key, routed = _expert_keys(topk_idx, num_experts)
    slot_of_row = torch.sort(key, stable=True).indices
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(key.numel(), device=key.device, dtype=slot_of_row.dtype)
    return slot_of_row, row_of_slot, routed, key


def sort_slots(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_row: [T*K] int64, routed: [T*K] bool). slot_row is the position of each slot in the
    stable expert order with dropped slots last: a bijection of slots onto rows."""
    _, slot_row, routed, _ = _expert_order(topk_idx, num_experts)
    return slot_row, routed


def permute_fwd(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_perm: [T*K, C] x.dtype, row_map: [T, K] int64, counts: [E] int64); see the module docstring.
    ``out`` (if given) receives x_perm; every element of it is written."""
    check_permute_args(x, topk_idx, num_experts)
    T, K = topk_idx.shape
    C = x.shape[1]
    slot_row, routed = sort_slots(topk_idx, num_experts)
    row_map = torch.where(routed, slot_row, torch.full_like(slot_row, -1)).view(T, K)
    counts = expert_histogram(topk_idx, num_experts)
    x_perm = out if out is not None else torch.empty((T * K, C), device=x.device, dtype=x.dtype)
    if T * K and C:
        x = _rows_contiguous(x)
        tiles = _tiles(ROWS_CONFIG)
        grid = (triton.cdiv(T, tiles["BLOCK_T"]), triton.cdiv(C, tiles["BLOCK_C"]))
        _permute_kernel[grid](x, slot_row, topk_idx.contiguous(), x_perm, T, C, num_experts,
                              x.stride(0), x_perm.stride(0), TOPK=K, **tiles)
    return x_perm, row_map, counts


def unpermute_fwd(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]] -> [T, C] (y_perm.dtype)."""
    check_unpermute_args(y_perm, row_map, gates)
    T, K = row_map.shape
    N, C = y_perm.shape
    y = out if out is not None else torch.empty((T, C), device=y_perm.device, dtype=y_perm.dtype)
    if T == 0 or C == 0:
        return y
    y_perm = _rows_contiguous(y_perm)
    row_map = row_map.contiguous()
    gate_arg = gates.contiguous() if gates is not None else row_map  # pointer unused without gates
    tiles = _tiles(ROWS_CONFIG)
    grid = (triton.cdiv(T, tiles["BLOCK_T"]), triton.cdiv(C, tiles["BLOCK_C"]))
    _gather_sum_kernel[grid](y_perm, row_map, gate_arg, y, T, C, N, y_perm.stride(0), y.stride(0),
                             TOPK=K, HAS_GATES=gates is not None, **tiles)
    return y


def permute_bwd(grad_x_perm: torch.Tensor, row_map: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_x[t] = sum_k grad_x_perm[row_map[t, k]] (dropped slots add nothing)."""
    return unpermute_fwd(grad_x_perm, row_map, None, out)


def unpermute_bwd(grad_y: torch.Tensor, y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y_perm: [N, C] y_perm.dtype, grad_gates: [T, K] gates.dtype); every element written."""
    check_unpermute_args(y_perm, row_map, gates)
    if gates is None:
        raise ValueError("unpermute_bwd needs gates (use permute_bwd for the ungated sum)")
    T, K = row_map.shape
    N, C = y_perm.shape
    if grad_y.shape != (T, C):
        raise ValueError(f"grad_y must be [T, C] = {(T, C)}, got {tuple(grad_y.shape)}")
    if out is None:
        grad_y_perm = torch.empty((N, C), device=y_perm.device, dtype=y_perm.dtype)
        grad_gates = torch.empty((T, K), device=gates.device, dtype=gates.dtype)
    else:
        grad_y_perm, grad_gates = out
    row_map = row_map.contiguous()
    if N and C:
        # Rows that no slot owns must read 0; flag the owned ones (index N+1 soaks up the others).
        owned = torch.zeros(N + 1, device=y_perm.device, dtype=torch.int8)
        flat = row_map.reshape(-1)
        owned[torch.where((flat >= 0) & (flat < N), flat, N)] = 1
        tiles = _tiles(ROWS_CONFIG)
        grid = (triton.cdiv(N, tiles["BLOCK_T"]), triton.cdiv(C, tiles["BLOCK_C"]))
        _zero_unowned_rows_kernel[grid](grad_y_perm, owned, N, C, grad_y_perm.stride(0), **tiles)
    if T * K == 0:
        return grad_y_perm, grad_gates
    if C == 0:
        return grad_y_perm, grad_gates.zero_()
    grad_y, y_perm = _rows_contiguous(grad_y), _rows_contiguous(y_perm)
    tiles = _tiles(UNPERMUTE_BWD_CONFIG)
    _unpermute_bwd_kernel[(triton.cdiv(T * K, tiles["BLOCK_R"]),)](
        grad_y, y_perm, row_map, gates.contiguous(), grad_y_perm, grad_gates,
        T * K, C, N, grad_y.stride(0), y_perm.stride(0), grad_y_perm.stride(0), TOPK=K, **tiles)
    return grad_y_perm, grad_gates


# --------------------------------------------------------------------------------------------------
# PyTorch reference: the contract in vectorised torch ops (any device, no host sync, differentiable in
# x, y_perm and gates), [T, K, C] temporaries. It is the ops' "torch" backend too; the tests check it
# against dumb loops over experts, tokens and slots.
# --------------------------------------------------------------------------------------------------
def _histogram(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    key = key.long()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device)  # bin E: dropped slots
    counts.scatter_add_(0, key, torch.ones_like(key))
    return counts[:num_experts].clone()


def expert_histogram_reference(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """counts: [E] int64, slots routed to each expert (ids outside [0, E) not counted)."""
    return _histogram(_expert_keys(topk_idx, num_experts)[0], num_experts)


def permute_reference(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """x: [T, C], topk_idx: [T, K] -> (x_perm [T*K, C], row_map [T, K] int64, counts [E] int64)."""
    T, K = topk_idx.shape
    slot_of_row, row_of_slot, routed, key = _expert_order(topk_idx, num_experts)
    rows = x[torch.div(slot_of_row, max(K, 1), rounding_mode="floor")]  # [T*K, C]
    x_perm = torch.where(routed[slot_of_row][:, None], rows, torch.zeros((), dtype=x.dtype, device=x.device))
    row_map = torch.where(routed, row_of_slot, -1).view(T, K)
    return x_perm, row_map, _histogram(key, num_experts)


def _gathered(y_perm: torch.Tensor, row_map: torch.Tensor):
    """(rows: [T, K, C] in fp32 (fp64 stays fp64) with zeros for invalid entries, valid: [T, K])."""
    N = y_perm.shape[0]
    valid = (row_map >= 0) & (row_map < N)
    acc = torch.promote_types(y_perm.dtype, torch.float32)
    # Without rows, read an appended zero row: the graph to y_perm (its empty gradient) still exists.
    src = torch.cat([y_perm, y_perm.new_zeros(1, y_perm.shape[1])]) if N == 0 else y_perm
    rows = src[torch.where(valid, row_map, 0).long()].to(acc)
    return torch.where(valid[..., None], rows, 0.0), valid


def unpermute_reference(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None = None):
    """y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]] (gates None: 1) over rows in [0, N): [T, C]
    summed in fp32 (fp64 stays fp64), returned in y_perm.dtype."""
    rows, _ = _gathered(y_perm, row_map)
    if gates is not None:
        rows = rows * gates.to(rows.dtype)[..., None]
    return rows.sum(1).to(y_perm.dtype)


def unpermute_bwd_reference(grad_y, y_perm, row_map, gates):
    """(grad_y_perm [N, C] y_perm.dtype, grad_gates [T, K] gates.dtype) of unpermute; rows no slot owns
    get a zero gradient, dropped slots a zero gate gradient."""
    T, K = row_map.shape
    N, C = y_perm.shape
    rows, valid = _gathered(y_perm, row_map)
    grad_y = grad_y.to(rows.dtype)
    grad_gates = (rows * grad_y[:, None, :]).sum(-1).to(gates.dtype)  # 0 where invalid
    vals = (gates.to(rows.dtype)[..., None] * grad_y[:, None, :]).to(y_perm.dtype).reshape(T * K, C)
    grad_y_perm = y_perm.new_zeros((N + 1, C))  # row N takes the dropped slots
    grad_y_perm.index_copy_(0, torch.where(valid, row_map, N).reshape(-1).long(), vals)
    return grad_y_perm[:N], grad_gates


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile registration (see kernels/aot.py)
# --------------------------------------------------------------------------------------------------
def _register_aot() -> None:
    from megatron_evomoe.kernels.aot import register_aot

    register_aot(_histogram_kernel, {"idx_ptr": "*i64", "counts_ptr": "*i64", "n": "i32", "num_experts": "i32"},
                 [dict(BLOCK=HIST_BLOCK, E_POW2=e, num_warps=4) for e in (16, 256)], name="expert_histogram")
    topks = (2, 8)  # Mixtral / EvoMoE top-2, Qwen3 top-8
    register_aot(
        _permute_kernel,
        {"x_ptr": "*bf16", "slot_row_ptr": "*i64", "idx_ptr": "*i64", "out_ptr": "*bf16",
         "T": "i32", "C": "i32", "num_experts": "i32", "stride_xt": "i32", "stride_or": "i32"},
        [dict(ROWS_CONFIG, TOPK=k) for k in topks],
        name="permute", divisible_by_16=("C", "stride_xt", "stride_or"),
    )
    for has_gates in (True, False):  # unpermute forward / permute backward
        register_aot(
            _gather_sum_kernel,
            {"src_ptr": "*bf16", "row_map_ptr": "*i64", "gate_ptr": "*fp32", "dst_ptr": "*bf16",
             "T": "i32", "C": "i32", "num_src_rows": "i32", "stride_sr": "i32", "stride_dt": "i32"},
            [dict(ROWS_CONFIG, TOPK=k, HAS_GATES=has_gates) for k in topks],
            name="unpermute" if has_gates else "permute_bwd", divisible_by_16=("C", "stride_sr", "stride_dt"),
        )
    register_aot(
        _unpermute_bwd_kernel,
        {"grad_y_ptr": "*bf16", "y_perm_ptr": "*bf16", "row_map_ptr": "*i64", "gate_ptr": "*fp32",
         "grad_y_perm_ptr": "*bf16", "grad_gate_ptr": "*fp32", "num_slots": "i32", "C": "i32", "num_rows": "i32",
         "stride_gyt": "i32", "stride_ypr": "i32", "stride_gypr": "i32"},
        [dict(UNPERMUTE_BWD_CONFIG, TOPK=k) for k in topks],
        name="unpermute_bwd", divisible_by_16=("C", "stride_gyt", "stride_ypr", "stride_gypr"),
    )
    register_aot(
        _zero_unowned_rows_kernel,
        {"dst_ptr": "*bf16", "owned_ptr": "*i8", "N": "i32", "C": "i32", "stride_dr": "i32"},
        [dict(ROWS_CONFIG)], name="unpermute_bwd_zero_rows", divisible_by_16=("C", "stride_dr"),
    )


_register_aot()

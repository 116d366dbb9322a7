"""permute / unpermute: move tokens into expert order (with top-k duplication) and back.

    permute(x: [T, C], topk_idx: [T, K], num_experts) -> (x_perm: [T*K, C], row_map: [T, K] int64, counts: [E] int64)
    unpermute(y_perm: [N, C], row_map: [T, K], gates: [T, K] | None) -> y: [T, C]
        y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]]

The exact semantics (stable order, dropped slots with ids outside [0, E), dtypes) are the contract
in ``_ext.py``, shared by the backends. permute is differentiable in x; unpermute in y_perm and
gates. Layers: Triton kernels (kernels/permute.py) -> ``torch.library`` custom ops with fakes
(forward and backward of each; the backward ops are registered on the forward ones with
``register_autograd``) -> ``permute()`` / ``unpermute()``, which pick the backend (``backend.py``).

The PyTorch backend is the reference of kernels/permute.py: vectorised torch ops on the device (a
stable sort, index gathers, an index_copy into a scratch row for dropped slots), no host sync,
[T, K, C] temporaries.
"""
from __future__ import annotations

import torch

from .backend import EXT_DEVICE, ext_module, log_choice, resolve_backend

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def _check_permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"permute expects x: [T, C] in {_FLOATS}, got {x.dtype} {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"permute expects topk_idx: [T={x.shape[0]}, K] int32/int64, "
                         f"got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_idx.device != x.device:
        raise ValueError(f"permute: topk_idx is on {topk_idx.device} but x is on {x.device}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"permute expects num_experts >= 1, got {num_experts!r}")


def _check_unpermute(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None) -> None:
    if y_perm.dim() != 2 or y_perm.dtype not in _FLOATS:
        raise ValueError(f"unpermute expects y_perm: [N, C] in {_FLOATS}, got {y_perm.dtype} {tuple(y_perm.shape)}")
    if row_map.dim() != 2 or row_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"unpermute expects row_map: [T, K] int32/int64, got {row_map.dtype} {tuple(row_map.shape)}")
    if gates is not None and (gates.shape != row_map.shape or gates.dtype not in _FLOATS):
        raise ValueError(f"unpermute expects gates: [T, K] = {tuple(row_map.shape)} floating, "
                         f"got {gates.dtype} {tuple(gates.shape)}")
    devices = {y_perm.device, row_map.device} | ({gates.device} if gates is not None else set())
    if len(devices) > 1:
        raise ValueError(f"unpermute inputs must share a device, got {sorted(map(str, devices))}")


# --------------------------------------------------------------------------------------------------
# Backend dispatch
# --------------------------------------------------------------------------------------------------
def _kernels():
    from megatron_evomoe.kernels import permute as k
    return k


def _ext(backend):
    return ext_module(backend)[0]


def _permute_impl(x, topk_idx, num_experts, backend):
    if backend == "triton":
        return _kernels().permute_fwd(x, topk_idx, num_experts)
    if backend in EXT_DEVICE:
        return tuple(_ext(backend).permute(x, topk_idx.long(), num_experts))
    return _kernels().permute_reference(x, topk_idx, num_experts)


def _permute_backward_impl(grad_x_perm, row_map, backend):
    if backend == "triton":
        return _kernels().permute_bwd(grad_x_perm, row_map)
    if backend in EXT_DEVICE:
        return _ext(backend).permute_backward(grad_x_perm, row_map)
    return _kernels().unpermute_reference(grad_x_perm, row_map, None)


def _unpermute_impl(y_perm, row_map, gates, backend):
    if backend == "triton":
        return _kernels().unpermute_fwd(y_perm, row_map, gates)
    if backend in EXT_DEVICE:
        return _ext(backend).unpermute(y_perm, row_map, gates)
    return _kernels().unpermute_reference(y_perm, row_map, gates)


def _unpermute_backward_impl(grad_y, y_perm, row_map, gates, backend):
    if backend == "triton":
        return _kernels().unpermute_bwd(grad_y, y_perm, row_map, gates)
    if backend in EXT_DEVICE:
        return tuple(_ext(backend).unpermute_backward(grad_y, y_perm, row_map, gates))
    return _kernels().unpermute_bwd_reference(grad_y, y_perm, row_map, gates)


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("megatron_evomoe::permute", mutates_args=())
def permute_op(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_perm [T*K, C], row_map [T, K] int64, counts [E] int64) with an already-resolved backend."""
    return _permute_impl(x, topk_idx, num_experts, backend)


@permute_op.register_fake
def _(x, topk_idx, num_experts, backend):
    log_choice("permute", backend, x.device.type, "chosen while tracing for torch.compile")
    T, K = topk_idx.shape
    return (x.new_empty((T * K, x.shape[1])), topk_idx.new_empty((T, K), dtype=torch.int64),
            topk_idx.new_empty((num_experts,), dtype=torch.int64))


@torch.library.custom_op("megatron_evomoe::permute_backward", mutates_args=())
def permute_backward_op(grad_x_perm: torch.Tensor, row_map: torch.Tensor, backend: str) -> torch.Tensor:
    """grad_x [T, C] = sum_k grad_x_perm[row_map[t, k]]."""
    return _permute_backward_impl(grad_x_perm, row_map, backend)


@permute_backward_op.register_fake
def _(grad_x_perm, row_map, backend):
    return grad_x_perm.new_empty((row_map.shape[0], grad_x_perm.shape[1]))


@torch.library.custom_op("megatron_evomoe::unpermute", mutates_args=())
def unpermute_op(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None,
                 backend: str) -> torch.Tensor:
    """y [T, C] = sum_k gates[t, k] * y_perm[row_map[t, k]]."""
    return _unpermute_impl(y_perm, row_map, gates, backend)


@unpermute_op.register_fake
def _(y_perm, row_map, gates, backend):
    log_choice("unpermute", backend, y_perm.device.type, "chosen while tracing for torch.compile")
    return y_perm.new_empty((row_map.shape[0], y_perm.shape[1]))


@torch.library.custom_op("megatron_evomoe::unpermute_backward", mutates_args=())
def unpermute_backward_op(grad_y: torch.Tensor, y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y_perm [N, C], grad_gates [T, K])."""
    return _unpermute_backward_impl(grad_y, y_perm, row_map, gates, backend)


@unpermute_backward_op.register_fake
def _(grad_y, y_perm, row_map, gates, backend):
    return torch.empty_like(y_perm), torch.empty_like(gates)


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
def _permute_setup(ctx, inputs, output):
    _, _, _, backend = inputs
    _, row_map, counts = output
    ctx.mark_non_differentiable(row_map, counts)
    ctx.save_for_backward(row_map)
    ctx.backend = backend


def _permute_backward(ctx, grad_x_perm, _grad_row_map, _grad_counts):
    (row_map,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0] and grad_x_perm is not None:
        grad_x = permute_backward_op(grad_x_perm, row_map, ctx.backend)
    return grad_x, None, None, None


def _unpermute_setup(ctx, inputs, output):
    y_perm, row_map, gates, backend = inputs
    ctx.save_for_backward(y_perm, row_map, gates)
    ctx.backend = backend


def _unpermute_backward(ctx, grad_y):
    y_perm, row_map, gates = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None, None
    unit = gates is None
    if unit:  # d/dy_perm of an ungated sum: the same scatter with unit gates
        gates = torch.ones(row_map.shape, dtype=y_perm.dtype, device=y_perm.device)
    grad_y_perm, grad_gates = unpermute_backward_op(grad_y, y_perm, row_map, gates, ctx.backend)
    return (grad_y_perm if ctx.needs_input_grad[0] else None, None,
            None if unit or not ctx.needs_input_grad[2] else grad_gates, None)


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)
unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [T, C], topk_idx: [T, K] -> (x_perm: [T*K, C] expert-sorted, row_map: [T, K] int64, counts: [E] int64).

    Differentiable in x. Slots with ids outside [0, E) are dropped (row_map -1, zero rows at the end)."""
    _check_permute(x, topk_idx, num_experts)
    chosen = resolve_backend(backend, "permute", x.device)
    return permute_op(x, topk_idx, num_experts, chosen)


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """counts: [E] int64, the slots of topk_idx [T, K] routed to each expert (ids outside [0, E) not
    counted). A scatter_add into E+1 bins: static shape and no host sync (torch.bincount needs both
    the max id on the host and a data-dependent output size), so it traces into a compiled graph."""
    return _kernels().expert_histogram_reference(topk_idx, num_experts)


def unpermute(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None,
              backend: str = "auto") -> torch.Tensor:
    """y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]] -> [T, C] in y_perm.dtype (gates None: weight 1).

    Differentiable in y_perm and gates; row_map entries outside [0, N) are skipped."""
    _check_unpermute(y_perm, row_map, gates)
    chosen = resolve_backend(backend, "unpermute", y_perm.device)
    return unpermute_op(y_perm, row_map, gates, chosen)

"""grouped_mm: y[rows_e] = x[rows_e] @ w[e] over expert-sorted rows, differentiable in x and w.

Layers: Triton kernels (kernels/grouped_gemm.py) -> three ``torch.library`` custom ops (forward,
dgrad, wgrad; each with a fake impl so that torch.compile traces them as opaque nodes; dgrad and
wgrad are the forward op's backward, registered with ``register_autograd``) -> ``grouped_mm()``,
which picks the backend (see ``backend.py``). Backend "measured" ("auto" on CUDA) runs, per phase
and shape, the fastest of the Triton kernel, its TMA variant (sm_90, TMA-aligned layouts) and
``torch._grouped_mm``, timed once (``backend_timing.py``, the choices in ``MEASURED``);
the cp.async Triton kernel where it may not time (CUDA graph capture).

Semantics (all backends): x: [T, K], w: [E, K, N], offsets: [E] int32/int64 cumulative end rows.
Rows at or past offsets[-1] belong to no expert and get zero output / zero dgrad; experts without
rows get dw[e] = 0; outputs are in x.dtype with fp32 accumulation.

The PyTorch backend uses ``torch._grouped_mm`` wherever it accepts the inputs (CUDA, and this CPU
build too) and otherwise the reference of kernels/grouped_gemm.py (a loop over non-empty experts).
``torch._grouped_mm``'s own autograd is not used: on the CPU build its backward raises (and it
rejects expanded gradients), so the backward here is written as two more ``torch._grouped_mm``
calls (dgrad: dy @ w^T per group; wgrad: x^T @ dy with the groups along the reduction dim), which
work on CPU and CUDA alike. It leaves rows past offsets[-1] unwritten, so those are zeroed with a
mask (no host sync).
"""
from __future__ import annotations

import torch

from .backend import EXT_DEVICE, ext_module, log_choice, resolve_backend
from .backend_timing import MeasuredChoice, ShapeKey, rows_bucket

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument; no host sync)
# --------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm expects x: [T, K] and w: [E, K, N], got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype not in _FLOATS or x.dtype != w.dtype:
        raise ValueError(f"grouped_mm expects x and w of one dtype among {_FLOATS}, got {x.dtype} and {w.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] != w.shape[0] or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_mm expects offsets: [E={w.shape[0]}] int32/int64, "
                         f"got {offsets.dtype} {tuple(offsets.shape)}")
    if not (x.device == w.device == offsets.device):
        raise ValueError(f"grouped_mm inputs must share a device, got x {x.device}, w {w.device}, "
                         f"offsets {offsets.device}")


# --------------------------------------------------------------------------------------------------
# PyTorch backend
# --------------------------------------------------------------------------------------------------
def _kernels():
    from megatron_evomoe.kernels import grouped_gemm as k
    return k


def _tma_kernels():
    from megatron_evomoe.kernels import grouped_gemm_tma as k
    return k


_grouped_mm_rejects: set[tuple] = set()  # (device type, dtype, aligned) where torch._grouped_mm raised


def _try_torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs32: torch.Tensor) -> torch.Tensor | None:
    """torch._grouped_mm(a, b, offs) or None where this build / device / dtype / layout refuses it."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    # refusals are remembered per layout class: 16-byte rows and strides or not
    aligned = all((s * a.element_size()) % 16 == 0
                  for s in (a.shape[-1], b.shape[-1], *a.stride(), *b.stride()) if s != 1)
    key = (a.device.type, a.dtype, aligned)
    if key in _grouped_mm_rejects:
        return None
    try:
        return torch._grouped_mm(a, b, offs32)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):  # unsupported dtype / arch / alignment: remember, loop
        _grouped_mm_rejects.add(key)
        return None


def _zero_tail_rows(out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    tail = torch.arange(out.shape[0], device=out.device) >= offsets[-1]
    return out.masked_fill_(tail[:, None], 0)


def _refused() -> torch.Tensor:
    # strict (timed as a candidate): a refusal must fail the candidate, not time the per-expert loop
    raise NotImplementedError("torch._grouped_mm does not take these inputs here")


def _torch_ab(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """out[rows_e] = a[rows_e] @ b[e] (b: [E, K, N], any strides)."""
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
        return a.new_zeros((a.shape[0], b.shape[2]))
    out = _try_torch_grouped_mm(a.contiguous(), b, offsets.to(torch.int32))
    if out is not None:
        return _zero_tail_rows(out, offsets)
    if strict:
        return _refused()
    return _kernels().grouped_mm_reference(a, b, offsets)  # the per-expert loop (host sync)


def _torch_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, strict: bool = False) -> torch.Tensor:
    E = offsets.shape[0]
    if x.shape[0] == 0 or x.shape[1] == 0 or dy.shape[1] == 0:
        return x.new_zeros((E, x.shape[1], dy.shape[1]))
    # Groups along the reduction dim; empty groups come out as zeros (torch's own _grouped_mm
    # backward relies on the same call, and the tests check it on every device they run on).
    dw = _try_torch_grouped_mm(x.t(), dy.contiguous(), offsets.to(torch.int32))
    if dw is not None:
        return dw
    if strict:
        return _refused()
    return _kernels().grouped_mm_wgrad_reference(x, dy, offsets)  # the per-expert loop (host sync)


# --------------------------------------------------------------------------------------------------
# "measured": per phase and shape, the fastest implementation, timed once
# --------------------------------------------------------------------------------------------------
MEASURED = MeasuredChoice("grouped_mm")
_DEFAULT = "triton"  # where nothing may be timed: the kernel that runs on every arch and layout


def _measured(phase: str, a: torch.Tensor, w_shape: tuple, run, run_torch, tma_operands: tuple) -> str:
    """The implementation to run this phase with at a's rows and w's [E, K, N], timed on the first
    call: ``run(backend)`` for the Triton kernels, ``run_torch()`` for torch._grouped_mm (strict)."""
    E, K, N = w_shape
    key = ShapeKey(phase, rows_bucket(a.shape[0]), K, N, E, str(a.dtype).removeprefix("torch."), str(a.device))
    candidates = {"triton": lambda: run("triton"), "triton_tma": lambda: run("triton_tma"), "torch": run_torch}
    if not _tma_ok(*tma_operands):
        candidates.pop("triton_tma")
    if not hasattr(torch, "_grouped_mm"):
        candidates.pop("torch")
    return MEASURED.choose(key, candidates, _DEFAULT)


def _tma_ok(*operands: torch.Tensor) -> bool:
    tma = _tma_kernels()
    return tma.tma_available(operands[0].device) and tma.tma_layout_ok(*operands)


def _fwd_impl(x, w, offsets, backend):
    if backend == "measured":
        backend = _measured("fwd", x, tuple(w.shape), lambda b: _fwd_impl(x, w, offsets, b),
                            lambda: _torch_ab(x, w, offsets, strict=True), (x, w))
    if backend == "triton":
        return _kernels().grouped_mm_fwd(x, w, offsets)
    if backend == "triton_tma":
        return _tma_kernels().grouped_mm_fwd_tma(x, w, offsets)
    if backend in EXT_DEVICE:
        return ext_module(backend)[0].grouped_mm(x, w, offsets)
    return _torch_ab(x, w, offsets)


def _dgrad_impl(dy, w, offsets, backend):
    if backend == "measured":
        backend = _measured("dgrad", dy, tuple(w.shape), lambda b: _dgrad_impl(dy, w, offsets, b),
                            lambda: _torch_ab(dy, w.transpose(1, 2), offsets, strict=True), (dy, w))
    if backend == "triton":
        return _kernels().grouped_mm_dgrad(dy, w, offsets)
    if backend == "triton_tma":
        return _tma_kernels().grouped_mm_dgrad_tma(dy, w, offsets)
    if backend in EXT_DEVICE:
        return ext_module(backend)[0].grouped_mm_dgrad(dy, w, offsets)
    return _torch_ab(dy.contiguous(), w.transpose(1, 2), offsets)


def _wgrad_impl(x, dy, offsets, backend):
    if backend == "measured":
        backend = _measured("wgrad", x, (offsets.shape[0], x.shape[1], dy.shape[1]),
                            lambda b: _wgrad_impl(x, dy, offsets, b),
                            lambda: _torch_wgrad(x, dy, offsets, strict=True), (x, dy))
    if backend == "triton":
        return _kernels().grouped_mm_wgrad(x, dy, offsets)
    if backend == "triton_tma":
        return _tma_kernels().grouped_mm_wgrad_tma(x, dy, offsets)
    if backend in EXT_DEVICE:
        return ext_module(backend)[0].grouped_mm_wgrad(x, dy, offsets)
    return _torch_wgrad(x, dy, offsets)


# --------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; the fakes give shapes and dtypes)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("megatron_evomoe::grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """y: [T, N] = per-expert x @ w[e] with an already-resolved backend."""
    return _fwd_impl(x, w, offsets, backend)


@grouped_mm_op.register_fake
def _(x, w, offsets, backend):
    log_choice("grouped_mm", backend, x.device.type, "chosen while tracing for torch.compile")
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.custom_op("megatron_evomoe::grouped_mm_dgrad", mutates_args=())
def grouped_mm_dgrad_op(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """dx: [T, K] = per-expert dy @ w[e]^T."""
    return _dgrad_impl(dy, w, offsets, backend)


@grouped_mm_dgrad_op.register_fake
def _(dy, w, offsets, backend):
    return dy.new_empty((dy.shape[0], w.shape[1]))


@torch.library.custom_op("megatron_evomoe::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad_op(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """dw: [E, K, N] = per-expert x^T @ dy."""
    return _wgrad_impl(x, dy, offsets, backend)


@grouped_mm_wgrad_op.register_fake
def _(x, dy, offsets, backend):
    return x.new_empty((offsets.shape[0], x.shape[1], dy.shape[1]))


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, w, offsets, backend = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.backend = backend


def _backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_mm_dgrad_op(dy, w, offsets, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_wgrad_op(x, dy, offsets, ctx.backend)
    return dx, dw, None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y[rows_e] = x[rows_e] @ w[e]. x: [T, K], w: [E, K, N], offsets: [E] (cumulative end rows) -> [T, N].

    Differentiable in x and w. ``backend``: "auto" | "cuda_ext" | "cpu_ext" | "triton" | "torch" (backend.py).
    Under autocast both operands are cast to the autocast dtype first, as torch.matmul would be
    (custom ops are not autocast-aware by themselves)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w = x.to(dtype), w.to(dtype)
    _check(x, w, offsets)
    chosen = resolve_backend(backend, "grouped_mm", x.device)
    return grouped_mm_op(x, w, offsets, chosen)

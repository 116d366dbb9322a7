"""Loader for the optional compiled extensions, and the contract of the CUDA ops.

Two extensions may be built by ``pip install --no-build-isolation -e .``
(see csrc/build.py):

* ``megatron_evomoe._C_cuda`` (CUDA, torch extension): token permutation for
  MoE dispatch. ``load()``. Built only with nvcc and a CUDA build of torch.
* ``megatron_evomoe._C_cpu`` (C++, torch extension): the CPU kernels of the
  MoE ops (grouped GEMM fwd/dgrad/wgrad, permute/unpermute fwd/bwd), backend
  ``cpu_ext``. ``load_cpu()``. Built wherever a C++ compiler is found.

Neither loader raises: each returns None and records why, and ``describe()``
gives one line for logs, e.g. ``cuda_ext: not built (torch 2.13.0+cpu is a CPU
build: torch.version.cuda is None); cpu_ext: built``. Setting
``EVOMOE_DISABLE_CUDA_EXT=1`` makes ``load()`` return None, and
``EVOMOE_DISABLE_CPU_EXT=1`` does the same for ``load_cpu()`` (to exercise the
other backends); loaders cache their answer (``reset()`` clears it).

Permutation contract (shared with the Triton and PyTorch backends of
``megatron_evomoe.ops.permute``; its executable form is the PyTorch reference in
``kernels/permute.py``: ``expert_histogram_reference``, ``permute_reference``,
``unpermute_reference``, ``unpermute_bwd_reference``). With T tokens, K slots per
token (top-k), E experts and C channels, slot ``(t, k)`` is the flat index
``s = t * K + k``:

* ``expert_histogram(topk_idx [T, K] int64, E) -> counts [E] int64``:
  ``counts[e]`` = number of slots routed to expert e.
* ``permute(x [T, C], topk_idx [T, K] int64, E) -> (x_perm [T*K, C], row_map
  [T, K] int64, counts [E] int64)``: a *stable* sort of the slots by expert:
  expert e's segment is rows ``[offset_e, offset_e + counts[e])`` with
  ``offset_e = sum(counts[:e])``, and within it the slots appear in increasing
  ``s = t * K + k``. ``x_perm[row_map[t, k]] = x[t]``.
* Slots whose expert id is outside ``[0, E)`` (e.g. -1 for a dropped token)
  are not counted, get ``row_map = -1``, and take no row; the rows after
  ``sum(counts)`` are zero, so x_perm always has T*K rows (no host sync).
* ``unpermute(y_perm [N, C], row_map [T, K], gates [T, K] or None) -> y [T, C]``:
  ``y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]]`` over slots with
  ``row_map >= 0`` (gates None: weight 1), accumulated in fp32, returned in
  ``y_perm.dtype``.
* Backward helpers: ``permute_backward(grad_x_perm, row_map) -> grad_x`` (=
  ``unpermute`` with unit gates); ``unpermute_backward(grad_y, y_perm, row_map,
  gates) -> (grad_y_perm [N, C], grad_gates [T, K])`` with ``grad_y_perm[r] =
  gates[t, k] * grad_y[t]`` for the slot owning row r (zero for rows no slot
  owns) and ``grad_gates[t, k] = <grad_y[t], y_perm[row_map[t, k]]>`` (fp32
  accumulation, returned in ``gates.dtype``; 0 for dropped slots).
* CUDA ext limits: x / y_perm in float32, float16 or bfloat16; 1 <= E <= 1024
  (``MAX_EXPERTS``); topk_idx / row_map int64 (int32 is accepted and widened);
  row_map entries outside ``[0, N)`` are ignored rather than read; inputs are
  made contiguous; everything runs on the current stream of the inputs' device.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

CUDA_MODULE = "megatron_evomoe._C_cuda"
CPU_MODULE = "megatron_evomoe._C_cpu"
_REBUILD_HINT = "reinstall with `pip install --no-build-isolation -e .`"


def load() -> ModuleType | None:
    """The CUDA permute extension, or None (not built, not importable, no CUDA device)."""
    return _load_cuda()[0]


def load_cpu() -> ModuleType | None:
    """The CPU kernels extension, or None (not built or not importable)."""
    return _load_cpu()[0]


def describe() -> str:
    """One line for logs: what was built and usable, and why not."""
    return f"cuda_ext: {_load_cuda()[1]}; cpu_ext: {_load_cpu()[1]}"


def reset() -> None:
    """Forget cached load results (after an install, or to re-read EVOMOE_DISABLE_CUDA_EXT)."""
    _load_cuda.cache_clear()
    _load_cpu.cache_clear()


@functools.lru_cache(maxsize=None)
def _load_cuda() -> tuple[ModuleType | None, str]:
    if os.environ.get("EVOMOE_DISABLE_CUDA_EXT", "") not in ("", "0"):
        return None, "disabled (EVOMOE_DISABLE_CUDA_EXT is set)"
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 -- a loader must never raise
        return None, f"not built (torch not importable: {exc})"
    try:
        module = importlib.import_module(CUDA_MODULE)
    except Exception as exc:  # noqa: BLE001 -- ImportError, or OSError from a bad .so
        if getattr(torch.version, "cuda", None) is None:
            return None, (
                f"not built (torch {torch.__version__} is a CPU build: torch.version.cuda is None)"
            )
        if _spec_missing(CUDA_MODULE):
            return None, (
                "not built (no megatron_evomoe._C_cuda: the install found no nvcc/CUDA_HOME, or "
                f"EVOMOE_SKIP_CUDA_BUILD / EVOMOE_SKIP_CPP_BUILD was set; {_REBUILD_HINT})"
            )
        return None, f"built but not importable ({type(exc).__name__}: {exc}; {_REBUILD_HINT})"
    try:
        has_device = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_device = False
    if not has_device:
        return None, "built but unused (no CUDA device visible)"
    try:
        device = torch.cuda.get_device_name()
    except Exception as exc:  # noqa: BLE001
        device = f"device name unavailable: {exc}"
    return module, f"built (CUDA {torch.version.cuda}, {device})"


@functools.lru_cache(maxsize=None)
def _load_cpu() -> tuple[ModuleType | None, str]:
    if os.environ.get("EVOMOE_DISABLE_CPU_EXT", "") not in ("", "0"):
        return None, "disabled (EVOMOE_DISABLE_CPU_EXT is set)"
    try:
        import torch  # noqa: F401 -- the extension links against libtorch: load it first
        return importlib.import_module(CPU_MODULE), "built"
    except Exception as exc:  # noqa: BLE001 -- ImportError, or OSError from a bad .so
        if _spec_missing(CPU_MODULE):
            return None, (f"not built (no {CPU_MODULE}: no C++ compiler at install time, or "
                          f"EVOMOE_SKIP_CPP_BUILD was set; {_REBUILD_HINT})")
        return None, f"built but not importable ({type(exc).__name__}: {exc}; {_REBUILD_HINT})"


def _spec_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except Exception:  # noqa: BLE001
        return True

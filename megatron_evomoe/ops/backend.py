"""Run-time choice of the implementation behind each op: compiled extension, Triton, or PyTorch.

``resolve_backend(requested, op, device)`` maps a user's request to a concrete backend:

* ``"auto"``: on CUDA inputs, the CUDA extension if it is built, loads and implements ``op``; else
  compiled Triton if triton imports (and TRITON_INTERPRET is off: the interpreter is for tests, not
  for speed) -- for the ops in ``MEASURED_OPS`` that is ``"measured"``: per shape, the faster of the
  Triton kernels and PyTorch's own, timed once (backend_timing.py); else PyTorch. On CPU inputs,
  the CPU extension if it is built and implements ``op``; else PyTorch. The choice is logged once per (op, choice, device type) on the
  ``megatron_evomoe.ops`` logger.
* ``"cuda_ext"``, ``"cpu_ext"``, ``"triton"``, ``"torch"``: exactly that backend, or a
  ``BackendUnavailableError``
  (a ``RuntimeError``) saying why. Never a silent fallback. ``"triton"`` on CPU tensors works only
  under ``TRITON_INTERPRET=1`` (that is how CI runs the kernels).
* anything else: ``ValueError``.

The extensions are ``megatron_evomoe.ops._ext.load()`` (CUDA) and ``load_cpu()`` (CPU), imported
lazily; an ImportError or a ``None`` means unavailable. An extension implements an op when it has
every function the op needs (``EXT_FUNCTIONS``); their semantics are the contract in ``_ext.py``.
"""
from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "cuda_ext", "cpu_ext", "triton", "torch")
EXT_DEVICE = {"cuda_ext": "cuda", "cpu_ext": "cpu"}  # the device type each extension runs on

# Functions an extension must provide for it to serve an op (forward and backward).
EXT_FUNCTIONS = {
    "permute": ("permute", "permute_backward"),
    "unpermute": ("unpermute", "unpermute_backward"),
    "grouped_mm": ("grouped_mm", "grouped_mm_dgrad", "grouped_mm_wgrad"),
}

# Ops whose "auto" on CUDA times Triton against PyTorch per shape (torch._grouped_mm is a fused
# CUTLASS kernel on sm_90: which one wins depends on the shape, so it is measured, not assumed).
MEASURED_OPS = ("grouped_mm",)

logger = logging.getLogger("megatron_evomoe.ops")
_logged: set[tuple[str, str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly and cannot run here."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"triton does not import ({type(exc).__name__}: {exc})"
    return True, "triton imports"


def ext_module(backend: str):
    """(module or None, reason) for backend "cuda_ext" or "cpu_ext"."""
    try:
        from megatron_evomoe.ops import _ext
    except ImportError as exc:
        return None, f"megatron_evomoe.ops._ext does not import ({exc})"
    module = _ext.load() if backend == "cuda_ext" else _ext.load_cpu()
    if module is None:
        return None, _ext.describe()
    return module, "loaded"


def _ext_status(backend: str, op: str, device: torch.device | None) -> tuple[bool, str]:
    kind = EXT_DEVICE[backend]
    if device is not None and device.type != kind:
        return False, f"the {backend} extension runs on {kind} tensors, the inputs are on {device}"
    why_not = _ext_missing(backend, op)
    return (False, why_not) if why_not else (True, f"{backend} extension loaded")


@torch.compiler.assume_constant_result
def _ext_missing(backend: str, op: str) -> str:
    """Why ``backend`` cannot serve ``op`` ("" when it can). A constant to torch.compile: it
    imports modules, which Dynamo does not trace, and its answer never changes within a run."""
    module, why = ext_module(backend)
    if module is None:
        return why
    missing = [f for f in EXT_FUNCTIONS.get(op, (op,)) if not hasattr(module, f)]
    if missing:
        return f"the {backend} extension has no {', '.join(missing)} (it does not implement {op})"
    return ""


def _triton_status(device: torch.device | None) -> tuple[bool, str]:
    ok, why = triton_importable()
    if not ok:
        return False, why
    if triton_interpreting():
        return True, "TRITON_INTERPRET=1 (interpreted Triton)"
    if device is not None and device.type != "cuda":
        return False, (f"compiled Triton needs CUDA tensors, the inputs are on {device} "
                       "(set TRITON_INTERPRET=1 to interpret the kernels on CPU)")
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "compiled Triton"


def resolve_backend(requested: str, op: str, device: torch.device | str | None = None) -> str:
    """The backend ("cuda_ext" | "cpu_ext" | "triton" | "torch", or from "auto" "measured" for the ops
    in ``MEASURED_OPS``) to run ``op`` with for inputs on ``device``.

    ``device`` None means "the inputs are on the default CUDA device if there is one, else CPU"."""
    if requested not in BACKENDS:
        raise ValueError(f"backend for {op} must be one of {BACKENDS}, got {requested!r}")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if requested == "auto":
        choice, why = _auto(op, device)
    elif requested == "torch":
        choice, why = "torch", "requested"
    else:
        ok, why = _ext_status(requested, op, device) if requested in EXT_DEVICE else _triton_status(device)
        if not ok:
            raise BackendUnavailableError(f"backend {requested!r} was requested for {op} but is unavailable: {why}")
        choice = requested
    if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls; see log_choice
        log_choice(op, choice, device.type, f"{requested}: {why}")
    return choice


def log_choice(op: str, choice: str, device_type: str, detail: str) -> None:
    """Log the backend of ``op`` once per (op, choice, device type).

    Under torch.compile, resolve_backend is traced by Dynamo (which cannot trace logging calls), so
    the ops' fake implementations call this instead: they run as plain Python while tracing."""
    key = (op, choice, device_type)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: using the %s backend on %s (%s)", op, choice, device_type, detail)


def _auto(op: str, device: torch.device) -> tuple[str, str]:
    if device.type == "cpu":
        ok, why_ext = _ext_status("cpu_ext", op, device)
        return ("cpu_ext", why_ext) if ok else ("torch", f"cpu_ext unavailable ({why_ext})")
    if device.type != "cuda":
        return "torch", f"inputs on {device.type}; the extensions and compiled Triton need CPU or CUDA"
    ok, why_ext = _ext_status("cuda_ext", op, device)
    if ok:
        return "cuda_ext", why_ext
    ok, why_triton = triton_importable()
    if ok and triton_interpreting():
        ok, why_triton = False, "TRITON_INTERPRET=1 would interpret, not compile"
    if ok and op in MEASURED_OPS:
        return "measured", f"cuda_ext unavailable ({why_ext}); Triton vs PyTorch timed once per shape"
    if ok:
        return "triton", f"cuda_ext unavailable ({why_ext})"
    return "torch", f"cuda_ext unavailable ({why_ext}); triton unavailable ({why_triton})"


def reset_logged() -> None:
    """Forget which choices were logged (tests)."""
    _logged.clear()

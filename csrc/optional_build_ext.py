"""The build_ext command of the csrc/ extensions: an optional extension that fails is skipped.

torch's ``BuildExtension`` does its CUDA work inside build_ext, where setuptools' ``optional=True``
forgives only compiler errors (CCompilerError, CompileError, DistutilsError):

* ``_check_cuda_version`` runs once, before the per-extension loop, and raises RuntimeError on a
  toolkit / torch major-version or host-compiler mismatch, or CalledProcessError on a broken nvcc;
* ``_get_cuda_arch_flags`` runs while compiling each CUDA source; with TORCH_CUDA_ARCH_LIST unset it
  uses the visible GPUs' archs, and with no GPU visible (a login or build node) raises IndexError.

So this command (1) defaults TORCH_CUDA_ARCH_LIST to ``DEFAULT_CUDA_ARCH_LIST`` for the build when
it is unset and no GPU is visible, (2) turns any exception while building an optional extension
into one line on stderr and skips that extension, and (3) if torch's checks ahead of the loop fail,
skips the optional CUDA extensions and builds the others. csrc/build.py makes every extension
optional unless EVOMOE_STRICT_BUILD=1, so in strict mode every error propagates unchanged.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils.cpp_extension import BuildExtension

from .build import NOT_BUILT, say

# sm_80 code (A100, and the other 8.x GPUs: same major, binary compatible), sm_90 code (H100) and
# sm_90 PTX, which newer GPUs (Blackwell) compile when the extension loads.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
_STRICT_HINT = "EVOMOE_STRICT_BUILD=1 makes this an error"


class OptionalBuildExtension(BuildExtension):
    """torch's BuildExtension, with the arch default and the skip rules of the module docstring."""

    def build_extensions(self) -> None:
        self._skipped: list = []
        cuda = [ext for ext in self.extensions if is_cuda_extension(ext)]
        with _default_arch_list(bool(cuda)):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 -- see below
                # build_extension forgives every optional extension's own errors, so what gets here
                # is torch's toolkit check ahead of the loop: nothing is built yet; retry without CUDA.
                optional_cuda = [ext for ext in cuda if ext.optional]
                if not optional_cuda:
                    raise
                for ext in optional_cuda:
                    self._skip(ext, exc)
                self.extensions = [ext for ext in self.extensions if ext not in optional_cuda]
                super().build_extensions()
        # setuptools lists (and copies in place) every extension left here: keep only the built ones.
        self.extensions = [ext for ext in self.extensions if ext not in self._skipped]

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 -- an optional extension never fails the install
            if not ext.optional:
                raise
            self._skip(ext, exc)

    def _skip(self, ext, exc: BaseException) -> None:
        self._skipped.append(ext)
        say(NOT_BUILT[ext.name].format(f"{one_line(exc)}; {_STRICT_HINT}"))


def default_cuda_arch_list() -> str | None:
    """The arch list to build for when the user set none and torch has no GPU to ask; else None."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return None
    return DEFAULT_CUDA_ARCH_LIST if _num_visible_gpus() == 0 else None


def is_cuda_extension(ext) -> bool:
    return any(os.path.splitext(source)[1] == ".cu" for source in ext.sources)


def one_line(exc: BaseException, max_chars: int = 240) -> str:
    """'Type: first line of the message', short enough for one line of pip's output."""
    lines = _message(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _message(exc: BaseException) -> str:
    # torch raises some errors logging-style, RuntimeError(format, *values): str() would show a tuple.
    if len(exc.args) > 1 and isinstance(exc.args[0], str):
        with contextlib.suppress(TypeError, ValueError):
            return exc.args[0] % exc.args[1:]
    return str(exc)


@contextlib.contextmanager
def _default_arch_list(has_cuda_extension: bool):
    """TORCH_CUDA_ARCH_LIST=default_cuda_arch_list() for the duration of the build, if one is needed."""
    arch_list = default_cuda_arch_list() if has_cuda_extension else None
    if arch_list is None:
        yield
        return
    say(f"TORCH_CUDA_ARCH_LIST not set and no GPU visible: building the CUDA extension for "
        f"{arch_list} (set TORCH_CUDA_ARCH_LIST to choose)")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        yield
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _num_visible_gpus() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- a broken driver shows no GPU, which is what it means here
        return 0

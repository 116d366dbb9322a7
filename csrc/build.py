"""Decides which parts of the csrc/ extension can be built on this machine.

setup.py calls ``extension_modules_and_cmdclass()`` at install time
(``pip install --no-build-isolation -e .``). Two optional extensions:

* ``megatron_evomoe._C_cpu`` (csrc/grouped_gemm_cpu.cpp, permute_cpu.cpp,
  cpu_bindings.cpp): a torch ``CppExtension`` with the CPU kernels of the
  MoE ops (backend ``cpu_ext``). Built when a C++ compiler is found and torch
  imports; about a minute of compiling on 2 cores (torch headers).
* ``megatron_evomoe._C_cuda`` (csrc/permute_cuda.cu + permute_bindings.cpp):
  a torch ``CUDAExtension`` built with ninja. Built when, in addition, torch
  is a CUDA build (``torch.version.cuda``) and nvcc is found under torch's
  ``CUDA_HOME``. Set ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0") to choose the
  GPU targets; the default is the visible GPUs, or "8.0;9.0+PTX" when none is
  visible (a login or build node).

Both are built by ``csrc/optional_build_ext.py::OptionalBuildExtension``
(torch's BuildExtension with ninja): an extension that fails to build for any
reason (compiler, toolkit check, arch flags) is skipped with one line on stderr.

Switches (environment): ``EVOMOE_SKIP_CPP_BUILD=1`` builds no compiled
extension at all (CPU and CUDA extensions); ``EVOMOE_SKIP_CUDA_BUILD=1`` skips
only the CUDA one. Whatever is not built leaves the pure-Python path, with
one line on stderr saying so; a missing compiler never fails the install.
``EVOMOE_STRICT_BUILD=1`` makes build errors fatal (CI).
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig

CPU_EXT = "megatron_evomoe._C_cpu"
CUDA_EXT = "megatron_evomoe._C_cuda"
_PREFIX = "megatron_evomoe:"
# What is missing without each extension; {} is why it was not built.
NOT_BUILT = {CPU_EXT: "CPU extension not built ({}); the ops use PyTorch on CPU",
             CUDA_EXT: "CUDA extension not built ({}); the ops use Triton/PyTorch"}


def extension_modules_and_cmdclass():
    """(ext_modules, cmdclass) for setup(); never raises."""
    if _env_flag("EVOMOE_SKIP_CPP_BUILD"):
        say("C++ extensions not built (EVOMOE_SKIP_CPP_BUILD=1); the ops use Triton/PyTorch")
        return [], {}
    compiler = find_cxx_compiler()
    if compiler is None:
        say("C++ extensions not built (no compiler); the ops use Triton/PyTorch")
        return [], {}

    ext_modules = []
    for name, build in ((CPU_EXT, _cpu_extension), (CUDA_EXT, _cuda_extension)):
        ext, why_not = build()
        if ext is None:
            say(NOT_BUILT[name].format(why_not))
            continue
        ext_modules.append(ext)
    if not ext_modules:
        return [], {}
    # Both are torch extensions: they need torch's BuildExtension (ninja), which imports torch.
    from .optional_build_ext import OptionalBuildExtension

    return ext_modules, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


def find_cxx_compiler() -> str | None:
    """Path of the C++ compiler setuptools would use ($CXX, Python's CXX, c++/g++/clang++)."""
    candidates = []
    for command in (os.environ.get("CXX"), sysconfig.get_config_var("CXX")):
        if command:
            try:
                candidates.append(shlex.split(command)[0])
            except ValueError:
                pass
    candidates += ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_extension():
    _, _, why_not = torch_build_info()
    if why_not:
        return None, why_not
    try:
        from torch.utils.cpp_extension import CppExtension
    except Exception as exc:  # noqa: BLE001
        return None, f"torch.utils.cpp_extension not usable: {exc}"
    return (
        CppExtension(
            CPU_EXT,
            sources=["csrc/cpu_bindings.cpp", "csrc/grouped_gemm_cpu.cpp", "csrc/permute_cpu.cpp"],
            # -fopenmp: at::parallel_for in the kernels must be the OpenMP one torch itself uses.
            # No -march: the wheel-built torch runs on any x86-64, and so must this.
            extra_compile_args=["-O3", "-g0", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=not _env_flag("EVOMOE_STRICT_BUILD"),
        ),
        "",
    )


def _cuda_extension():
    if _env_flag("EVOMOE_SKIP_CUDA_BUILD"):
        return None, "EVOMOE_SKIP_CUDA_BUILD=1"
    torch_version, torch_cuda, why_not = torch_build_info()
    if why_not:
        return None, why_not
    if torch_cuda is None:
        return None, f"torch {torch_version} is not a CUDA build"
    try:
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except Exception as exc:  # noqa: BLE001
        return None, f"torch.utils.cpp_extension not usable: {exc}"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return None, "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return (
        CUDAExtension(
            CUDA_EXT,
            sources=["csrc/permute_bindings.cpp", "csrc/permute_cuda.cu"],
            # No -std here: BuildExtension adds the standard torch needs.
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            optional=not _env_flag("EVOMOE_STRICT_BUILD"),
        ),
        "",
    )


def torch_build_info() -> tuple[str | None, str | None, str]:
    """(torch.__version__, torch.version.cuda, why-not) without importing torch when possible.

    setup.py runs several times per `pip install` and importing torch takes
    seconds; torch/version.py is a few constants, so it is read directly.
    """
    if "torch" not in sys.modules:
        try:
            spec = importlib.util.find_spec("torch")
            if spec is None:
                return None, None, "torch is not installed"
            path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
            namespace: dict = {}
            with open(path, encoding="utf-8") as handle:
                exec(compile(handle.read(), path, "exec"), namespace)  # noqa: S102 -- torch's own constants
            return namespace["__version__"], namespace.get("cuda"), ""
        except Exception:  # noqa: BLE001 -- unusual layout: ask torch itself
            pass
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 -- never fail the install over an optional part
        return None, None, f"torch not importable: {exc}"
    return torch.__version__, getattr(torch.version, "cuda", None), ""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def say(message: str) -> None:
    print(f"{_PREFIX} {message}", file=sys.stderr)

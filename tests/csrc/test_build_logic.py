"""csrc/build.py + csrc/optional_build_ext.py on a fake CUDA machine: a CUDA torch, nvcc, no GPU.

The fake: ``torch_build_info`` and ``torch.version.cuda`` report CUDA 12.4, torch's ``CUDA_HOME``
points at a tmp toolkit whose ``bin/nvcc`` is a script (it answers ``--version`` and fails any
compile after writing its arguments to a file), and no GPU is visible. The build_ext command is
driven directly on one extension whose sources are swapped for a tiny file, so nothing slow compiles.
"""
import os
import stat

import pytest
import torch
from setuptools import Distribution
from torch.utils import cpp_extension

from csrc import build, optional_build_ext
from csrc.optional_build_ext import DEFAULT_CUDA_ARCH_LIST, OptionalBuildExtension, default_cuda_arch_list

# build.py builds no extension at all without a C++ compiler: nothing to drive then.
pytestmark = pytest.mark.skipif(build.find_cxx_compiler() is None, reason="needs a C++ compiler")

# The nvcc -gencode flags of "8.0;9.0+PTX": sm_80 and sm_90 code, and sm_90 PTX.
DEFAULT_GENCODES = {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                    "-gencode=arch=compute_90,code=compute_90"}

_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release {release}, V{release}.99"; exit 0; fi
for arg in "$@"; do echo "$arg"; done > "{args_file}"
echo "fake nvcc: no compiling here" >&2
exit 1
"""


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """A function(toolkit release) that sets up the fake CUDA machine; returns nvcc's argument file."""
    def setup(release="12.4"):
        bin_dir = tmp_path / "cuda" / "bin"
        bin_dir.mkdir(parents=True)
        args_file = tmp_path / "nvcc_args.txt"
        nvcc = bin_dir / "nvcc"
        nvcc.write_text(_NVCC.format(release=release, args_file=args_file))
        nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setattr(build, "torch_build_info", lambda: ("2.13.0+cu124", "12.4", ""))
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        for name in ("TORCH_CUDA_ARCH_LIST", "EVOMOE_STRICT_BUILD", "EVOMOE_SKIP_CPP_BUILD", "EVOMOE_SKIP_CUDA_BUILD"):
            monkeypatch.delenv(name, raising=False)
        return args_file
    return setup


def _extensions(tmp_path, sources):
    """build.py's extensions and cmdclass, each extension's sources swapped for `sources[name]`."""
    ext_modules, cmdclass = build.extension_modules_and_cmdclass()
    chosen = [ext for ext in ext_modules if ext.name in sources]
    for ext in chosen:
        ext.sources = [str(path) for path in sources[ext.name]]
    return chosen, cmdclass


def _run_build_ext(tmp_path, ext_modules, cmdclass):
    dist = Distribution({"name": "fake_evomoe", "ext_modules": ext_modules, "cmdclass": cmdclass})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    return cmd


def _cuda_source(tmp_path):
    path = tmp_path / "kernel.cu"
    path.write_text("__global__ void k() {}\n")
    return path


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("megatron_evomoe:")]


def test_default_arch_list_only_when_none_set_and_no_gpu_visible(fake_cuda, monkeypatch):
    fake_cuda()
    assert default_cuda_arch_list() == "8.0;9.0+PTX" == DEFAULT_CUDA_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert default_cuda_arch_list() is None  # the user's list wins
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", " ")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert default_cuda_arch_list() is None  # torch asks the visible GPUs


def test_fake_cuda_machine_gets_the_cuda_extension_and_the_forgiving_command(fake_cuda):
    fake_cuda()
    ext_modules, cmdclass = build.extension_modules_and_cmdclass()
    cuda = [ext for ext in ext_modules if ext.name == build.CUDA_EXT]
    assert len(cuda) == 1 and cuda[0].optional
    assert {os.path.basename(s) for s in cuda[0].sources} == {"permute_bindings.cpp", "permute_cuda.cu"}
    assert issubclass(cmdclass["build_ext"], OptionalBuildExtension)


def test_no_arch_list_no_gpu_builds_for_the_default_and_a_failed_nvcc_skips_the_extension(
        fake_cuda, tmp_path, capsys):
    args_file = fake_cuda()
    ext_modules, cmdclass = _extensions(tmp_path, {build.CUDA_EXT: [_cuda_source(tmp_path)]})
    cmd = _run_build_ext(tmp_path, ext_modules, cmdclass)  # must not raise
    gencodes = {arg for arg in args_file.read_text().split() if arg.startswith("-gencode")}
    assert gencodes == DEFAULT_GENCODES
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # set for the build only
    notes = _notes(capsys)
    assert notes[0] == ("megatron_evomoe: TORCH_CUDA_ARCH_LIST not set and no GPU visible: building the CUDA "
                        "extension for 8.0;9.0+PTX (set TORCH_CUDA_ARCH_LIST to choose)")
    assert len(notes) == 2 and notes[1].startswith("megatron_evomoe: CUDA extension not built (RuntimeError: ")
    assert notes[1].endswith("; EVOMOE_STRICT_BUILD=1 makes this an error); the ops use Triton/PyTorch")
    assert cmd.extensions == [] and cmd.get_outputs() == []


def test_the_user_arch_list_is_passed_to_nvcc_untouched(fake_cuda, tmp_path, monkeypatch, capsys):
    args_file = fake_cuda()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    ext_modules, cmdclass = _extensions(tmp_path, {build.CUDA_EXT: [_cuda_source(tmp_path)]})
    _run_build_ext(tmp_path, ext_modules, cmdclass)
    # "8.6" without +PTX: sm_86 code only
    assert [arg for arg in args_file.read_text().split() if arg.startswith("-gencode")] == [
        "-gencode=arch=compute_86,code=sm_86"]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"
    assert not any("TORCH_CUDA_ARCH_LIST not set" in note for note in _notes(capsys))


def _without_the_default(monkeypatch):
    """Leave TORCH_CUDA_ARCH_LIST unset during the build: torch's own arch helper then raises IndexError."""
    monkeypatch.setattr(optional_build_ext, "default_cuda_arch_list", lambda: None)


def test_torch_arch_helper_index_error_becomes_a_warning(fake_cuda, tmp_path, monkeypatch, capsys):
    args_file = fake_cuda()
    _without_the_default(monkeypatch)
    ext_modules, cmdclass = _extensions(tmp_path, {build.CUDA_EXT: [_cuda_source(tmp_path)]})
    cmd = _run_build_ext(tmp_path, ext_modules, cmdclass)
    assert not args_file.exists()  # it failed computing nvcc's flags, before running nvcc
    assert _notes(capsys) == ["megatron_evomoe: CUDA extension not built (IndexError: list index out of range; "
                              "EVOMOE_STRICT_BUILD=1 makes this an error); the ops use Triton/PyTorch"]
    assert cmd.extensions == []


def test_strict_build_raises_the_index_error(fake_cuda, tmp_path, monkeypatch):
    fake_cuda()
    _without_the_default(monkeypatch)
    monkeypatch.setenv("EVOMOE_STRICT_BUILD", "1")
    ext_modules, cmdclass = _extensions(tmp_path, {build.CUDA_EXT: [_cuda_source(tmp_path)]})
    assert not ext_modules[0].optional
    with pytest.raises(IndexError):
        _run_build_ext(tmp_path, ext_modules, cmdclass)


def test_a_failed_toolkit_check_skips_cuda_and_still_builds_the_cpu_extension(fake_cuda, tmp_path, capsys):
    fake_cuda(release="11.8")  # torch is CUDA 12.4: torch's check before any compile raises RuntimeError
    cpp = tmp_path / "tiny.cpp"
    cpp.write_text('#include <Python.h>\nstatic PyModuleDef m = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1};\n'
                   'PyMODINIT_FUNC PyInit__C_cpu() { return PyModule_Create(&m); }\n')
    ext_modules, cmdclass = _extensions(tmp_path, {build.CPU_EXT: [cpp], build.CUDA_EXT: [_cuda_source(tmp_path)]})
    cmd = _run_build_ext(tmp_path, ext_modules, cmdclass)
    assert [ext.name for ext in cmd.extensions] == [build.CPU_EXT]
    (built,) = cmd.get_outputs()
    assert os.path.getsize(built) > 0 and os.path.basename(built).startswith("_C_cpu")
    skipped = [note for note in _notes(capsys) if "not built" in note]
    assert len(skipped) == 1 and skipped[0].startswith(
        "megatron_evomoe: CUDA extension not built (RuntimeError: The detected CUDA version (11.8) mismatches ")
    assert "(12.4)" in skipped[0]  # torch's version, formatted into the message


def test_one_line_keeps_the_type_and_the_first_line_only():
    assert optional_build_ext.one_line(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert optional_build_ext.one_line(IndexError()) == "IndexError"
    assert optional_build_ext.one_line(RuntimeError("got %s, want %s", "11.8", "12.4")) == "RuntimeError: got 11.8, want 12.4"
    long = optional_build_ext.one_line(ValueError("x" * 500), max_chars=20)
    assert long == "ValueError: xxxxx..." and len(long) == 20

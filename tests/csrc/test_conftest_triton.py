"""tests/conftest.py's TRITON_INTERPRET decision and its gpu-test verdict, without a GPU.

Unit tests of the three decision functions, then three pytest sessions (subprocesses) on a probe
file, loading tests/conftest.py as a plugin and a fake-CUDA plugin (``torch.cuda.is_available``
returns True): the probe checks the environment and what ``@triton.jit`` made of a kernel
(``JITFunction`` compiled, ``InterpretedFunction`` interpreted), which shows the value was in
place before triton was imported.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import gpu_verdict, selects_only_gpu_tests, triton_interpret_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("markexpr,gpu_only", [("gpu", True), (" gpu and not slow ", True), ("", False),
                                               ("not gpu", False), ("slow", False), ("gpu or not slow", False)])
def test_gpu_only_expressions(markexpr, gpu_only):
    assert selects_only_gpu_tests(markexpr) is gpu_only


def _never_asked():
    raise AssertionError("CUDA availability was asked (importing torch) though the answer cannot matter")


def test_the_interpret_value_of_a_session():
    assert triton_interpret_for({}, "gpu", lambda: True) == "0"
    assert triton_interpret_for({}, "gpu", lambda: False) == "1"
    assert triton_interpret_for({}, "", _never_asked) == "1"
    assert triton_interpret_for({}, "not gpu", _never_asked) == "1"
    assert triton_interpret_for({"TRITON_INTERPRET": "1"}, "gpu", _never_asked) == "1"  # the caller wins
    assert triton_interpret_for({"TRITON_INTERPRET": "0"}, "", _never_asked) == "0"


def test_the_gpu_verdict(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_verdict(False, True, True) == ("skip", "needs CUDA")
    assert gpu_verdict(True, False, True) == ("run", "")
    verdict, reason = gpu_verdict(True, True, True)
    assert verdict == "fail" and reason.startswith("TRITON_INTERPRET=1: the Triton kernels would run in the interpreter")
    verdict, reason = gpu_verdict(True, True, False)
    assert verdict == "skip" and reason.endswith("run the gpu tests with `pytest -m gpu`")


_PROBE = '''
import os
import pytest
import triton

@triton.jit
def _kernel(x):
    pass

def test_cpu_probe():
    assert os.environ["TRITON_INTERPRET"] == "1" and type(_kernel).__name__ == "InterpretedFunction"

@pytest.mark.gpu
def test_gpu_probe():
    assert os.environ["TRITON_INTERPRET"] == "0" and type(_kernel).__name__ == "JITFunction"
'''


# name -> (extra pytest arguments, TRITON_INTERPRET set by the caller or None)
_SESSIONS = {"gpu": (["-m", "gpu"], None), "gpu, interpreter forced": (["-m", "gpu"], "1"), "mixed": ([], None)}


def _start(folder: Path, args, interpret):
    folder.mkdir()
    (folder / "test_probe.py").write_text(_PROBE)
    (folder / "fake_cuda_plugin.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(folder)])
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "fake_cuda_plugin",
           "-p", "tests.conftest", "--rootdir", str(folder), str(folder / "test_probe.py"), *args]
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """name -> (exit status, output) of each of _SESSIONS, run side by side (each imports torch: seconds)."""
    root = tmp_path_factory.mktemp("sessions")
    running = {name: _start(root / f"s{i}", *spec) for i, (name, spec) in enumerate(_SESSIONS.items())}
    outputs = {name: proc.communicate(timeout=240)[0] for name, proc in running.items()}
    return {name: (proc.returncode, outputs[name]) for name, proc in running.items()}


def test_dash_m_gpu_on_a_cuda_machine_runs_the_kernels_compiled(sessions):
    rc, out = sessions["gpu"]
    assert rc == 0 and "1 passed, 1 deselected" in out, out


def test_dash_m_gpu_with_the_interpreter_forced_fails_the_gpu_tests(sessions):
    rc, out = sessions["gpu, interpreter forced"]
    assert rc == 1 and "1 failed, 1 deselected" in out, out
    assert "TRITON_INTERPRET=1: the Triton kernels would run in the interpreter" in out


def test_a_mixed_session_interprets_and_skips_the_gpu_tests_saying_why(sessions):
    rc, out = sessions["mixed"]
    assert rc == 0 and "1 passed, 1 skipped" in out, out
    assert "run the gpu tests with `pytest -m gpu`" in out

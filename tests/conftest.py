"""Test-wide set-up shared by every test folder.

* TRITON_INTERPRET is decided in ``pytest_configure``, before any test module imports triton
  (``@triton.jit`` reads it when a kernel module is imported): a value the caller set always wins;
  otherwise "0" (kernels compiled) when ``-m`` keeps only gpu tests (``-m gpu``, ``-m "gpu and not
  slow"``) and CUDA is available, else "1": the CPU tests run the Triton kernels on CPU tensors in
  the interpreter.
* The ``gpu`` marker: such tests are skipped, with the reason "needs CUDA", when no CUDA device is
  visible. With one, a gpu test under the interpreter would prove nothing (the ``auto`` backend
  then resolves to PyTorch): under ``-m gpu`` it fails, naming the fix; in a session that also runs
  the CPU tests (which need the interpreter) it is skipped, saying to run ``pytest -m gpu``.
"""
import functools
import os

import pytest

_GPU_FAILURE = pytest.StashKey[str]()


def selects_only_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` keeps a test marked only ``gpu`` and drops an unmarked one."""
    if not markexpr.strip():
        return False
    try:
        from _pytest.mark.expression import Expression  # pytest's own -m parser
        expression = Expression.compile(markexpr)
    except Exception:  # noqa: BLE001 -- a private API moved, or a bad expression pytest reports itself
        return markexpr.strip() == "gpu"
    return expression.evaluate(lambda name, **_: name == "gpu") and not expression.evaluate(lambda name, **_: False)


def triton_interpret_for(environ, markexpr: str, cuda_available) -> str:
    """The TRITON_INTERPRET value of this session; `cuda_available()` is asked only for gpu-only runs."""
    if "TRITON_INTERPRET" in environ:
        return environ["TRITON_INTERPRET"]
    return "0" if selects_only_gpu_tests(markexpr) and cuda_available() else "1"


def gpu_verdict(cuda_available: bool, interpreting: bool, gpu_only: bool) -> tuple[str, str]:
    """("run" | "skip" | "fail", reason) for every gpu test of the session."""
    if not cuda_available:
        return "skip", "needs CUDA"
    if not interpreting:
        return "run", ""
    value = os.environ.get("TRITON_INTERPRET")
    if gpu_only:
        return "fail", (f"TRITON_INTERPRET={value}: the Triton kernels would run in the interpreter and the "
                        "'auto' backend on PyTorch; unset it (or set TRITON_INTERPRET=0) to test them compiled")
    return "skip", (f"Triton is interpreted in this session (TRITON_INTERPRET={value}, for the CPU tests): "
                    "run the gpu tests with `pytest -m gpu`")


@functools.cache
def _cuda_available() -> bool:
    import torch  # torch does not import triton; only the kernel modules do, after pytest_configure

    return torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with reason 'needs CUDA' without one)")
    os.environ["TRITON_INTERPRET"] = triton_interpret_for(os.environ, config.option.markexpr or "", _cuda_available)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # the package's rule (ops/backend.py)
    verdict, reason = gpu_verdict(_cuda_available(), interpreting, selects_only_gpu_tests(config.option.markexpr or ""))
    if verdict == "skip":
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
    elif verdict == "fail":
        config.stash[_GPU_FAILURE] = reason


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    reason = item.config.stash.get(_GPU_FAILURE, None)
    if reason is not None and item.get_closest_marker("gpu") is not None:
        pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The tiny bundled dataset (16x16 images) that the training, parallel and reliability tests share."""
    from megatron_evomoe.data.build_bundled import build_bundled_dataset
    root = tmp_path_factory.mktemp("bundled")
    build_bundled_dataset(str(root), num_images=48, num_test_images=8, image_size=16, seed=42)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A run of all four stages (DTR router, MoE layer 1) on the bundled data, built into tmp and loaded
    for inference: the checkpoint of the generation CLI and benchmark runners' end-to-end tests."""
    from megatron_evomoe.config import load_config
    from megatron_evomoe.generate import load_for_inference
    from megatron_evomoe.training.trainer import Trainer
    from tests.training.tiny_config import STAGES, TINY
    root = tmp_path_factory.mktemp("generate")
    cfg = load_config(None, TINY + [STAGES, f"--data.root={root / 'data'}", f"--train.save_dir={root / 'run'}",
                                    "--train.save_interval=0", "--data.num_eval_samples=0"])
    Trainer(cfg).run()
    model, cfg, bundle, state = load_for_inference(root / "run")
    return dict(root=root, run=root / "run", data=root / "data", model=model, cfg=cfg, bundle=bundle, state=state)

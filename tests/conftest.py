"""Test-wide set-up shared by every test folder.

* TRITON_INTERPRET=1 unless the caller set it (e.g. TRITON_INTERPRET=0 to run the kernels compiled
  on a GPU): it must be in the environment before anything imports triton, because ``@triton.jit``
  reads it when a kernel module is imported.
* The ``gpu`` marker: such tests are skipped, with the reason "needs CUDA", only when no CUDA
  device is visible.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with reason 'needs CUDA' without one)")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


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

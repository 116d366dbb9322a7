import pytest

from megatron_evomoe.config import load_config

from tests.training.tiny_config import STAGES, TINY


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    from megatron_evomoe.data.build_bundled import build_bundled_dataset
    root = tmp_path_factory.mktemp("bundled")
    build_bundled_dataset(str(root), num_images=48, num_test_images=8, image_size=16, seed=42)
    return root


@pytest.fixture
def make_cfg(data_root, tmp_path):
    def make(*extra, save_dir=None):
        return load_config(None, TINY + [STAGES, f"--data.root={data_root}",
                                         f"--train.save_dir={save_dir or tmp_path / 'run'}", *extra])
    return make

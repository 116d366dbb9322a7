import pytest

from megatron_evomoe.config import load_config

from tests.training.tiny_config import STAGES, TINY


@pytest.fixture
def make_cfg(data_root, tmp_path):
    def make(*extra, save_dir=None):
        return load_config(None, TINY + [STAGES, f"--data.root={data_root}",
                                         f"--train.save_dir={save_dir or tmp_path / 'run'}", *extra])
    return make

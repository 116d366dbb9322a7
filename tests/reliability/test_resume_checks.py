"""A resumed run continues the checkpoint's stage by name, not only by index: a changed stage list is
named, field and both values, instead of resuming into another stage."""
import re

import pytest

from megatron_evomoe.checkpointing import CheckpointError
from megatron_evomoe.config import load_config
from megatron_evomoe.training.trainer import Trainer
from tests.training.tiny_config import TINY

STAGES = ("--stages=[{{name: {a}, trainable: ['projector.*'], data: captions.json, steps: 2, eval: false}},"
          "{{name: {b}, trainable: ['llm.*'], steps: 1, eval: false}}]")


def _cfg(data_root, save_dir, a, b):
    return load_config(None, [*TINY, STAGES.format(a=a, b=b), f"--data.root={data_root}",
                              "--data.build_if_missing=false", f"--train.save_dir={save_dir}",
                              "--train.save_interval=1"])


@pytest.fixture
def stopped_in_stage_two(data_root, tmp_path):
    """A finished run of stages proj, warm: its newest checkpoint is the end of stage 1, warm."""
    run = tmp_path / "run"
    Trainer(_cfg(data_root, run, "proj", "warm")).run()
    return run


def test_renamed_earlier_stage_is_refused(data_root, stopped_in_stage_two):
    with pytest.raises(CheckpointError, match=re.escape("stages[0] is 'projector' here and 'proj' in the checkpoint")):
        Trainer(_cfg(data_root, stopped_in_stage_two, "projector", "warm")).run()


def test_swapped_stage_at_the_checkpoint_is_refused(data_root, stopped_in_stage_two):
    with pytest.raises(CheckpointError, match=re.escape("stages[1] is 'dense' here and 'warm' in the checkpoint")):
        Trainer(_cfg(data_root, stopped_in_stage_two, "proj", "dense")).run()


def test_same_stage_names_resume(data_root, stopped_in_stage_two):
    assert Trainer(_cfg(data_root, stopped_in_stage_two, "proj", "warm")).run() == []  # all done already

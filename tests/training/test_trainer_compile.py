"""train.compile=true: the same losses as eager through the stage structure changes (dense -> evolve ->
sparse MoE with the DTR router), one process, with no graph break."""
import pytest
import torch
from torch._dynamo.utils import counters

import megatron_evomoe.parallel.compile as compile_mod
from megatron_evomoe.config import load_config
from megatron_evomoe.config.schema import ConfigError
from megatron_evomoe.parallel.compile import is_compiled
from megatron_evomoe.training.trainer import Trainer

SHORT_STAGES = ("--stages=["
                "{name: warmup, trainable: ['llm.*', 'projector.*'], steps: 2, eval: false},"
                "{name: evolution, trainable: ['llm.layers.{moe}.mlp.*'], steps: 1, moe_mode: evolve, eval: false},"
                "{name: router, trainable: ['llm.*'], steps: 2, moe_mode: sparse, eval: false}]")


def stage_losses(make_cfg, tmp_path, name, *extra):
    trainer = Trainer(make_cfg(SHORT_STAGES, "--train.global_batch_size=8", "--train.save_interval=0",
                               "--moe.expert_backend=auto", "--router.backend=auto", *extra,
                               save_dir=tmp_path / name))
    trainer.run()
    return trainer, [(h["stage"], h["loss"]) for h in trainer.history if "loss" in h]


def test_compiled_training_has_the_eager_losses(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")  # AOTAutograd graphs; inductor: tests/moe
    _, eager = stage_losses(make_cfg, tmp_path, "eager")
    torch._dynamo.reset()
    counters.clear()
    trainer, compiled = stage_losses(make_cfg, tmp_path, "compiled", "--train.compile=true")
    assert all(is_compiled(layer) for layer in trainer.model.llm.layers)
    assert counters["stats"]["unique_graphs"] >= 3  # dense, evolving and MoE layers each traced
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [s for s, _ in compiled] == [s for s, _ in eager] == ["warmup"] * 2 + ["evolution"] + ["router"] * 2
    for (_, a), (_, b) in zip(compiled, eager):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)


def test_compile_refuses_the_loop_expert_backend():
    with pytest.raises(ConfigError, match="^train.compile: moe.expert_backend=loop"):
        load_config(None, ["--stages=[{name: s}]", "--train.compile=true", "--moe.expert_backend=loop"])

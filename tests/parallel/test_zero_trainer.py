"""`parallel.zero1=true`: the trainer under DP2 steps with `ZeroAdamW` (AdamW state sharded over the
replicas) and follows the same trajectory as with the unsharded optimizer through all four stages of
the tiny recipe, holds half the optimizer state per rank, and resumes bit-identically mid-stage from
its distributed checkpoint, which also resumes without ZeRO-1 and in one process."""
from __future__ import annotations

import shutil

import pytest
import torch

from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.parallel import ParallelState, full_state_dict
from megatron_evomoe.checkpointing import CheckpointError
from megatron_evomoe.training.trainer import Trainer
from tests.parallel.common import run_until_crash
from tests.training.tiny_config import STAGES, TINY

from .dist_utils import run_distributed

CRASH_AT = 8  # before global step 8: the latest checkpoint is evolution step 2 (global step 7), mid-stage


def _cfg(data_root, save_dir, zero1: bool, *extra):
    # dp = 2: each rank's micro-batch is half of the one-process micro-batch of 4
    return load_config(None, TINY + [STAGES, f"--data.root={data_root}", f"--train.save_dir={save_dir}",
                                     "--data.build_if_missing=false", "--train.micro_batch_size=2",
                                     f"--parallel.zero1={str(zero1).lower()}", *extra])


def _losses(history):
    return [(h["stage"], h["stage_step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h]


def _worker(rank, world, data_root, tmp, extra=(), crash=True):
    out = {}
    for name, zero1 in (("plain", False), ("zero1", True)):
        cfg = _cfg(data_root, f"{tmp}/{name}", zero1, *extra)
        state = ParallelState.build(cfg, rank, world)
        trainer = Trainer(cfg, state)
        history = trainer.run()
        zero = trainer.par.zero_optimizer
        out[name] = {"losses": _losses(history), "full": full_state_dict(trainer.model, state),
                     "uses_zero": zero is not None,
                     "state_numel": zero.state_numel() if zero is not None else None,
                     "trainable_numel": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                     "expert_numel": sum(p.numel() for n, p in trainer.model.named_parameters()
                                         if p.requires_grad and ".experts." in n)}
    if not crash:
        return out
    # crash before global step 8, then resume from the per-rank checkpoint of evolution step 2
    cfg = _cfg(data_root, f"{tmp}/crash", True)
    state = ParallelState.build(cfg, rank, world)
    run_until_crash(cfg, state, CRASH_AT)
    if rank == 0:  # the mid-stage checkpoint, for the resumes in other settings below
        for copy in ("as_plain", "as_single"):
            shutil.copytree(f"{tmp}/crash/checkpoints", f"{tmp}/{copy}/checkpoints")
    torch.distributed.barrier()
    trainer = Trainer(_cfg(data_root, f"{tmp}/crash", True), state)
    history = trainer.run()
    out["resumed"] = {"losses": _losses(history), "from": history[0]["global_step"],
                      "full": full_state_dict(trainer.model, state)}
    # ZeRO-1's flat moment ranges were saved as boxes of the full tensors: they load unsharded too
    cfg = _cfg(data_root, f"{tmp}/as_plain", False)
    history = Trainer(cfg, ParallelState.build(cfg, rank, world)).run()
    out["as_plain"] = {"losses": _losses(history), "from": history[0]["global_step"]}
    return out


def _same_steps(where, got, ref, rtol=1e-6):
    assert [g[:2] for g in got] == [r[:2] for r in ref], where
    for (s, i, loss, gn), (_, _, rloss, rgn) in zip(got, ref):
        assert abs(loss - rloss) <= rtol * abs(rloss), f"{where}: {s} step {i}: loss {loss} vs {rloss}"
        assert abs(gn - rgn) <= rtol * abs(rgn), f"{where}: {s} step {i}: grad norm {gn} vs {rgn}"


def test_zero1_trainer_dp2_matches_unsharded_and_resumes(data_root, tmp_path):
    per_rank = run_distributed(_worker, 2, str(data_root), str(tmp_path), timeout=300)
    for rank, res in enumerate(per_rank):
        plain, zero, resumed = res["plain"], res["zero1"], res["resumed"]
        assert zero["uses_zero"] and not plain["uses_zero"]
        assert len(zero["losses"]) == 11
        _same_steps(f"zero1 rank {rank}", zero["losses"], plain["losses"])
        for k, want in plain["full"].items():
            torch.testing.assert_close(zero["full"][k], want, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
        # two AdamW moments per element this replica owns: half of the unsharded 2 x trainable
        # (the last stage trains the routers; a range boundary may fall one element off the middle)
        n = zero["trainable_numel"]
        assert abs(zero["state_numel"] - n) <= 2, (rank, zero["state_numel"], n)
        # the resumed run continues from global step 8 exactly as the uninterrupted one
        assert resumed["from"] == CRASH_AT, resumed["from"]
        assert resumed["losses"] == zero["losses"][CRASH_AT - 1:], rank
        for k, want in zero["full"].items():
            assert torch.equal(resumed["full"][k], want), k
        assert res["as_plain"]["from"] == CRASH_AT
        _same_steps(f"zero1 -> plain dp2 rank {rank}", res["as_plain"]["losses"], zero["losses"][CRASH_AT - 1:])
    assert sum(res["zero1"]["state_numel"] for res in per_rank) == 2 * per_rank[0]["zero1"]["trainable_numel"]
    # and into one process (micro-batch 4: the DP2 job's two micro-batches of 2 together, so that the
    # per-micro-batch aux losses see the same samples)
    single = Trainer(_cfg(data_root, tmp_path / "as_single", False, "--train.micro_batch_size=4")).run()
    assert single[0]["global_step"] == CRASH_AT
    _same_steps("zero1 dp2 -> 1 process", _losses(single), per_rank[0]["zero1"]["losses"][CRASH_AT - 1:], 1e-5)


def test_parallel_config_fields(tmp_path):
    cfg = load_config(None, TINY + [STAGES, "--parallel.zero1=true", "--parallel.bucket_mb=0.5"])
    assert cfg.parallel.zero1 is True and cfg.parallel.bucket_mb == 0.5
    assert load_config(None, TINY + [STAGES]).parallel.bucket_mb == 25.0
    with pytest.raises(ConfigError, match="parallel.bucket_mb"):
        load_config(None, TINY + [STAGES, "--parallel.bucket_mb=0"])


def test_zero1_trainer_dp4_ep2_matches_unsharded(data_root, tmp_path):
    # world 4, ep 2: dense parameters sharded over DP (4), experts over expert-DP (2); the last stage
    # also trains the experts, so both kinds of range are stepped and counted
    extra = ["--parallel.ep=2", "--train.micro_batch_size=1", "--stages.router.trainable=['llm.layers.{moe}.mlp.*']"]
    per_rank = run_distributed(_worker, 4, str(data_root), str(tmp_path), extra, False, timeout=300)
    for rank, res in enumerate(per_rank):
        plain, zero = res["plain"], res["zero1"]
        assert zero["uses_zero"] and len(zero["losses"]) == 11
        _same_steps(f"dp4xep2 zero1 rank {rank}", zero["losses"], plain["losses"])
        for k, want in plain["full"].items():
            torch.testing.assert_close(zero["full"][k], want, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
        experts, dense = zero["expert_numel"], zero["trainable_numel"] - zero["expert_numel"]
        assert experts > 0
        expect = 2 * (dense / 4 + experts / 2)  # two moments per owned element
        assert abs(zero["state_numel"] - expect) <= 2 * 2, (rank, zero["state_numel"], expect)


def test_mid_stage_resume_refuses_a_different_zero1_setting():
    from megatron_evomoe.parallel.training_hooks import ParallelTraining

    from . import common as C
    cfg = C.tiny_cfg(layers=2)
    state = ParallelState.single(cfg)
    par = ParallelTraining(C.build_model(cfg), state, cfg)  # one process: zero1 is off (nothing to shard over)
    assert not par.zero1
    saved = {"parallel": {"layout": "tp1-pp1-ep1-dp1", "zero1": True}, "model": {}, "optimizer": {}}
    with pytest.raises(CheckpointError, match="parallel.zero1"):
        par.load_state(saved, opt=None, load_optimizer=True)

"""The real trainer under TP/SP/EP/DP/PP reproduces the one-process trainer, through all four stages
of the tiny recipe (projector, dense warm-up, expert evolution, split + DTR training), including
the evolved experts at the split, the stage-end POPE evaluation, and a crash + resume from the distributed checkpoint, also into other layouts."""
from __future__ import annotations

import time

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import load_config
from megatron_evomoe.convert.export import evomoe_to_hf
from megatron_evomoe.parallel import ParallelState, full_state_dict
from megatron_evomoe.training.restore import load_trained_model
from megatron_evomoe.training.trainer import Trainer
from tests.parallel.common import run_until_crash
from tests.training.tiny_config import STAGES, TINY

from .dist_utils import run_distributed


def _cfg(data_root, save_dir, *extra):
    return load_config(None, TINY + [STAGES, f"--data.root={data_root}", f"--train.save_dir={save_dir}",
                                     "--data.build_if_missing=false", *extra])


def _summary(history):
    losses = [(h["stage"], h["stage_step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h]
    evals = [h["eval"] for h in history if "eval" in h]
    return losses, evals


def _single(rank, world, data_root, save_dir, extra):
    trainer = Trainer(_cfg(data_root, save_dir, *extra))
    losses, evals = _summary(trainer.run())
    return losses, evals, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _parallel(rank, world, data_root, tmp, runs):
    out = {}
    for run in runs:
        name, extra, crash_at = run[:3]
        resume = run[3] if len(run) > 3 else True
        cfg = _cfg(data_root, f"{tmp}/{name}", *extra)
        state = ParallelState.build(cfg, rank, world)
        t0 = time.perf_counter()
        if crash_at:
            run_until_crash(cfg, state, crash_at)
        if not resume:
            continue
        trainer = Trainer(_cfg(data_root, f"{tmp}/{name}", *extra), state)
        history = trainer.run()
        out[name] = {"summary": _summary(history), "resumed_from": trainer.history[0]["global_step"]
                     if trainer.history else None,
                     "full": full_state_dict(trainer.model, state) if state.pp_size == 1 else None,
                     "wall_s": time.perf_counter() - t0}
    return out


def _compare(name, got, ref, skip_before: int = 0):
    (losses, evals), (ref_losses, ref_evals) = got, ref
    ref_tail = ref_losses[skip_before:]
    assert len(losses) == len(ref_tail), name
    for (s, i, loss, gn), (rs, ri, rloss, rgn) in zip(losses, ref_tail):
        assert (s, i) == (rs, ri), name
        assert abs(loss - rloss) <= 1e-5 * abs(rloss), f"{name}: {s} step {i}: loss {loss} vs {rloss}"
        assert abs(gn - rgn) <= 1e-4 * abs(rgn) + 1e-7, f"{name}: {s} step {i}: grad norm {gn} vs {rgn}"
    return evals, ref_evals


@pytest.fixture(scope="module")
def references(data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    refs = {}
    for key, extra in (("plain", ()), ("accum2", ("--train.global_batch_size=8",))):
        refs[key] = run_distributed(_single, 1, str(data_root), str(tmp / key), list(extra))[0]
    return refs


def test_trainer_world2_tp_sp_resume_and_pp(references, data_root, tmp_path):
    runs = [("tp2_sp", ["--parallel.tp=2", "--parallel.sequence_parallel=true"], 7),  # crash in evolution
            ("pp2", ["--parallel.pp=2", "--train.global_batch_size=8"], 0),
            # crash after the mid-stage checkpoint of evolution step 2 (global step 7), not resumed here
            ("tp2_crash", ["--parallel.tp=2"], 8, False)]
    per_rank = run_distributed(_parallel, 2, str(data_root), str(tmp_path), runs, timeout=400)
    ref_losses, ref_evals, ref_sd = references["plain"]
    for rank, res in enumerate(per_rank):
        r = res["tp2_sp"]
        # crashed before global step 7; resumed from the latest per-rank checkpoint (end of the warm-up
        # stage, global step 5), so the resumed run records steps 6..11
        assert r["resumed_from"] == 6, r["resumed_from"]
        evals, _ = _compare(f"tp2_sp rank {rank}", r["summary"], (ref_losses, ref_evals), skip_before=5)
        assert evals == ref_evals  # same POPE answers from the TP model (greedy decoding, gathered logits)
        for k, want in ref_sd.items():  # includes the experts made from FFN1 and its evolved copies
            if not k.endswith("qkv.bias"):
                torch.testing.assert_close(r["full"][k], want, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")
        p = res["pp2"]
        evals, ref_evals_accum2 = _compare(f"pp2 rank {rank}", p["summary"], references["accum2"][:2])
        # the stage-end POPE decoded through the pipeline (parallel/pipeline_generation.py): same scores
        assert evals == ref_evals_accum2 and evals[0]["num_questions"] == 8
    # one distributed checkpoint for the job (both ranks' boxes, one metadata), no per-rank folders
    latest = ckpt.find_latest(tmp_path / "tp2_sp")
    assert sorted(p.name for p in latest.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "evaluated",
                                                        "meta.json"]  # (evaluated: its POPE evaluation is done)
    assert not (tmp_path / "tp2_sp" / "ranks").exists()
    _check_reshard(references, data_root, tmp_path)


def _check_reshard(references, data_root, tmp_path):
    """TP2 distributed checkpoint (mid-stage: model shards, sharded AdamW moments, evolved-expert
    buffers) -> resumed directly by one process and by DP2: both continue the one-process trajectory."""
    import shutil

    path = ckpt.find_latest(tmp_path / "tp2_crash")
    assert path.name == "02-evolution-step000002", path
    # read by one process for evaluation, reports and export (its values: the resumes below continue
    # the one-process trajectory from them)
    model, cfg, _, state = load_trained_model(path)
    assert state["global_step"] == 7 and cfg.parallel.tp == 2
    exported = evomoe_to_hf(path, tmp_path / "hf", fmt="evomoe", echo=lambda _: None)
    assert (exported / "config.json").is_file()
    for name in ("as_single", "as_dp2"):
        shutil.copytree(tmp_path / "tp2_crash" / "checkpoints", tmp_path / name / "checkpoints")
    ref_losses, ref_evals, _ = references["plain"]
    single = run_distributed(_single, 1, str(data_root), str(tmp_path / "as_single"), [])[0]
    _compare("tp2 -> 1 process", single[:2], (ref_losses, ref_evals), skip_before=7)
    assert single[1] == ref_evals
    dp2 = run_distributed(_parallel, 2, str(data_root), str(tmp_path),
                          [("as_dp2", ["--train.micro_batch_size=2"], 0)])
    for rank, res in enumerate(dp2):
        assert res["as_dp2"]["resumed_from"] == 8
        _compare(f"tp2 -> dp2 rank {rank}", res["as_dp2"]["summary"], (ref_losses, ref_evals), skip_before=7)


def test_trainer_world4_tp2_ep2_dp2(references, data_root, tmp_path):
    # dp = 2: each rank's micro-batch is half of the one-process micro-batch of 4
    runs = [("tp2_ep2", ["--parallel.tp=2", "--parallel.ep=2", "--train.micro_batch_size=2"], 0)]
    per_rank = run_distributed(_parallel, 4, str(data_root), str(tmp_path), runs, timeout=400)
    ref_losses, ref_evals, ref_sd = references["plain"]
    for rank, res in enumerate(per_rank):
        r = res["tp2_ep2"]
        evals, _ = _compare(f"tp2_ep2 rank {rank}", r["summary"], (ref_losses, ref_evals))
        assert evals == ref_evals
        for k, want in ref_sd.items():
            if not k.endswith("qkv.bias"):
                torch.testing.assert_close(r["full"][k], want, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")

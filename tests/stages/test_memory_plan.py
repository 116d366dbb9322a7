"""stages/memory_plan.py against measured training steps (parallel/memory_tracking.py::LiveTensorBytes).

Measured: two steps of two micro-batches each (the trainer's step: zero_grad, forward + backward per
micro-batch, clipping, AdamW), one process, of the tiny recipe (examples/configs/tiny_cpu.yaml, real
tensors) in its dense stage I and its sparse stage III (DTR, only the routers train), with recompute none
and full; and of a ~133M-parameter dense model with images under FakeTensorMode (shapes only), bf16 autocast with
selective recompute (benchmarks/RESULTS.md has fp32 and full too). The plan's total must be within 15% of the measured peak (it is within
5% for all of them, benchmarks/RESULTS.md); its parameter, gradient and optimizer terms are exact. The layout terms (TP, PP's
micro-batches in flight, ZeRO-1) are checked against the counts they are made of, TP2 with sequence
parallelism against a measured rank (2 processes), and the dry run's table, verdict and bad --gpu-memory-gb.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pretrain_evomoe
from megatron_evomoe.config import load_config
from megatron_evomoe.parallel.shard_counts import rank_shard_counts
from megatron_evomoe.stages.memory_plan import FP32, GIB, plan_memory, verdict
from megatron_evomoe.stages.trainable import set_trainable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory_plan import build_stage_model, measure_parallel_step_peak, measure_step_peak  # noqa: E402

from ..parallel.dist_utils import run_distributed  # noqa: E402

TINY = ["--model.vocab_size=512", "--train.micro_batch_size=8", "--train.global_batch_size=16"]
# ~133M parameters: 12 layers of 768 (GQA 12/4 heads, SwiGLU 2048), vocab 32000, a 4-layer ViT of 196 patches
MEDIUM = ["--model.vocab_size=32000", "--model.hidden_size=768", "--model.num_layers=12", "--model.num_heads=12",
          "--model.num_kv_heads=4", "--model.ffn_hidden_size=2048", "--model.max_seq_len=512", "--data.seq_len=512",
          "--vision.image_size=224", "--vision.patch_size=16", "--vision.hidden_size=384", "--vision.num_layers=4",
          "--vision.num_heads=6", "--vision.ffn_hidden_size=1536", "--vision.cls_token=true",
          "--vision.activation=quick_gelu", "--train.micro_batch_size=4", "--train.global_batch_size=8",
          "--stages=[{name: warmup, moe_mode: dense, trainable: ['*']}]"]
TOLERANCE = 0.15


def _tiny(*extra):
    return load_config(str(ROOT / "examples/configs/tiny_cpu.yaml"), TINY + list(extra))


@pytest.mark.parametrize("stage_idx,recompute", [(1, "none"), (1, "full"), (3, "none"), (3, "full")])
def test_tiny_recipe_plan_is_the_measured_peak(stage_idx, recompute):
    cfg = _tiny(f"--train.recompute={recompute}")
    row = plan_memory(cfg, 1, rank_shard_counts, "cpu")[stage_idx]
    assert (row.moe_mode, row.num_micro) == (("dense", "sparse")[stage_idx == 3], 2)
    peak = measure_step_peak(cfg, stage_idx)
    assert abs(row.total / peak - 1) < TOLERANCE, (row.terms, row.total, peak)
    # the parameter terms are exact: the materialised model, its trainable tensors, AdamW's two moments
    model = build_stage_model(cfg, stage_idx, fake=False)
    trainable = set(set_trainable(model, cfg, cfg.stages[stage_idx], stage_idx))
    num_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    num_tensors = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert row.terms["params"] + row.terms["evolved"] == FP32 * num_tensors
    assert row.terms["grads"] == FP32 * num_trainable and row.terms["optimizer"] == 2 * FP32 * num_trainable
    if stage_idx == 3:  # stage III trains the routers only
        assert trainable and all(".mlp.router." in n for n in trainable) and num_trainable < num_tensors // 10


def test_full_recompute_keeps_far_less():
    none, full = (plan_memory(_tiny(f"--train.recompute={m}"), 1, rank_shard_counts, "cpu")[1] for m in
                  ("none", "full"))
    assert full.terms["activations"] < none.terms["activations"] / 2 and none.terms["rerun"] == 0
    # the rerun of one layer in backward costs less than what full recompute saves
    assert full.terms["rerun"] < none.terms["activations"] - full.terms["activations"]
    assert {t: v for t, v in full.terms.items() if t not in ("activations", "rerun")} == \
        {t: v for t, v in none.terms.items() if t not in ("activations", "rerun")}


def test_medium_model_under_fake_tensors():
    cfg = load_config(str(ROOT / "examples/configs/tiny_cpu.yaml"), MEDIUM + ["--train.bf16=true",
                                                                            "--train.recompute=selective"])
    row = plan_memory(cfg, 1, rank_shard_counts, "cpu")[0]
    assert 130e6 < row.terms["params"] / FP32 < 136e6
    peak = measure_step_peak(cfg, 0, fake=True)
    assert abs(row.total / peak - 1) < TOLERANCE, (row.terms, row.total, peak)


def _rank_peak(rank, world, cfg, stage_idx):
    from megatron_evomoe.parallel import ParallelState
    return measure_parallel_step_peak(cfg, stage_idx, ParallelState.build(cfg, rank, world))


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_tensor_and_sequence_parallel_rank_is_the_measured_peak(recompute):
    """TP2 with sequence parallelism (the 7B recipe's layout), two gloo processes, stage I: each rank's
    plan (half the heads, FFN columns and vocabulary; the residual stream a half-sequence shard) against
    its measured peak; also with full recompute (its rerun sees the forward's sequence parallelism)."""
    cfg = _tiny("--parallel.tp=2", "--parallel.sequence_parallel=true", f"--train.recompute={recompute}")
    row = plan_memory(cfg, 2, rank_shard_counts, "cpu")[1]
    one = plan_memory(_tiny(f"--train.recompute={recompute}"), 1, rank_shard_counts, "cpu")[1]
    if recompute == "none":  # (under full recompute what stays is mostly outside the layers)
        assert row.terms["activations"] < 0.6 * one.terms["activations"]
    assert row.terms["logits"] < 0.6 * one.terms["logits"]
    for peak in run_distributed(_rank_peak, 2, cfg, 1):
        assert abs(row.total / peak - 1) < TOLERANCE, (row.terms, row.total, peak)


def test_layout_terms_follow_the_shards():
    """tp2 x pp2 x dp2 (ep 2) of the tiny recipe with ZeRO-1: each pipeline stage holds its half of the
    layers; the first keeps 2 micro-batches in flight (1F1B), the last 1; ZeRO-1 keeps 3 fp32 words
    (2 moments + the master) per element of a 1/dp range of the dense and 1/edp range of the expert
    trainable tensors."""
    cfg = _tiny("--parallel.tp=2", "--parallel.pp=2", "--parallel.ep=2", "--parallel.zero1=true",
                "--train.micro_batch_size=4")
    counts = [rank_shard_counts(cfg, 8, 1, pp) for pp in (0, 1)]
    assert [c.layers for c in counts] == [((0, "dense"), (1, "dense")), ((2, "dense"), (3, "dense"))]
    assert (counts[0].has_first, counts[1].has_last) == (True, True)
    one = rank_shard_counts(_tiny(), 1, 1, 0)
    assert counts[0].num_params + counts[1].num_params < one.num_params  # (TP splits what both hold)
    row = plan_memory(cfg, 8, rank_shard_counts)[1]
    c = counts[row.pp_rank]
    assert row.num_micro == 2 and row.num_in_flight == 2 - row.pp_rank
    assert row.terms["optimizer"] == 3 * FP32 * (-(-c.num_trainable_dense // 2) + -(-c.num_trainable_expert // 1))


def test_dry_run_prints_the_plan_and_a_verdict(capsys):
    args = ["--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), "--dry-run", "--model.vocab_size=512"]
    assert pretrain_evomoe.main(args + ["--world-size=1"]) == 0
    out = capsys.readouterr().out
    assert "LLM active/token" in out  # the parameter counts are still there
    assert "memory per GPU" in out and "fits: the largest stage" in out
    cfg = load_config(args[1], args[3:])
    rows = plan_memory(cfg, 1, rank_shard_counts)
    assert f"{max(r.total for r in rows) / GIB:.2f} GiB" in out
    assert pretrain_evomoe.main(args + ["--gpu-memory-gb=0.01"]) == 0
    out = capsys.readouterr().out
    assert "warning: does not fit: stage warmup" in out and "the biggest term is activations" in out
    assert "train.recompute=selective or full" in out
    fits, line = verdict(rows, 0.01)
    assert not fits and line in out


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_gpu_memory_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_evomoe.main(["--config", "x.yaml", "--dry-run", f"--gpu-memory-gb={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu-memory-gb: must be a finite number > 0" in err

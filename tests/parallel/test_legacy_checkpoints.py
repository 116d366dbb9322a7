"""Runs saved before distributed checkpoints are not stranded: their per-rank folders
(<save_dir>/ranks/<layout>/<rank>/checkpoints/<name>/state.pt, each rank's shard with its ShardSpecs,
coordinates and optimizer parameter names) are refused by a resume with the converter's command,
and `python -m megatron_evomoe.parallel.reshard RUN_DIR` turns them into the one-process checkpoint,
which every layout resumes from (tests/parallel/test_trainer_parallel.py: a state.pt into TP/DP)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.parallel import ParallelState, full_state_dict, parallelize
from megatron_evomoe.parallel.reshard import main as reshard_main, refuse_per_rank_checkpoints
from megatron_evomoe.parallel.state import named_shard_specs
from megatron_evomoe.training.optim import build_optimizer

from . import common as C
from .dist_utils import run_distributed

NAME = "00-s-step000002"


def _legacy_meta(model, state, param_names) -> dict:
    """What the earlier version wrote next to a rank's tensors (its `checkpoint_meta`)."""
    specs = {k: [s.tp_dim, s.full_size, s.ep_dim, s.expert] for k, s in named_shard_specs(model).items()}
    return {"layout": f"tp{state.tp_size}-pp{state.pp_size}-ep{state.ep_size}-dp{state.dp_size}",
            "world_size": state.world_size, "rank": state.rank, "coords": state.layout.coords(state.rank),
            "specs": specs, "param_names": list(param_names), "zero1": False}


def _worker(rank, world, run):
    cfg = C.tiny_cfg(tp=2)
    state = ParallelState.build(cfg, rank, world)
    model = parallelize(C.build_model(cfg), state, cfg)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(params, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"))
    for batch in C.make_batches(2, 4):  # (the optimizer's moments are what matters here, not the steps)
        out = model(batch["input_ids"], batch["images"], batch["labels"])
        (out.lm_loss_sum / 40 + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    folder = Path(run) / "ranks" / "tp2-pp1-ep1-dp1" / f"{rank:05d}"
    state_dict = {"model": model.state_dict(), "optimizer": opt.state_dict(), "stage_idx": 0, "step": 2,
                  "global_step": 2, "config": cfg.to_dict(),
                  "parallel": _legacy_meta(model, state, [n for n, _ in params])}
    ckpt.save_checkpoint(folder, NAME, state_dict, {"global_step": 2, "stage_idx": 0, "step": 2}, keep=2)
    head = "llm.layers.0.attn.wq.weight"  # column-parallel: rank r holds rows [r*n, (r+1)*n)
    return {"full": full_state_dict(model, state), "moment": opt.state[dict(params)[head]]["exp_avg"].clone()}


def test_per_rank_checkpoints_are_refused_then_converted(tmp_path, capsys):
    run = tmp_path / "run"
    per_rank = run_distributed(_worker, 2, str(run))
    with pytest.raises(ckpt.CheckpointError, match=r"earlier format .*python -m megatron_evomoe.parallel.reshard"):
        refuse_per_rank_checkpoints(run)
    assert reshard_main([str(run)]) == 0
    assert "consolidated checkpoint:" in capsys.readouterr().out
    converted = ckpt.load_checkpoint(ckpt.find_latest(run))
    assert converted["step"] == 2 and converted["consolidated_from"] == "tp2-pp1-ep1-dp1"
    for k, want in per_rank[0]["full"].items():
        assert torch.equal(converted["model"][k], want), k
    # the AdamW moments of a TP-sharded weight: both ranks' rows, in order
    names = converted["param_names"]
    exp_avg = converted["optimizer"]["state"][names.index("llm.layers.0.attn.wq.weight")]["exp_avg"]
    assert torch.equal(exp_avg, torch.cat([r["moment"] for r in per_rank]))

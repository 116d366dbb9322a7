"""Aux-loss-free balancing across layouts: under TP2 x EP2 (x DP2) every rank ends with the expert
biases of the one-process run, bit for bit (the loads are integer counts summed over the DP group),
and the same losses; the biases really moved."""
from __future__ import annotations

import torch

from megatron_evomoe.parallel import full_state_dict

from . import common as C
from .dist_utils import run_distributed

EXTRA = ["--moe.load_balancing=aux_free", "--moe.bias_update_rate=0.01"]
NUM_STEPS, GLOBAL_BATCH, NUM_MICRO = 3, 8, 2


def _worker(rank, world):
    cfg = C.tiny_cfg(tp=2, ep=2, extra=EXTRA)
    state, model, res = C.parallel_run(cfg, C.make_batches(NUM_STEPS, GLOBAL_BATCH), NUM_MICRO, rank, world)
    res["biases"] = {k: v for k, v in full_state_dict(model, state).items() if k.endswith("expert_bias")}
    return res


def test_tp2_ep2_biases_equal_one_process():
    ref = C.reference(C.tiny_cfg(extra=EXTRA), C.make_batches(NUM_STEPS, GLOBAL_BATCH), NUM_MICRO)
    want = {k: v for k, v in ref["state_dict"].items() if k.endswith("expert_bias")}
    assert sorted(want) == ["llm.layers.1.mlp.router.expert_bias", "llm.layers.3.mlp.router.expert_bias"]
    assert all(v.abs().sum() > 0 for v in want.values())  # moved: 3 steps of +-0.01 per expert
    for rank, res in enumerate(run_distributed(_worker, 4, timeout=300)):
        assert sorted(res["biases"]) == sorted(want)
        for k, v in want.items():
            assert torch.equal(res["biases"][k], v), (rank, k, res["biases"][k], v)
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)

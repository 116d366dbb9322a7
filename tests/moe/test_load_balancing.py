"""Aux-loss-free load balancing (moe/load_balancing.py): the biased choice and the bias update against
values worked out by hand; a MoE layer accumulates its loads over a step's micro-batches and moves its
bias; `moe.load_balancing` picks the aux loss, the bias, both or neither, for the linear router and the DTR."""
from __future__ import annotations

import torch

from megatron_evomoe.config import load_config
from megatron_evomoe.moe.load_balancing import biased_topk, update_bias
from megatron_evomoe.moe.metrics import max_violation
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.parallel.expert_bias import update_expert_biases
from tests.parallel import common as C


def test_biased_choice_and_unbiased_gates():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    bias = torch.tensor([-0.4, 0.0, 0.1, 0.0])
    # row 0: p + b = [0.1, 0.3, 0.25, 0.05], so expert 1 (then 2) rather than expert 0, the most probable
    idx, gates = biased_topk(probs[:1], bias, 1, renormalize=True)
    assert idx.tolist() == [[1]] and gates.tolist() == [[0.30000001192092896]]  # p of expert 1, not p + b
    idx, gates = biased_topk(probs[:1], bias, 2, renormalize=True)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(gates, torch.tensor([[0.3 / 0.45, 0.15 / 0.45]]))
    gates[0, 0].backward()  # the gates stay differentiable through the probabilities
    torch.testing.assert_close(probs.grad[0], torch.tensor([0.0, 0.15, -0.3, 0.0]) / 0.45 ** 2)


def test_bias_update_by_hand():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([6.0, 2.0, 0.0, 0.0]), 0.01)  # mean 2: [-1, 0, +1, +1] x 0.01
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.0, 0.01, 0.01]), rtol=0, atol=0)
    update_bias(bias, torch.tensor([1.0, 3.0, 2.0, 2.0]), 0.01)  # mean 2: [+1, -1, 0, 0]
    torch.testing.assert_close(bias, torch.tensor([0.0, -0.01, 0.01, 0.01]))
    assert max_violation(torch.tensor([6.0, 2.0, 0.0, 0.0])) == 2.0 and max_violation(torch.ones(4)) == 0.0


def _cfg(mode: str, router: str):
    return C.tiny_cfg(router=router, top_k=1, extra=[f"--moe.load_balancing={mode}", "--moe.bias_update_rate=0.05"])


def test_modes_select_the_loss_and_the_bias():
    for router in ("dtr", "linear"):
        for mode, bias, aux in (("aux", False, 0.1), ("aux_free", True, 0.0), ("both", True, 0.1), ("none", False, 0.0)):
            layers = [m for m in C.build_model(_cfg(mode, router)).modules() if isinstance(m, MoELayer)]
            assert len(layers) == 2 and all(m.aux_loss_coeff == aux for m in layers), (router, mode)
            assert all((m.router.expert_bias is not None) == bias for m in layers), (router, mode)
            if bias:  # a checkpointed buffer
                assert "llm.layers.1.mlp.router.expert_bias" in C.build_model(_cfg(mode, router)).state_dict()


def test_layer_accumulates_its_step_loads_and_moves_its_bias():
    model = C.build_model(_cfg("aux_free", "dtr")).train()
    batches = C.split_step(C.make_batches(1, 8)[0], 2, 0, 1)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    per_micro = []
    for mb in batches:
        model(mb["input_ids"], mb["images"], mb["labels"])
        per_micro.append([m.last_tokens_per_expert.clone() for m in layers])
    step_load = [sum(loads[i] for loads in per_micro) for i in range(len(layers))]
    assert [m.step_load.tolist() for m in layers] == [s.tolist() for s in step_load]
    update_expert_biases(model, None)
    for m, load in zip(layers, step_load):
        want = 0.05 * torch.sign(load.double().mean() - load.double()).float()
        assert torch.equal(m.router.expert_bias, want) and m.step_load is None
        assert want.abs().sum() > 0  # (the tiny batch is unbalanced: the bias really moved)
    # the next forward chooses with the bias: an expert the bias favours enough takes every token
    layers[0].router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    model(batches[0]["input_ids"], batches[0]["images"], batches[0]["labels"])
    assert layers[0].last_tokens_per_expert.tolist()[2] == layers[0].last_tokens_per_expert.sum().item()

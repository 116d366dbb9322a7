"""Expert evolution rules, the scheduler, and the II -> III split."""
import pytest
import torch

from megatron_evomoe.config import load_config
from megatron_evomoe.model.llm import FFN
from megatron_evomoe.moe.evolution import EvolutionScheduler, EvolvingFFN, evolve_
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.upcycling import drop_experts, make_experts, upcycle_to_moe

# FFN1 trajectory over 3 steps and two evolved experts with beta = 0.5 and 0.0.
THETA = [1.0, 2.0, 4.0, 3.0]
BETAS = torch.tensor([0.5, 0.0])
EXPECTED = {
    # theta_n += (1 - beta) * dtheta: deltas 1, 2, -1
    "scaled_update": [[1.5, 2.5, 2.0], [2.0, 4.0, 3.0]],
    # theta_n = beta * theta_n + (1 - beta) * theta_1
    "ema": [[1.5, 2.75, 2.875], [2.0, 4.0, 3.0]],
    # theta_n = beta * theta_1 + (1 - beta) * dtheta (the printed Eq. 1)
    "literal": [[1.5, 3.0, 1.0], [1.0, 2.0, -1.0]],
}


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_rule_three_steps_hand_computed(rule):
    evolved = torch.full((2, 1), THETA[0], dtype=torch.float64)
    got = []
    for old, new in zip(THETA[:-1], THETA[1:]):
        evolve_(evolved, torch.tensor([new], dtype=torch.float64), torch.tensor([old], dtype=torch.float64),
                BETAS, rule)
        got.append(evolved[:, 0].tolist())
    assert [list(x) for x in zip(*got)] == EXPECTED[rule]


def _train_steps(ffn, sched, steps, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(16, ffn.w_gate.in_features)
        loss = ffn(x)[0].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        sched.before_step()
        opt.step()
        sched.after_step()


def test_beta_zero_is_a_copy_of_ffn1():
    torch.manual_seed(0)
    ffn = EvolvingFFN.from_ffn(FFN(8, 16), num_evolved=1)
    sched = EvolutionScheduler([ffn], [[0.0, 0.0]], "scaled_update", seed=0)
    _train_steps(ffn, sched, 5)
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(getattr(ffn, f"evolved_{name}")[0], getattr(ffn, name).weight,
                                   atol=1e-6, rtol=0)


def test_evolved_experts_differ_pairwise_and_have_no_optimizer_state():
    torch.manual_seed(0)
    ffn = EvolvingFFN.from_ffn(FFN(8, 16), num_evolved=3)
    assert {n for n, _ in ffn.named_parameters()} == {"w_gate.weight", "w_up.weight", "w_down.weight"}
    sched = EvolutionScheduler([ffn], [[0.9, 0.99], [0.8, 0.89], [0.7, 0.79]], "scaled_update", seed=0)
    _train_steps(ffn, sched, 10)
    experts = [torch.cat([w.flatten() for w in e.values()]) for e in ffn.expert_weights()]
    for i in range(4):
        for j in range(i + 1, 4):
            assert (experts[i] - experts[j]).abs().max() > 1e-5, (i, j)
    # a larger beta keeps less of each update: distance from FFN1 grows with beta
    d = sched.distances()[0]
    assert d[0] > d[1] > d[2] > 0


def test_betas_are_drawn_in_range_and_resumable():
    s = EvolutionScheduler([], [[0.9, 0.99], [0.7, 0.79]], "ema", seed=3)
    s.draw_betas()
    state = s.state_dict()
    a = torch.stack([s.draw_betas() for _ in range(50)])
    assert ((a[:, 0] >= 0.9) & (a[:, 0] <= 0.99)).all() and ((a[:, 1] >= 0.7) & (a[:, 1] <= 0.79)).all()
    s2 = EvolutionScheduler([], [[0.9, 0.99], [0.7, 0.79]], "ema", seed=999)
    s2.load_state_dict(state)
    torch.testing.assert_close(torch.stack([s2.draw_betas() for _ in range(50)]), a)


def _cfg(init="evolution", router="linear", E=4):
    return load_config(None, ["--stages=[{name: s}]", f"--moe.init={init}", f"--router.type={router}",
                              f"--moe.num_experts={E}", "--moe.expert_backend=torch", "--router.backend=torch"])


def test_split_makes_ffn1_and_evolved_the_experts():
    torch.manual_seed(0)
    ffn = EvolvingFFN.from_ffn(FFN(8, 16), num_evolved=3)
    for name in ("w_gate", "w_up", "w_down"):  # make the evolved copies distinguishable
        getattr(ffn, f"evolved_{name}").add_(torch.arange(1, 4, dtype=torch.float32).view(3, 1, 1))
    layer = upcycle_to_moe(ffn, _cfg(), torch.Generator().manual_seed(0))
    assert isinstance(layer, MoELayer) and layer.experts.num_experts == 4
    torch.testing.assert_close(layer.experts.w_gate[0], ffn.w_gate.weight.t())
    for n in range(3):
        torch.testing.assert_close(layer.experts.w_up[n + 1], ffn.evolved_w_up[n].t())
        torch.testing.assert_close(layer.experts.w_down[n + 1], ffn.evolved_w_down[n].t())


def test_evolution_init_without_evolve_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="add an 'evolve' stage"):
        make_experts(FFN(4, 8), _cfg().moe, 0.02, torch.Generator())


def test_drop_upcycling_reinitialises_the_requested_fraction():
    torch.manual_seed(0)
    ffn = FFN(8, 20)
    experts = drop_experts(ffn, 3, ratio=0.25, generator=torch.Generator().manual_seed(0))
    for e in experts:
        changed_rows = (e["w_gate"] != ffn.w_gate.weight).any(1)
        changed_cols = (e["w_down"] != ffn.w_down.weight).any(0)
        assert int(changed_rows.sum()) == 5 and torch.equal(changed_rows, changed_cols)
        assert torch.equal((e["w_up"] != ffn.w_up.weight).any(1), changed_rows)
    assert not torch.equal(experts[0]["w_gate"], experts[1]["w_gate"])


def test_copy_and_noise_upcycling():
    torch.manual_seed(0)
    ffn = FFN(8, 16)
    copy = upcycle_to_moe(ffn, _cfg("copy"), torch.Generator())
    assert torch.equal(copy.experts.w_gate[0], copy.experts.w_gate[3])
    noisy = upcycle_to_moe(ffn, _cfg("noise"), torch.Generator().manual_seed(0))
    diff = (noisy.experts.w_gate[0] - ffn.w_gate.weight.t()).abs().max()
    assert 0 < diff < 0.1

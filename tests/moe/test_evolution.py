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


# ---- Phi-2's FFN (fc1 -> gelu_new -> fc2, both with biases): evolution and every upcycling baseline


def _phi_ffn(C=8, Fh=20, seed=0):
    torch.manual_seed(seed)
    ffn = FFN(C, Fh, activation="gelu_tanh", bias=True)
    with torch.no_grad():  # non-zero biases, as a converted Phi-2 has
        ffn.w_up.bias.normal_(0.0, 0.5)
        ffn.w_down.bias.normal_(0.0, 0.5)
    return ffn


GELU_KEYS = {"w_up": ("w_up", "weight"), "w_down": ("w_down", "weight"), "b_up": ("w_up", "bias"),
             "b_down": ("w_down", "bias")}


def _dense(ffn, key):
    return getattr(getattr(ffn, GELU_KEYS[key][0]), GELU_KEYS[key][1]).detach()


# FFN1 = 1 in every tensor, one step moves it to 3 (dtheta = 2); evolved copies with beta 0.5 and 0:
GELU_STEP = {
    "scaled_update": [2.0, 3.0],  # 1 + (1 - b) * 2
    "ema": [2.0, 3.0],  # b * 1 + (1 - b) * 3
    "literal": [2.5, 2.0],  # b * 3 + (1 - b) * 2
}


@pytest.mark.parametrize("rule", sorted(GELU_STEP))
def test_gelu_ffn_biases_evolve_like_weights(rule):
    ffn = FFN(4, 6, activation="gelu_tanh", bias=True)
    with torch.no_grad():
        for p in ffn.parameters():
            p.fill_(1.0)
    evo = EvolvingFFN.from_ffn(ffn, num_evolved=2)
    assert {n for n, _ in evo.named_buffers()} == {f"evolved_{k}" for k in GELU_KEYS}
    assert not hasattr(evo, "w_gate") and not hasattr(evo, "evolved_w_gate")  # no dead gate
    sched = EvolutionScheduler([evo], [[0.5, 0.5], [0.0, 0.0]], rule, seed=0)
    sched.before_step()
    with torch.no_grad():
        for p in evo.parameters():
            p.add_(2.0)
    sched.after_step()
    for key in GELU_KEYS:
        buf = getattr(evo, f"evolved_{key}")
        for n, value in enumerate(GELU_STEP[rule]):
            assert torch.equal(buf[n], torch.full_like(buf[n], value)), (rule, key, n)


def test_gelu_split_gives_ffn1_and_evolved_copies_with_their_biases():
    evo = EvolvingFFN.from_ffn(_phi_ffn(), num_evolved=3)
    for i, key in enumerate(GELU_KEYS):  # distinguishable copies: copy n of tensor i moved by (n + 1) * (i + 1)
        buf = getattr(evo, f"evolved_{key}")
        buf.add_(torch.arange(1.0, 4.0).view(3, *[1] * (buf.dim() - 1)) * (i + 1))
    layer = upcycle_to_moe(evo, _cfg(), torch.Generator().manual_seed(0))
    ex = layer.experts
    assert ex.activation == "gelu_tanh" and ex.w_gate is None
    for key in GELU_KEYS:
        t = lambda v: v.t() if key.startswith("w_") else v  # noqa: E731 - [out, in] -> [in, out]
        torch.testing.assert_close(getattr(ex, key)[0], t(_dense(evo, key)), rtol=0, atol=0)
        for n in range(3):
            torch.testing.assert_close(getattr(ex, key)[n + 1], t(getattr(evo, f"evolved_{key}")[n]), rtol=0, atol=0)


def test_gelu_copy_upcycling_is_exact_and_the_layer_computes_the_ffn():
    ffn = _phi_ffn()
    cfg = _cfg("copy")
    cfg.moe.top_k = 2  # (renormalised: the two gates sum to 1)
    layer = upcycle_to_moe(ffn, cfg, torch.Generator())
    for key in GELU_KEYS:
        want = _dense(ffn, key).t() if key.startswith("w_") else _dense(ffn, key)
        for e in range(4):
            assert torch.equal(getattr(layer.experts, key)[e], want), (key, e)
    x = torch.randn(2, 5, 8)
    y, _ = layer(x, torch.zeros(2, 5, dtype=torch.long))  # top-2 renormalised copies: the dense FFN itself
    torch.testing.assert_close(y, ffn(x)[0], rtol=1e-5, atol=1e-6)


def test_gelu_noise_upcycling_std_is_relative_to_each_tensor():
    ffn = _phi_ffn(C=32, Fh=256)
    experts = make_experts(ffn, _cfg("noise").moe, 0.02, torch.Generator().manual_seed(0))
    noise_std = _cfg("noise").moe.noise_std
    for key, tol in (("w_up", 0.05), ("w_down", 0.05), ("b_up", 0.2), ("b_down", 0.4)):
        dense = _dense(ffn, key)
        rel = torch.stack([e[key] - dense for e in experts]) / (noise_std * dense.std())
        assert abs(float(rel.std()) - 1.0) < tol and abs(float(rel.mean())) < tol, (key, float(rel.std()))


def test_gelu_drop_upcycling_redraws_the_same_units_in_w_up_b_up_and_w_down():
    ffn = _phi_ffn(C=8, Fh=20)
    experts = drop_experts(ffn, 3, ratio=0.25, generator=torch.Generator().manual_seed(0))
    units = []
    for e in experts:
        assert set(e) == set(GELU_KEYS)
        changed = (e["w_up"] != ffn.w_up.weight).any(1)  # [F]: nn.Linear rows = intermediate units
        assert int(changed.sum()) == 5
        assert torch.equal(e["b_up"] != ffn.w_up.bias, changed)
        assert torch.equal((e["w_down"] != ffn.w_down.weight).any(0), changed)  # w_down's columns
        assert torch.equal(e["b_down"], ffn.w_down.bias.detach())  # no unit of its own: kept
        units.append(changed)
    assert not torch.equal(units[0], units[1]) or not torch.equal(units[1], units[2])


def test_gelu_scratch_upcycling_draws_weights_and_zeroes_biases():
    ffn = _phi_ffn(C=32, Fh=256)
    experts = make_experts(ffn, _cfg("scratch").moe, 0.02, torch.Generator().manual_seed(0))
    for e in experts:
        assert abs(float(e["w_up"].std()) - 0.02) < 0.002 and abs(float(e["w_down"].std()) - 0.02) < 0.002
        assert not e["b_up"].any() and not e["b_down"].any()

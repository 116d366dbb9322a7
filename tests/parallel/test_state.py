"""Rank layout as plain arithmetic, and the validation of the parallel section (no processes)."""
import pytest

from megatron_evomoe.config import ConfigError
from megatron_evomoe.parallel.state import ParallelState, RankLayout, layout_table, validate_parallel

from .common import tiny_cfg


def test_docstring_example_layout():
    lay = RankLayout(8, tp=2, pp=2, ep=2)
    assert (lay.dp, lay.edp) == (2, 1)
    assert [lay.coords(r) for r in (0, 3, 6)] == [
        {"pp": 0, "dp": 0, "tp": 0, "ep": 0, "edp": 0},
        {"pp": 0, "dp": 1, "tp": 1, "ep": 1, "edp": 0},
        {"pp": 1, "dp": 1, "tp": 0, "ep": 1, "edp": 0}]
    assert lay.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.ep_groups() == lay.dp_groups()
    assert sorted(lay.expert_dp_groups()) == [[r] for r in range(8)]
    assert lay.stage_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    table = layout_table(lay)
    assert "|    6 |  1 |  1 |  0 |  1 |   0 |" in table


@pytest.mark.parametrize("world,tp,pp,ep", [(16, 2, 2, 2), (16, 1, 1, 4), (12, 3, 2, 1), (8, 1, 8, 1),
                                             (32, 4, 2, 2)])
def test_layout_is_a_bijection_and_groups_partition_the_world(world, tp, pp, ep):
    lay = RankLayout(world, tp, pp, ep)
    seen = set()
    for r in range(world):
        c = lay.coords(r)
        assert lay.rank_of(c["pp"], c["dp"], c["tp"]) == r
        assert c["dp"] == c["edp"] * ep + c["ep"]  # EP is the inner part of DP
        seen.add((c["pp"], c["dp"], c["tp"]))
    assert len(seen) == world
    for kind, size in (("tp", tp), ("dp", lay.dp), ("pp", pp), ("ep", ep), ("expert_dp", lay.edp),
                       ("stage", tp * lay.dp)):
        groups = lay.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(world)), kind
        assert all(len(g) == size for g in groups), kind
    # TP innermost: TP groups are runs of consecutive ranks
    assert all(g == list(range(g[0], g[0] + tp)) for g in lay.tp_groups())
    # group members differ in exactly their own coordinate
    for g in lay.ep_groups():
        cs = [lay.coords(r) for r in g]
        assert len({(c["pp"], c["tp"], c["edp"]) for c in cs}) == 1 and [c["ep"] for c in cs] == list(range(ep))
    for g in lay.expert_dp_groups():
        cs = [lay.coords(r) for r in g]
        assert len({(c["pp"], c["tp"], c["ep"]) for c in cs}) == 1


def test_single_state_has_trivial_groups():
    st = ParallelState.single()
    assert (st.tp_size, st.pp_size, st.dp_size, st.ep_size, st.expert_dp_size) == (1, 1, 1, 1, 1)
    assert st.tp_group is None and st.dp_group is None and st.is_first_stage and st.is_last_stage


@pytest.mark.parametrize("kw,world,field,text", [
    (dict(tp=3), 3, "parallel.tp", "model.num_heads=4"),
    (dict(tp=4), 4, "parallel.tp", "model.num_kv_heads=2"),
    (dict(tp=2), 3, "parallel.tp", "does not divide the world size 3"),
    (dict(ep=4), 2, "parallel.ep", "must divide the data-parallel size dp = world / (tp * pp) = 2"),
    (dict(pp=8), 8, "parallel.pp", "model.num_layers=4"),
])
def test_validation_names_the_field(kw, world, field, text):
    with pytest.raises(ConfigError) as e:
        validate_parallel(tiny_cfg(**kw), world)
    assert str(e.value).startswith(field) and text in str(e.value)


def test_validation_ffn_and_experts():
    with pytest.raises(ConfigError, match=r"^parallel.tp: 2 does not divide model.ffn_hidden_size=49"):
        validate_parallel(tiny_cfg(tp=2, extra=["--model.ffn_hidden_size=49"]), 2)
    cfg = tiny_cfg()
    cfg.parallel.ep = 3  # bypass load_config's own check to reach validate_parallel's
    with pytest.raises(ConfigError, match=r"^parallel.ep: 3 does not divide moe.num_experts=4"):
        validate_parallel(cfg, 3)


def test_tied_embeddings_rejected_with_pipeline():
    with pytest.raises(ConfigError, match="^model.tie_embeddings"):
        validate_parallel(tiny_cfg(pp=2, extra=["--model.tie_embeddings=true"]), 2)

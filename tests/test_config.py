import pytest

from megatron_evomoe.config import ConfigError, load_config, moe_layer_indices

STAGE = ["--stages=[{name: s, steps: 2}]"]


def err(overrides, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, STAGE + overrides)
    return str(e.value)


def test_defaults_and_overrides():
    cfg = load_config(None, STAGE + ["--moe.top_k=2", "--train.save_dir=out/x", "--model.num_layers=6",
                                     "--moe.layers=1,4"])
    assert cfg.moe.top_k == 2 and cfg.train.save_dir == "out/x"
    assert moe_layer_indices(cfg) == [1, 4]
    assert cfg.stages[0].steps == 2 and cfg.stages[0].name == "s"


def test_alternate_and_even_moe_layers():
    """alternate: 1, 3, 5 (the default); even: 0, 2, 4, MoE-LLaVA's range(num_layers)[::2]."""
    layers = {spec: moe_layer_indices(load_config(None, STAGE + ["--model.num_layers=7", f"--moe.layers={spec}"]))
              for spec in ("alternate", "even")}
    assert layers == {"alternate": [1, 3, 5], "even": [0, 2, 4, 6]}


def test_stage_override_by_name_and_index(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stages:\n  - {name: a, steps: 3}\n  - {name: b, steps: 4}\n")
    cfg = load_config(y, ["--stages.b.lr=0.5", "--stages.0.steps=7"])
    assert cfg.stages[1].lr == 0.5 and cfg.stages[0].steps == 7


@pytest.mark.parametrize("override,field", [
    ("--moe.top_k=5", "moe.top_k"),
    ("--model.hidden_size=130", "model.hidden_size"),
    ("--moe.foo=1", "moe.foo"),
    ("--model.num_layers=abc", "model.num_layers"),
    ("--bogus.x=1", "bogus"),
    ("--router.type=mlp", "router.type"),
    ("--model.num_kv_heads=3", "model.num_kv_heads"),
    ("--evolution.beta_ranges=[[0.9,0.8]]", "evolution.beta_ranges[0]"),
    ("--moe.layers=9", "moe.layers"),
    ("--data.seq_len=1000", "data.seq_len"),
])
def test_errors_name_the_field(override, field):
    msg = err([override])
    assert msg.startswith(field), msg


def test_evolution_needs_matching_expert_count():
    assert "1 + len(evolution.beta_ranges)" in err(["--moe.num_experts=8"])


def test_unknown_key_in_yaml_names_file_field(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"^train.learning_rate: unknown key"):
        load_config(y)


def test_stage_order_rules():
    msg = err(["--stages=[{name: a, moe_mode: sparse}, {name: b, moe_mode: dense}]"])
    assert msg.startswith("stages:")
    with pytest.raises(ConfigError, match=r"stages\[0\].moe_mode"):
        load_config(None, ["--stages=[{name: a, moe_mode: evolve}]", "--moe.init=copy"])

"""pretrain_evomoe.py --dry-run resolves every stage's conversation template as a run does: a 'tokenizer'
template without a chat_template stops it with the run's one-line config error."""
from pathlib import Path

import pytest

import pretrain_evomoe
from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.data.conversation_templates import stage_template
from megatron_evomoe.data.prepare import data_root_and_tokenizer

CONFIG = str(Path(__file__).resolve().parents[1] / "examples/configs/tiny_cpu.yaml")


def test_dry_run_refuses_a_tokenizer_template_the_tokenizer_lacks(tmp_path, capsys):
    args = ["--config", CONFIG, "--dry-run", "--data.conversation_template=tokenizer", f"--data.root={tmp_path}"]
    assert pretrain_evomoe.main(args) == 2
    err = capsys.readouterr().err.strip()
    # what the run stops with: stage 1's template (stage 0 is plain), resolved with the built word tokenizer
    cfg = load_config(CONFIG, args[3:])
    tokenizer = data_root_and_tokenizer(cfg)[1]
    stage_template(cfg, 0, tokenizer)
    with pytest.raises(ConfigError) as run_error:
        stage_template(cfg, 1, tokenizer)
    assert err == f"config error: {run_error.value}"
    assert err.startswith("config error: data.conversation_template: 'tokenizer' renders with the tokenizer's "
                          "chat_template, but the tokenizer (WordTokenizer) has none")


def test_dry_run_with_named_templates_builds_nothing(tmp_path, capsys):
    root = tmp_path / "data"
    assert pretrain_evomoe.main(["--config", CONFIG, "--dry-run", f"--data.root={root}",
                                 "--model.vocab_size=100"]) == 0
    assert "router" in capsys.readouterr().out and not root.exists()

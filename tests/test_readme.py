"""The README's two Quickstart commands are the ones CI and users run."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```", 2)[1]
    return [line.strip() for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = quickstart_commands()
    assert "pretrain_evomoe.py --config examples/configs/tiny_cpu.yaml" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert (ROOT / "examples/configs/tiny_cpu.yaml").is_file()

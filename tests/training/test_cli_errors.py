"""pretrain_evomoe.py: bad input gives one clear line naming the field/file/record, before any training."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.tiny_config import STAGES, TINY

ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "pretrain_evomoe.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_unknown_config_key_names_the_field(tmp_path):
    r = run("--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), "--train.learning_rate=1", "--dry-run")
    assert r.returncode == 2
    assert "train.learning_rate: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_prints_sizes_and_plan():
    r = run("--config", str(ROOT / "examples/configs/tiny_cpu.yaml"), "--dry-run", "--model.vocab_size=100")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "MoE layers: [1, 3]; 4 experts, top-1, init=evolution, router=dtr" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
            ("projector", "warmup", "evolution", "router")}
    total_dense, active_dense = int(rows["warmup"][4].replace(",", "")), int(rows["warmup"][5].replace(",", ""))
    total_moe, active_moe = int(rows["router"][4].replace(",", "")), int(rows["router"][5].replace(",", ""))
    # 2 MoE layers x 3 extra experts x 3 x (128 x 256) weights, plus two DTRs
    assert total_moe - total_dense > 2 * 3 * 3 * 128 * 256
    assert active_moe - active_dense < total_moe - total_dense  # top-1: only one expert is active per token


@pytest.mark.parametrize("breakage,expected", [
    ("missing_image", "image file not found"),
    ("malformed", "field 'conversations'"),
    ("too_long", "more than seq_len"),
])
def test_bad_data_is_reported_before_training(data_root, tmp_path, breakage, expected):
    records = json.loads((Path(data_root) / "instruct.json").read_text())[:20]
    bad = dict(records[3])
    if breakage == "missing_image":
        bad["image"] = "no_such_file.png"
    elif breakage == "malformed":
        bad["conversations"] = "not a list"
    else:
        bad["conversations"] = [{"from": "human", "value": "<image>\n" + "word " * 200},
                                {"from": "gpt", "value": "yes"}]
    records[3] = bad
    (Path(data_root) / f"broken_{breakage}.json").write_text(json.dumps(records))
    save = tmp_path / "run"
    r = run(*TINY, STAGES, f"--data.root={data_root}", f"--train.save_dir={save}",
            f"--stages.warmup.data=broken_{breakage}.json")  # (stage 2: every stage's data is read first)
    assert r.returncode == 2, r.stderr
    assert f"broken_{breakage}.json: record 3" in r.stderr and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (save / "checkpoints").exists()  # nothing was trained


def test_too_long_sample_is_a_counted_skip_when_allowed(data_root, tmp_path):
    records = json.loads((Path(data_root) / "captions.json").read_text())[:12]
    records[2] = {**records[2], "conversations": [{"from": "human", "value": "<image>\n" + "word " * 200},
                                                  {"from": "gpt", "value": "a caption"}]}
    (Path(data_root) / "captions_long.json").write_text(json.dumps(records))
    r = run(*TINY, STAGES, f"--data.root={data_root}", f"--train.save_dir={tmp_path / 'run'}",
            "--stages.projector.data=captions_long.json", "--data.skip_bad_samples=true",
            "--stages=[{name: p, trainable: ['projector.*'], data: captions_long.json, steps: 1, eval: false}]")
    assert r.returncode == 0, r.stderr
    assert "11 records" in r.stderr or "skipped" in r.stderr, r.stderr
    assert "too_long" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA error; CUDA is present")
def test_cuda_device_without_cuda_is_a_config_error(tmp_path, data_root):
    r = run(*TINY, STAGES, f"--data.root={data_root}", f"--train.save_dir={tmp_path / 'run'}", "--train.device=cuda")
    assert r.returncode == 2
    assert "train.device: 'cuda' requested but no CUDA device is available" in r.stderr and "Traceback" not in r.stderr

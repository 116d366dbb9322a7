"""SIGKILL the demo training at chosen moments; the same command resumes it and the run ends
bit-identical to an uninterrupted one (losses of every step, final parameters)."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from tests.training.tiny_config import STAGES, TINY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run_training(save_dir, data_root, fault=None, extra=()):
    args = [*TINY, STAGES, f"--data.root={data_root}", f"--train.save_dir={save_dir}", "--train.num_threads=1",
            *extra]
    if fault:
        cmd = [sys.executable, str(HERE / "fault_launcher.py"), *fault, "--", *args]
    else:
        cmd = [sys.executable, str(ROOT / "pretrain_evomoe.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def step_records(save_dir):
    """global step -> every record logged for it (a resumed run logs re-done steps twice)."""
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out.setdefault(rec["step"], []).append((rec["train/loss"], rec["train/grad_norm"]))
    return out


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference")
    r = run_training(save, data_root)
    assert r.returncode == 0, r.stderr[-2000:]
    return save


# global steps: projector 1-2, warmup 3-5, evolution 6-8, router 9-11; save_interval=2
@pytest.mark.parametrize("fault", [
    ("step", "7"),      # mid-step, inside the evolution stage
    ("save", "3"),      # mid-write of the third checkpoint file
    ("evolve", "2"),    # between two evolved tensors' updates
    ("stage", "2"),     # right after the warm-up stage's final checkpoint
    # mid-step with 2 DataLoader workers, resumed with them: the same as the reference, which loads in-process
    ("step", "7", "--data.num_workers=2"),
])
def test_killed_run_resumes_bit_identically(reference, data_root, tmp_path, fault):
    fault, extra = fault[:2], fault[2:]  # (mode, n, *training flags of both runs)
    save = tmp_path / "run"
    killed = run_training(save, data_root, fault, extra)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (save / "checkpoints" / "03-router-step000003").exists()
    latest = ckpt.find_latest(save)
    if latest is not None:  # whatever is 'latest' after the kill must load
        ckpt.load_checkpoint(latest)
    resumed = run_training(save, data_root, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr or latest is None
    ref, got = step_records(reference), step_records(save)
    assert sorted(got) == sorted(ref) == list(range(1, 12))
    for step, records in got.items():
        for rec in records:  # also the steps that ran twice: identical both times
            assert rec == ref[step][0], (step, rec, ref[step])
    a = ckpt.load_checkpoint(ckpt.find_latest(reference))["model"]
    b = ckpt.load_checkpoint(ckpt.find_latest(save))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_between_the_last_checkpoint_and_its_evaluation(reference, data_root, tmp_path):
    # right after the router stage's final checkpoint, before its POPE evaluation: the rerun resumes from
    # that checkpoint, has no step left, and runs the evaluation the kill cut off (the same scores)
    save = tmp_path / "run"
    killed = run_training(save, data_root, ("stage", "4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    final = save / "checkpoints" / "03-router-step000003"
    assert ckpt.find_latest(save) == final and not (final / "evaluated").exists()
    resumed = run_training(save, data_root)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert (final / "evaluated").read_text() == "done"
    evals = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
    want = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
    assert len(want) == 1 and evals == want

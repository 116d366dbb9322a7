"""2-process (DP=2, gloo, torchrun) kill and resume: one rank is SIGKILLed mid-checkpoint-write or
mid-step; the job restarts (by hand with the same command, or by torchrun --max-restarts) and
ends bit-identical to an uninterrupted 2-process run: every logged step's loss and grad norm,
and both ranks' final parameters. fault_campaign.py runs the same at random moments."""
import pytest

from megatron_evomoe import checkpointing as ckpt
from tests.reliability import harness


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference_dp2")
    r = harness.run(harness.command(save, data_root, nproc=2))
    assert r.returncode == 0, r.stderr[-3000:]
    return save


def test_rank_killed_mid_checkpoint_write_then_same_command(reference, data_root, tmp_path):
    save = tmp_path / "run"
    # rank 1 dies half-way through its 3rd checkpoint file (the warm-up stage's end, global step 5);
    # rank 0 may have completed its own copy of that checkpoint by then
    killed = harness.run(harness.command(save, data_root, nproc=2, fault=("save", "3")),
                         harness.fault_env("kill", rank=1))
    assert killed.returncode != 0 and "fault_launcher: kill on rank 1" in killed.stderr, killed.stderr[-3000:]
    rank1 = harness.rank_dirs(save, 2)[1]
    assert ckpt.find_latest(rank1).name == "01-warmup-step000002"  # the half-written one is never the latest
    assert list((rank1 / "checkpoints").glob(".tmp-01-warmup-step000003-*"))  # (it was left as a temporary)
    assert harness.check_latest_loadable(save, 2) == []
    resumed = harness.run(harness.command(save, data_root, nproc=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "01-warmup-step000002" in resumed.stderr
    assert harness.compare(reference, save, 2) == []


def test_torchrun_max_restarts_resumes_after_a_rank_dies_mid_step(reference, data_root, tmp_path):
    save, marker = tmp_path / "run", tmp_path / "fired"
    # rank 1 is killed inside the optimizer step of global step 7 (evolution stage), once; rank 0
    # completes step 7 and its checkpoint, so the ranks must agree to resume from step 5, the newest
    # checkpoint both have
    r = harness.run(harness.command(save, data_root, nproc=2, fault=("step", "7"), max_restarts=1),
                    harness.fault_env("kill", rank=1, once=marker))
    assert marker.exists(), r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exitcode: -9" in r.stderr  # torchrun saw the kill ...
    assert "resuming from" in r.stderr  # ... and the restarted workers resumed
    assert harness.compare(reference, save, 2) == []

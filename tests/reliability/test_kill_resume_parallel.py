"""2-process kill and resume under every layout (DP=2, TP=2, PP=2, EP=2; gloo, torchrun): one rank
is SIGKILLed mid-checkpoint-write or mid-step; the job restarts (by hand with the same command, or
by torchrun --max-restarts) and ends bit-identical to an uninterrupted run of the same layout:
every logged step's loss and grad norm, the stage-end POPE scores, and both ranks' final
parameters. fault_campaign.py runs the same at random moments."""

import pytest

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import check_global_batches, load_config
from megatron_evomoe.parallel.state import validate_parallel
from tests.reliability import harness


@pytest.fixture(scope="module", params=harness.PARALLEL_LAYOUTS)
def layout(request):
    return request.param


@pytest.fixture(scope="module")
def reference(layout, data_root, tmp_path_factory):
    """The uninterrupted run of the layout, shared by its tests; its stderr in torchrun.log."""
    save = tmp_path_factory.mktemp(f"reference_{layout}")
    r = harness.run(harness.command(save, data_root, layout))
    assert r.returncode == 0, r.stderr[-3000:]
    (save / "torchrun.log").write_text(r.stderr)
    return save


@pytest.mark.parametrize("name", harness.PARALLEL_LAYOUTS)
def test_every_layout_fits_the_tiny_recipe(name, data_root, tmp_path):
    cfg = load_config(None, harness.train_args(tmp_path, data_root, name))
    want = harness.LAYOUTS[name]
    got = validate_parallel(cfg, want.nproc)  # heads, FFN, layers, experts, PP micro-batches
    assert (got.tp, got.pp, got.ep, got.dp) == (want.tp, want.pp, want.ep, 2 // (want.tp * want.pp))
    # the same global batch in every layout: the reference runs of all layouts see the same data
    accum = 2 if want.pp > 1 else 1
    assert cfg.train.global_batch_size == harness.GLOBAL_BATCH == cfg.train.micro_batch_size * got.dp * accum
    assert set(check_global_batches(cfg, got.dp).values()) == {accum}


def test_stage_end_evaluation_runs_in_every_layout(reference, layout):
    # the tiny recipe evaluates at the end of the router stage only (global step 11); under PP the
    # answers are decoded through the pipeline (parallel/pipeline_generation.py)
    _, evals, _ = harness.step_records(reference)
    assert list(evals) == [harness.NUM_STEPS]
    assert evals[harness.NUM_STEPS][0]["eval/router/num_questions"] == 8


def test_rank_killed_mid_checkpoint_write_then_same_command(reference, layout, data_root, tmp_path):
    save = tmp_path / "run"
    # rank 1 dies half-way through writing its part of the 3rd checkpoint (the warm-up stage's end,
    # global step 5); rank 0 may have written all of its own part by then
    killed = harness.run(harness.command(save, data_root, layout, fault=("save", "3")),
                         harness.fault_env("kill", rank=1))
    assert killed.returncode != 0 and "fault_launcher: kill on rank 1" in killed.stderr, killed.stderr[-3000:]
    assert ckpt.find_latest(save).name == "01-warmup-step000002"  # the half-written one is never the latest
    tmp = list((save / "checkpoints").glob(".tmp-01-warmup-step000003-*"))  # (it was left as a temporary)
    assert tmp and not (tmp[0] / ".metadata").exists()
    assert harness.check_latest_loadable(save) == []
    resumed = harness.run(harness.command(save, data_root, layout))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "01-warmup-step000002" in resumed.stderr
    assert harness.compare(reference, save) == []


@pytest.mark.parametrize("layout", ["dp2"], scope="module")  # (the writer thread is the same in every layout)
def test_rank_killed_mid_asynchronous_checkpoint_write_then_same_command(reference, layout, data_root, tmp_path):
    # train.async_save: the checkpoint is written by a background thread while training goes on; rank 1
    # dies half-way through its part of the 3rd; the job stops, and the rerun (also asynchronous)
    # resumes from the 2nd and ends bit-identical to the synchronous reference
    save, background = tmp_path / "run", ["--train.async_save=true"]
    killed = harness.run(harness.command(save, data_root, layout, fault=("save", "3"), extra=background),
                         harness.fault_env("kill", rank=1))
    assert killed.returncode != 0 and "fault_launcher: kill on rank 1" in killed.stderr, killed.stderr[-3000:]
    assert ckpt.find_latest(save).name == "01-warmup-step000002"
    assert harness.check_latest_loadable(save) == []
    resumed = harness.run(harness.command(save, data_root, layout, extra=background))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "01-warmup-step000002" in resumed.stderr
    assert harness.compare(reference, save) == []


def test_torchrun_max_restarts_resumes_after_a_rank_dies_mid_step(reference, layout, data_root, tmp_path):
    save, marker = tmp_path / "run", tmp_path / "fired"
    # rank 1 is killed inside the optimizer step of global step 7 (evolution stage), once; rank 0 may
    # complete step 7 and its checkpoint, so the ranks must agree to resume from step 5, the newest
    # checkpoint both have
    r = harness.run(harness.command(save, data_root, layout, fault=("step", "7"), max_restarts=1),
                    harness.fault_env("kill", rank=1, once=marker))
    assert marker.exists(), r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exitcode: -9" in r.stderr  # torchrun saw the kill ...
    assert "resuming from" in r.stderr and "01-warmup-step000003" in r.stderr  # ... the restarted workers resumed
    assert harness.compare(reference, save) == []


@pytest.mark.parametrize("layout", ["dp2"], scope="module")  # (the DP ranks' loaders: one layout is enough)
def test_rank_killed_mid_step_with_loader_workers_resumes(reference, layout, data_root, tmp_path):
    # both ranks load with 2 DataLoader workers (data.num_workers=2); rank 1 dies mid-step 7; rerun with the
    # same command, the job ends bit-identical to the reference, which loads in the training processes
    save, workers = tmp_path / "run", ["--data.num_workers=2"]
    killed = harness.run(harness.command(save, data_root, layout, fault=("step", "7"), extra=workers),
                         harness.fault_env("kill", rank=1))
    assert killed.returncode != 0 and "fault_launcher: kill on rank 1" in killed.stderr, killed.stderr[-3000:]
    resumed = harness.run(harness.command(save, data_root, layout, extra=workers))
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert harness.compare(reference, save) == []

"""Every stop saves first, under parallelism too: a sample that fails to load mid-run on one rank
stops every rank at the same step boundary with a checkpoint of the steps done (DP=2: the other rank
learns it from the step's flag all-reduce; TP=2: both ranks read the sample), and after the file is
fixed the same command continues the uninterrupted run's trajectory bit for bit."""
import json
import shutil

import pytest

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import load_config
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.sampler import ResumableSampler
from megatron_evomoe.parallel import ParallelState
from megatron_evomoe.training.trainer import Trainer
from tests.parallel.dist_utils import run_distributed
from tests.reliability.bad_inputs import corrupt_image
from tests.training.tiny_config import TINY

# one stage of 4 steps, checkpoints at its end only: without the save on the error, steps 1-2 were lost
STAGE = "--stages=[{name: p, trainable: ['projector.*'], data: captions.json, steps: 4, eval: false}]"
LAYOUTS = {"dp2": ["--train.micro_batch_size=2"], "tp2": ["--parallel.tp=2"]}


def _cfg(data, save_dir, extra):
    return load_config(None, [*TINY, STAGE, f"--data.root={data}", "--data.build_if_missing=false",
                              f"--train.save_dir={save_dir}", "--train.save_interval=0", *extra])


def _train(rank, world, data, save_dir, extra):
    cfg = _cfg(data, save_dir, extra)
    trainer = Trainer(cfg, ParallelState.build(cfg, rank, world))
    try:
        trainer.run()
        error = None
    except DataError as e:
        error = str(e)
    steps = json.loads((ckpt.find_latest(trainer.save_dir) / "meta.json").read_text())["global_step"]
    return {"error": error, "saved_step": steps, "losses": [(h["global_step"], h["loss"]) for h in trainer.history]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_sample_failing_on_one_rank_stops_every_rank_with_a_checkpoint(data_root, tmp_path, layout):
    data = shutil.copytree(data_root, tmp_path / "data")
    extra = LAYOUTS[layout]
    reference = run_distributed(_train, 2, str(data), str(tmp_path / "ref"), extra)
    # the first sample of step 3 in the global order (global batch 4 on both layouts; stage seed 42)
    records = json.loads((data / "captions.json").read_text())
    sampler = ResumableSampler(len(records), seed=42)
    image = data / "images" / records[sampler.global_index(8)]["image"]
    assert all(records[sampler.global_index(k)]["image"] != image.name for k in range(8))  # not drawn before
    good = corrupt_image(image)

    run = str(tmp_path / "run")
    stopped = run_distributed(_train, 2, str(data), run, extra)
    assert [r["saved_step"] for r in stopped] == [2, 2]  # both ranks kept steps 1-2
    errors = [r["error"] for r in stopped]
    assert any(e and str(image) in e and "cannot decode image" in e for e in errors), errors
    if layout == "dp2":  # the rank that drew the sample names it; the other says why it stopped
        assert any(e and "a sample failed to load on another rank" in e for e in errors), errors

    image.write_bytes(good)
    resumed = run_distributed(_train, 2, str(data), run, extra)
    for r, ref in zip(resumed, reference):
        assert r["error"] is None and r["losses"] == ref["losses"][2:]


def test_nonfinite_stop_keeps_the_steps_before_it(data_root, tmp_path):
    from megatron_evomoe.training.nonfinite import NonFiniteError
    run = tmp_path / "run"
    trainer = Trainer(_cfg(data_root, run, ["--train.nonfinite=stop"]))
    calls = {"n": 0}

    def nan_in_third_step(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out

    trainer.model.projector.register_forward_hook(nan_in_third_step)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at stage 'p' step 3"):
        trainer.run()
    meta = json.loads((ckpt.find_latest(run) / "meta.json").read_text())
    assert (meta["global_step"], meta["stage_end"]) == (2, False)

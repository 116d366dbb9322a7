"""The global batch per stage: the same trajectory on 1, 2 and 4 data-parallel processes, the error for a
global batch the layout cannot split, the migration from train.grad_accum_steps, and a mixture stage's
log (samples per file, padding fraction) against a plain recount of its stream."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_evomoe.config import ConfigError, check_global_batches, load_config
from megatron_evomoe.data.llava_dataset import LlavaDataset
from megatron_evomoe.data.mixture import SampleStream
from megatron_evomoe.data.tokenizer import load_tokenizer
from megatron_evomoe.parallel import ParallelState
from megatron_evomoe.parallel.launch import plan
from megatron_evomoe.training.restore import config_from_state
from megatron_evomoe.training.trainer import Trainer
from tests.training.tiny_config import TINY

from .dist_utils import run_distributed

# Two dense stages (no router: the MoE aux loss is a per-micro-batch statistic that would differ with the
# split), the first at global batch 8 (2 micro-batches of 4 on one process), the second at 4.
STAGES = ("--stages=[{name: a, trainable: ['projector.*', 'llm.layers.0.*'], data: captions.json, steps: 2, "
          "global_batch_size: 8, eval: false},"
          "{name: b, trainable: ['llm.*'], steps: 2, global_batch_size: 4, eval: false}]")


def _cfg(data_root, save_dir, *extra):
    return load_config(None, [*TINY, STAGES, f"--data.root={data_root}", "--data.build_if_missing=false",
                              f"--train.save_dir={save_dir}", "--train.save_interval=0", *extra])


def _losses(rank, world, data_root, save_dir):
    cfg = _cfg(data_root, f"{save_dir}/w{world}", f"--train.micro_batch_size={4 // world}")
    history = Trainer(cfg, ParallelState.build(cfg, rank, world)).run()
    return [(h["stage"], h["loss"], h["grad_norm"], h["samples"]) for h in history]


def test_global_batch_per_stage_holds_across_world_sizes(data_root, tmp_path):
    ref = run_distributed(_losses, 1, str(data_root), str(tmp_path))[0]
    assert [(s, n) for s, _, _, n in ref] == [("a", 8), ("a", 8), ("b", 4), ("b", 4)]
    for world in (2, 4):
        for rank, got in enumerate(run_distributed(_losses, world, str(data_root), str(tmp_path), timeout=400)):
            assert len(got) == len(ref)
            for (s, loss, gn, n), (rs, rloss, rgn, rn) in zip(got, ref):
                assert (s, n) == (rs, rn)
                assert abs(loss - rloss) <= 1e-5 * abs(rloss), (world, rank, s, loss, rloss)
                assert abs(gn - rgn) <= 1e-4 * abs(rgn) + 1e-7, (world, rank, s, gn, rgn)


def test_a_global_batch_the_layout_cannot_split_is_refused_up_front(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "--stages.b.global_batch_size=6")
    with pytest.raises(ConfigError, match=r"stages\.b\.global_batch_size: 6 samples per step is not divisible by "
                                          r"train\.micro_batch_size 4 x data-parallel size 1 = 4; set it .* e\.g\. 4"):
        Trainer(cfg)
    assert check_global_batches(_cfg(data_root, tmp_path, "--train.micro_batch_size=2"), 2) == {"a": 2, "b": 1}
    with pytest.raises(ConfigError, match=r"stages\.a\.global_batch_size: 8 .* = 16; .* e\.g\. 16"):
        plan(_cfg(data_root, tmp_path), 4)  # the launchers' dry run: mb 4 x dp 4 = 16 does not divide 8
    with pytest.raises(ConfigError, match="stages.b.global_batch_size: 2 is smaller than train.micro_batch_size=4"):
        _cfg(data_root, tmp_path, "--stages.b.global_batch_size=2")


def test_grad_accum_steps_names_what_replaced_it():
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps: unknown key \(replaced by "
                                          r"train\.global_batch_size"):
        load_config(None, ["--train.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match=r"parallel\.num_microbatches: unknown key \(removed"):
        load_config(None, ["--parallel.num_microbatches=2"])
    # a checkpoint of an earlier version still loads for evaluation: its accumulation becomes the global batch
    saved = load_config(None, ["--train.micro_batch_size=4", "--stages=[{name: s}]"]).to_dict()
    saved["train"]["grad_accum_steps"], saved["parallel"]["num_microbatches"] = 3, 3
    del saved["train"]["global_batch_size"]
    cfg = config_from_state({"config": saved})
    assert (cfg.train.global_batch_size, check_global_batches(cfg, 1)) == (12, {"s": 3})


def test_mixture_stage_logs_samples_per_file_and_padding(data_root, tmp_path):
    mix = ("--stages=[{name: m, trainable: ['projector.*'], steps: 3, eval: false, "
           "data: [{path: captions.json, weight: 3}, {path: instruct.json, weight: 1}]}]")
    cfg = load_config(None, [*TINY, mix, f"--data.root={data_root}", "--data.build_if_missing=false",
                             f"--train.save_dir={tmp_path}", "--train.save_interval=0"])
    history = Trainer(cfg).run()
    # the plain recount: the mixture's first 12 draws (seed train.seed + 1000 x stage 0), their lengths
    tok = load_tokenizer(str(data_root / "tokenizer"))
    sets = [LlavaDataset(data_root / f, data_root / "images", tok, cfg.data.seq_len, cfg.vision.num_image_tokens,
                         cfg.vision.image_size) for f in ("captions.json", "instruct.json")]
    ids = SampleStream([len(s) for s in sets], cfg.train.seed, [3, 1]).take(12)
    lengths = np.concatenate([s.lengths for s in sets])[ids]
    from_captions = int((ids < len(sets[0])).sum())
    last = history[-1]
    assert (last["data/captions.json/samples"], last["data/instruct.json/samples"]) == (from_captions, 12 - from_captions)
    assert 0 < from_captions < 12
    seq = cfg.data.seq_len
    assert abs(last["padding_fraction_stage"] - (12 * seq - lengths.sum()) / (12 * seq)) < 1e-12
    assert abs(last["padding_fraction"] - (4 * seq - lengths[8:].sum()) / (4 * seq)) < 1e-12  # log_interval 1
    assert [h["samples"] for h in history] == [4, 4, 4]

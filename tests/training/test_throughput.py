"""Throughput in the log (training/throughput.py): every decoder position counted (images spliced, packing,
padding), summed over DP; TFLOP/s per GPU and MFU from stages/flops.py::step_flops on a fake clock; the keys
in metrics.jsonl and TensorBoard; the optional W&B sink; the progress bar only on a terminal."""
from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.data.packing import collate_packed
from megatron_evomoe.model.mllm import IGNORE_INDEX
from megatron_evomoe.stages.flops import step_flops
from megatron_evomoe.training import throughput
from megatron_evomoe.training.logger import MetricsLogger
from megatron_evomoe.training.trainer import Trainer, _progress
from tests.parallel.dist_utils import run_distributed
from tests.training.tiny_config import TINY

ONE_STAGE = "--stages=[{name: s, trainable: ['llm.*', 'projector.*'], data: captions.json, steps: 2, eval: false}]"
SPEED_KEYS = {"train/tokens_per_s", "train/supervised_tokens_per_s", "train/tflops_per_gpu", "train/mfu"}


def _cfg(*extra):
    return load_config(None, TINY + ["--stages=[{name: s, moe_mode: sparse}]", "--data.build_if_missing=false",
                                     *extra])


def _fake_clock(monkeypatch, step_s: float):
    ticks = iter(range(1000))
    monkeypatch.setattr(throughput, "clock", lambda: step_s * next(ticks))


def _unpacked(num_rows: int, seq: int, lengths: list[int], num_images: int) -> dict:
    """Rows of `lengths` real tokens padded to `seq` (pad id 0, labels IGNORE past the length)."""
    ids = torch.zeros(num_rows, seq, dtype=torch.long)
    labels = torch.full((num_rows, seq), IGNORE_INDEX)
    for r, n in enumerate(lengths):
        ids[r, :n] = 5
        labels[r, n // 2:n] = 5
    return {"input_ids": ids, "labels": labels, "images": torch.zeros(num_images, 3, 16, 16)}


def test_counts_every_position_images_padding_and_packed_rows():
    # two unpadded rows of 84 with 2 images (their 2 x 4 patch slots are positions of the ids), a row
    # with 30 real tokens + 54 padding positions and no image; packed: 2 rows of 84 holding 3 samples, 1 image
    a = _unpacked(2, 84, [84, 84], num_images=2)
    b = _unpacked(1, 84, [30], num_images=0)
    sample = lambda n, img: (torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long), img)
    packed = collate_packed([[sample(40, torch.zeros(3, 16, 16)), sample(20, None)], [sample(50, None)]],
                            seq_len=84, pad_id=0, image_size=16)
    assert throughput.batch_counts([a, b]) == (3 * 84, 2)  # padding positions are processed: counted
    assert throughput.batch_counts([packed]) == (2 * 84, 1)
    assert throughput.batch_counts([a, b, packed]) == (5 * 84, 3)


def test_rates_are_step_flops_over_time_and_world(monkeypatch):
    cfg = _cfg("--train.peak_tflops=0.002")
    _fake_clock(monkeypatch, 2.5)  # 2.5 s between log lines
    meter = throughput.ThroughputMeter(cfg, "sparse", world_size=4, peak=0.002)
    meter.step(*throughput.global_step_counts([_unpacked(2, 84, [84, 10], 2)], 47, None))
    meter.step(*throughput.global_step_counts([_unpacked(2, 84, [84, 84], 1)], 84, None))
    scalars, text = meter.summary_and_reset()
    flops = step_flops(cfg, 4 * 84, 84, num_images=3, moe_mode="sparse").total  # the interval's 2 steps
    assert scalars["tokens_per_s"] == 4 * 84 / 2.5 and scalars["supervised_tokens_per_s"] == 131 / 2.5
    assert scalars["tflops_per_gpu"] == pytest.approx(flops / 2.5 / 4 / 1e12, rel=1e-12)
    assert scalars["mfu"] == pytest.approx(flops / 2.5 / 4 / 1e12 / 0.002, rel=1e-12)
    assert f"{4 * 84 / 2.5:.0f} tok/s ({131 / 2.5:.0f} supervised)" in text and "MFU" in text
    # counts restart after a log line; without a peak there is no MFU (never a wrong one)
    meter.peak = None
    meter.step(*throughput.global_step_counts([_unpacked(1, 84, [84], 0)], 1, None))
    scalars, text = meter.summary_and_reset()
    assert scalars["tokens_per_s"] == 84 / 2.5 and "mfu" not in scalars and "MFU" not in text
    dense = throughput.rates(cfg, 84, 0, 1, 1.0, "dense", 1, None)["tflops_per_gpu"]
    assert dense == step_flops(cfg, 84, 84, moe_mode="dense").total / 1e12 != scalars["tflops_per_gpu"] * 2.5


def _dp_counts(rank, world):
    import torch.distributed as dist
    # rank 1 has 2 images and 7 supervised tokens
    return throughput.global_step_counts([_unpacked(2, 84, [84, 84], num_images=rank + 1)], 3 + 4 * rank,
                                         dist.group.WORLD)


def test_tokens_and_images_are_summed_over_data_parallel_ranks():
    r0, r1 = run_distributed(_dp_counts, 2)
    assert r0 == r1 == (3 + 7, 2 * 2 * 84, 1 + 2)  # both ranks' supervised tokens, positions, images


def test_peak_auto(monkeypatch, caplog):
    cfg = _cfg("--model.hidden_size=64", "--model.num_heads=4")
    assert throughput.resolve_peak(_cfg("--train.peak_tflops=312"), torch.device("cpu")) == 312.0
    with caplog.at_level(logging.INFO, "megatron_evomoe"):
        measured = throughput.resolve_peak(cfg, torch.device("cpu"))
    assert measured > 0 and "measured float32 GEMM at hidden size 64" in caplog.text
    assert throughput.resolve_peak(cfg, torch.device("cpu")) == measured  # measured once per process
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    assert throughput.resolve_peak(cfg, torch.device("cuda", 0)) == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA Future GPU")
    caplog.clear()
    assert throughput.resolve_peak(cfg, torch.device("cuda", 0)) is None
    assert "'NVIDIA Future GPU' is not in stages/flops.py's GPU table" in caplog.text


@pytest.mark.parametrize("value", ["0", "-1", "fast"])
def test_peak_tflops_is_checked(value):
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        _cfg(f"--train.peak_tflops={value}")


class _FakeWriter:
    scalars: list = []

    def __init__(self, log_dir):
        pass

    def add_scalar(self, k, v, step):
        self.scalars.append((k, step))

    def flush(self):
        pass

    def close(self):
        pass


def test_trainer_logs_throughput_to_console_jsonl_and_tensorboard(make_cfg, monkeypatch, caplog, tmp_path):
    import torch.utils.tensorboard
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", _FakeWriter)
    _fake_clock(monkeypatch, 0.5)
    cfg = make_cfg(ONE_STAGE, "--train.peak_tflops=0.001", "--train.tensorboard=true")
    with caplog.at_level(logging.INFO, "megatron_evomoe"):
        history = Trainer(cfg).run()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(SPEED_KEYS <= set(r) for r in lines)
    assert {k for k, step in _FakeWriter.scalars if step == 2} >= SPEED_KEYS
    for h, r in zip(history, lines):  # a global batch of 4 captions, each with its image, rows of 84
        flops = step_flops(cfg, 4 * 84, 84, num_images=4, moe_mode="dense").total
        assert r["train/tokens_per_s"] == 4 * 84 / 0.5 == h["tokens_per_s"]
        assert r["train/tflops_per_gpu"] == pytest.approx(flops / 0.5 / 1e12, rel=1e-12)
        assert r["train/mfu"] == pytest.approx(flops / 0.5 / 1e12 / 0.001, rel=1e-12)
        assert 0 < r["train/supervised_tokens_per_s"] < r["train/tokens_per_s"]
    assert "[s 2] loss" in caplog.text and f"{4 * 84 / 0.5:.0f} tok/s (" in caplog.text
    assert "TFLOP/s/GPU MFU" in caplog.text and "MFU against 0.001 TFLOP/s: train.peak_tflops" in caplog.text


def test_wandb_sink(monkeypatch, tmp_path):
    calls = {}
    run = types.SimpleNamespace(log=lambda m, step: calls.setdefault("log", []).append((step, m)),
                                finish=lambda: calls.setdefault("finished", True))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.setdefault("init", kw) and run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path / "myrun", tensorboard=False, wandb_project="evomoe", config={"train": {"seed": 1}})
    logger.log(3, {"train/loss": 1.5, "train/tokens_per_s": 100.0, "train/stage": "s"})
    logger.close()
    run_id = (tmp_path / "myrun" / "wandb_run_id").read_text()
    assert calls.pop("init") == {"project": "evomoe", "name": "myrun", "dir": str(tmp_path / "myrun"),
                                 "config": {"train": {"seed": 1}}, "mode": "offline", "id": run_id, "resume": "allow"}
    assert len(run_id) == 16
    MetricsLogger(tmp_path / "myrun", tensorboard=False, wandb_project="evomoe").close()  # a resumed job: the same run
    assert calls.pop("init")["id"] == run_id
    assert calls["log"] == [(3, {"train/loss": 1.5, "train/tokens_per_s": 100.0})] and calls["finished"]
    # not the main rank: no run; wandb missing: one ConfigError naming the field and the install
    MetricsLogger(tmp_path / "other", tensorboard=False, enabled=False, wandb_project="evomoe")
    assert len(calls["log"]) == 1
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"train.wandb_project .*pip install wandb"):
        MetricsLogger(tmp_path / "x", tensorboard=False, enabled=False, wandb_project="evomoe")


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    stage = types.SimpleNamespace(steps=5, name="s")
    bar = _progress(True, stage, 0)
    assert (bar is not None) == tty
    if bar is not None:
        bar.update(1)
        bar.close()
        assert "0/5" in stream.text  # the bar drew on the terminal
    assert _progress(False, stage, 0) is None

"""Throughput of training: every token processed, the supervised ones, model TFLOP/s per GPU and MFU.

The one definition, used by the trainer's log and by benchmarks/gpu_train_step.py:
- tokens/s: every decoder position of the step's micro-batches, summed over the data-parallel ranks (the
  job's rate): B x S of each micro-batch's ids. Image patch positions are in the ids already (the data
  pipeline expands each `<image>` into `vision.num_image_tokens` slots that the splice fills), a packed
  row counts as the one row it is, and padding positions count because the model computes them (their
  share is data_log's `padding_fraction`);
- supervised tokens/s: the positions with a label, the loss's denominator;
- TFLOP/s per GPU: stages/flops.py::step_flops of those tokens and of the images through the vision tower,
  with the stage's moe_mode and train.recompute, over the seconds and the world size (TP, PP and EP ranks
  share their replica's work, so the job's FLOPs / all ranks is each GPU's share);
- MFU: TFLOP/s per GPU / train.peak_tflops (a number, or "auto": the GPU's dense bf16 peak from
  flops.py's table, on a CPU a GEMM rate measured once per process).
"""
from __future__ import annotations

import functools
import logging
import time

import torch

from ..parallel.data_parallel import all_reduce_floats
from ..stages.flops import peak_tflops, step_flops

log = logging.getLogger("megatron_evomoe")

clock = time.perf_counter  # (tests replace it with a fake clock)


def batch_counts(micro: list[dict]) -> tuple[int, int]:
    """(decoder positions, images) of this rank's micro-batches, from the host tensors' shapes: no device
    read. ids [B, S]; images [N, 3, H, W]."""
    num_tokens = sum(b["input_ids"].numel() for b in micro)
    num_images = sum(b["images"].shape[0] for b in micro if b.get("images") is not None)
    return num_tokens, num_images


def rates(cfg, num_tokens: int, num_images: int, num_supervised: int, seconds: float, moe_mode: str,
          world_size: int, peak: float | None) -> dict:
    """The log's figures for job-wide counts done in `seconds`: tokens_per_s, supervised_tokens_per_s,
    tflops_per_gpu and, with a peak (TFLOP/s), mfu."""
    seconds = max(seconds, 1e-9)
    flops = step_flops(cfg, num_tokens, cfg.data.seq_len, num_images=num_images, moe_mode=moe_mode,
                       recompute=cfg.train.recompute)
    tflops = flops.tflops_per_s(seconds) / world_size
    out = {"tokens_per_s": num_tokens / seconds, "supervised_tokens_per_s": num_supervised / seconds,
           "tflops_per_gpu": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out


def rates_text(r: dict) -> str:
    text = f" | {r['tokens_per_s']:.0f} tok/s ({r['supervised_tokens_per_s']:.0f} supervised) | " \
           f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU"
    return text + (f" MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")


def global_step_counts(micro: list[dict], num_supervised: int, dp_group) -> tuple[int, int, int]:
    """(supervised tokens, decoder positions, images) of the whole step, all data-parallel ranks: the step's
    one count all-reduce (the loss needs the supervised count anyway; the log's counts ride along)."""
    num_tokens, num_images = batch_counts(micro)
    totals = all_reduce_floats([float(num_supervised), float(num_tokens), float(num_images)], dp_group)
    return tuple(int(round(v)) for v in totals)


class ThroughputMeter:
    """Job-wide counts between two log lines and the rates they make (no collective of its own)."""

    def __init__(self, cfg, moe_mode: str, world_size: int, peak: float | None):
        self.cfg, self.moe_mode = cfg, moe_mode
        self.world_size, self.peak = world_size, peak
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.t_last, self.num_tokens, self.num_images, self.num_supervised = now, 0, 0, 0

    def step(self, num_supervised: int, num_tokens: int, num_images: int) -> None:
        """One step's counts over all DP ranks (`global_step_counts`)."""
        self.num_supervised += num_supervised
        self.num_tokens += num_tokens
        self.num_images += num_images

    def summary_and_reset(self) -> tuple[dict, str]:
        """Scalars (`rates`' keys) of the interval since the last call, and the console fragment."""
        now = clock()
        r = rates(self.cfg, self.num_tokens, self.num_images, self.num_supervised, now - self.t_last,
                  self.moe_mode, self.world_size, self.peak)
        self._reset(now)
        return r, rates_text(r)


def resolve_peak(cfg, device: torch.device, verbose: bool = True) -> float | None:
    """train.peak_tflops as TFLOP/s: the number given; "auto": the GPU's table entry (None, with a warning,
    for a GPU not in the table: no MFU rather than a wrong one), on a CPU the measured GEMM rate."""
    setting = cfg.train.peak_tflops
    if not isinstance(setting, str):
        peak, source = float(setting), "train.peak_tflops"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = peak_tflops(name), f"the dense bf16 peak of {name} (stages/flops.py)"
        if not cfg.train.bf16:  # (the convention; an fp32/TF32 run's matmuls peak lower, so its MFU reads low)
            source += "; this run is train.bf16=false: its MFU is against the bf16 peak all the same"
        if peak is None:
            if verbose:
                log.warning("train.peak_tflops=auto: %r is not in stages/flops.py's GPU table, MFU is not logged "
                            "(set train.peak_tflops to its dense bf16 TFLOP/s)", name)
            return None
    else:
        dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        peak = measured_gemm_tflops(cfg.model.hidden_size, dtype)
        source = f"a measured {str(dtype).removeprefix('torch.')} GEMM at hidden size {cfg.model.hidden_size}"
    if verbose:
        log.info("MFU against %.4g TFLOP/s: %s", peak, source)
    return peak


@functools.cache
def measured_gemm_tflops(hidden: int, dtype: torch.dtype, rows: int = 2048, min_seconds: float = 0.05) -> float:
    """Best TFLOP/s of [rows, hidden] @ [hidden, hidden] on the CPU over 3 timed batches of ~min_seconds
    (once per process: the CPU's 'peak' for MFU, at the matrix width the model runs)."""
    g = torch.Generator().manual_seed(0)  # its own: the run's RNG stream (resumed bit-identically) is untouched
    a, b = torch.randn(rows, hidden, dtype=dtype, generator=g), torch.randn(hidden, hidden, dtype=dtype, generator=g)
    out = torch.mm(a, b)  # warm-up: BLAS init, page faults
    flop = 2 * rows * hidden * hidden
    best = 0.0
    for _ in range(3):
        calls, t0 = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - t0 < min_seconds:
            torch.mm(a, b, out=out)
            calls += 1
        best = max(best, flop * calls / (time.perf_counter() - t0) / 1e12)
    return best

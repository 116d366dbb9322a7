#!/usr/bin/env python
"""One-GPU training-step throughput of a config (tokens/s, TFLOP/s, MFU) and its host syncs per step.

    python benchmarks/gpu_train_step.py --config examples/configs/gpu_1b_moe.yaml --json OUT.json
    python benchmarks/gpu_train_step.py --config ... --sync-debug --json OUT.json   # + the sync pass
    python benchmarks/gpu_train_step.py --config ... --device cpu --steps 1 --warmup 0 \
        --model.hidden_size=64 ...                                 # CPU smoke of the same code path

The step is the trainer's (training/trainer.py::_train_step, one process): the model of the config's
last stage (stages/structure.py::build_model, `auto` backends), bf16 autocast when train.bf16, loss =
LM loss sum / supervised tokens + the MoE aux losses, backward, gradient clipping, the trainer's
AdamW (training/optim.py). Random token ids of the config's micro-batch x data.seq_len; text only.
FLOPs per step: stages/flops.py (3 x forward, full attention square); MFU against the device's dense
bf16 peak (stages/flops.py::peak_tflops).

--sync-debug runs one more step under torch.cuda.set_sync_debug_mode("warn") and counts the host
syncs it warns about, attributed to the MoE layer (forward inside a MoELayer, or any frame in moe/ or
ops/, e.g. a custom op's Python backward), the expert-parallel split sizes (parallel/expert_parallel.py:
allowed), the backward of C++ autograd nodes (which the engine reports at .backward(), so they name no
module: "backward_unattributed", which may include MoE-layer syncs) or elsewhere.
The JSON is rewritten after each part, so a time-out keeps what was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says


def build(cfg, device):
    """The model of the config's last stage on `device` and the trainer's optimizer over it."""
    from megatron_evomoe.stages.structure import build_model
    from megatron_evomoe.training.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    # image_token_id -1: never a token id, so every token is text (the config has no vision tower)
    model = build_model(cfg, image_token_id=-1, up_to_stage=len(cfg.stages) - 1).to(device).train()
    if getattr(cfg.train, "compile", False):  # the field exists once the compile issue lands
        model = torch.compile(model)
    stage = cfg.stages[-1]
    opt = build_optimizer(list(model.named_parameters()), lr=stage.lr, weight_decay=cfg.train.weight_decay,
                          betas=tuple(cfg.train.adam_betas), device=device)
    return model, opt


def train_step(model, opt, ids, cfg) -> float:
    """One step as the trainer runs it on one process; returns the loss (a host sync, as the trainer's)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        out = model(ids, None, ids)
    loss = out.lm_loss_sum / out.num_tokens.clamp(min=1) + out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad or float("inf"))
    opt.step()
    return float(loss.detach())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, opt, ids, cfg, warmup: int, steps: int) -> dict:
    """Median step time after `warmup` steps (which absorb Triton autotuning and compilation)."""
    device = ids.device
    for _ in range(warmup):
        train_step(model, opt, ids, cfg)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, ids, cfg)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "step_s_all": times, "loss": loss, "peak_mem_gib": peak}


class SyncCounter:
    """Counts the host-sync warnings of set_sync_debug_mode("warn") and attributes each one.

    Forward pre/post hooks keep the stack of modules running, so a sync in a forward is placed in
    its module; a sync in the backward (or anywhere) is placed by the Python frames it came from."""

    def __init__(self, model: torch.nn.Module):
        from megatron_evomoe.moe.moe_layer import MoELayer

        self.model, self.moe_type = model, MoELayer
        self.running: list[torch.nn.Module] = []
        self.events: list[dict] = []

    def __enter__(self):
        self.handles = []
        for module in self.model.modules():
            self.handles.append(module.register_forward_pre_hook(self._enter_module))
            self.handles.append(module.register_forward_hook(self._leave_module))
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._on_warning
        return self

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def _enter_module(self, module, args) -> None:  # (a hook returning a value would replace the input)
        self.running.append(module)

    def _leave_module(self, module, args, output) -> None:
        self.running.pop()

    def _on_warning(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            return
        stack = traceback.extract_stack()
        # the autograd engine replays its C++ nodes' warnings at the .backward() call: no module to name
        in_backward = any(f.name == "backward" and ("torch/autograd" in f.filename or "torch/_tensor.py" in f.filename)
                          for f in stack)
        frames = [f for f in stack if "megatron_evomoe" in f.filename or "benchmarks" in f.filename]
        self.events.append({"where": self.attribute(frames, in_backward), "at": _location(frames)})

    def attribute(self, frames, in_backward: bool = False) -> str:
        files = [Path(f.filename).as_posix() for f in frames]
        if any(f.endswith("parallel/expert_parallel.py") for f in files):
            return "ep_split_sizes"
        if any(isinstance(m, self.moe_type) for m in self.running) or any(
                "/megatron_evomoe/moe/" in f or "/megatron_evomoe/ops/" in f for f in files):
            return "moe_layer"  # a forward inside a MoE layer, or its ops' Python backward
        return "backward_unattributed" if in_backward else "elsewhere"

    def summary(self) -> dict:
        out = {"moe_layer": 0, "ep_split_sizes": 0, "backward_unattributed": 0, "elsewhere": 0, "locations": {}}
        for e in self.events:
            out[e["where"]] += 1
            key = f"{e['where']}: {e['at']}"
            out["locations"][key] = out["locations"].get(key, 0) + 1
        return out


def _location(frames) -> str:
    """The innermost frame of this project: file:line (function)."""
    if not frames:
        return "outside this project (autograd engine or torch)"
    f = frames[-1]
    rel = Path(f.filename).resolve()
    rel = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
    return f"{rel}:{f.lineno} ({f.name})"


def count_syncs(model, opt, ids, cfg) -> dict:
    """One step under set_sync_debug_mode("warn") (CUDA only)."""
    _sync(ids.device)
    with SyncCounter(model) as counter:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, opt, ids, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(ids.device)  # after the mode is back: torch.cuda.synchronize is itself a sync the mode reports
    return counter.summary()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples/configs/gpu_1b_moe.yaml"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps (0: none, e.g. for --sync-debug alone)")
    p.add_argument("--sync-debug", action="store_true", help="one more step counting host syncs (CUDA)")
    p.add_argument("--json", default="", metavar="PATH")
    args, overrides = p.parse_known_args(argv)
    from megatron_evomoe.config import load_config

    cfg = load_config(args.config, [*overrides, f"--train.device={torch.device(args.device).type}"])
    device = torch.device(args.device)
    if args.sync_debug and device.type != "cuda":
        p.error("--sync-debug needs a CUDA device")
    result = describe(cfg, device, args.config)

    def write():  # rewritten after each part, by rename: a run killed mid-write leaves the previous file
        if args.json:
            Path(f"{args.json}.tmp").write_text(json.dumps(result, indent=1))
            os.replace(f"{args.json}.tmp", args.json)

    write()
    t0 = time.perf_counter()
    model, opt = build(cfg, device)
    result["build_s"] = time.perf_counter() - t0
    ids = torch.randint(0, cfg.model.vocab_size, (result["micro_batch"], result["seq_len"]), device=device)
    if args.steps > 0:
        result.update(throughput(cfg, measure(model, opt, ids, cfg, args.warmup, args.steps), result))
        write()
        print(f"{result['device']}: {ids.numel()} tokens, step {result['step_s'] * 1e3:.1f} ms, "
              f"{result['tokens_per_s']:.0f} tokens/s, {result['tflops_per_s']:.1f} TFLOP/s, MFU {result['mfu']}")
    else:  # --steps 0 (the sync pass alone): warm-up only, so that compilation is not counted as syncs
        for _ in range(args.warmup):
            train_step(model, opt, ids, cfg)
    if args.sync_debug:
        result["syncs_per_step"] = count_syncs(model, opt, ids, cfg)
        write()
        print(f"host syncs in one step: {json.dumps(result['syncs_per_step'], indent=1)}")
    return 0


def describe(cfg, device, config_path: str) -> dict:
    """What is measured: device, shape, parameter counts, FLOPs per step (before anything runs)."""
    from megatron_evomoe.stages.flops import peak_tflops, step_flops
    from megatron_evomoe.stages.size import count_parameters

    sizes = count_parameters(cfg)[-1]
    seq, mb = cfg.data.seq_len, cfg.train.micro_batch_size
    flops = step_flops(cfg, mb * seq, seq, moe_mode=cfg.stages[-1].moe_mode)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "config": config_path, "micro_batch": mb, "seq_len": seq, "bf16": cfg.train.bf16,
            "params_total": sizes["total"], "params_active": sizes["llm_active_per_token"],
            "flops_per_step": flops.total, "flop_terms": flops.terms, "peak_tflops": peak_tflops(name)}


def throughput(cfg, timing: dict, described: dict) -> dict:
    """The timing plus tokens/s, TFLOP/s (stages/flops.py) and MFU against the device's peak."""
    from megatron_evomoe.stages.flops import mfu, step_flops

    step_s, tokens = timing["step_s"], described["micro_batch"] * described["seq_len"]
    flops = step_flops(cfg, tokens, described["seq_len"], moe_mode=cfg.stages[-1].moe_mode)
    peak = described["peak_tflops"]
    return {**timing, "tokens_per_s": tokens / step_s, "tflops_per_s": flops.tflops_per_s(step_s),
            "mfu": mfu(flops, step_s, peak) if peak else None}


if __name__ == "__main__":
    sys.exit(main())

"""How long a checkpoint save blocks training: synchronous vs `train.async_save`, for the one-process
`state.pt` and the distributed (DCP) format, with the bytes each writes.

    python benchmarks/checkpoint_save.py [--hidden 768] [--layers 8] [--repeats 3] [--out DIR]

A model of the tiny recipe's shape family, widened, in its sparse stage (4 experts on alternate
layers), with AdamW state for every parameter (one step taken). "blocks" is the time from the save's
start until training may go on (the write itself, or only the copy to host memory of an
asynchronous save); "done" is until the checkpoint is complete on disk. Same process, same file
system, side by side, median of the repeats.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_evomoe.config import load_config
from megatron_evomoe.parallel import ParallelState
from megatron_evomoe.parallel.checkpoint_boxes import (live_entries, model_boxes, optimizer_boxes, optimizer_slots,
                                                       staged_copy)
from megatron_evomoe.parallel.distributed_checkpoint import DistributedCheckpointer
from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.stages.structure import build_model
from megatron_evomoe.training.background_save import BackgroundSave

ROOT = Path(__file__).resolve().parents[1]


def build(hidden: int, layers: int):
    cfg = load_config(str(ROOT / "examples/configs/tiny_cpu.yaml"),
                      [f"--model.hidden_size={hidden}", f"--model.ffn_hidden_size={hidden * 11 // 4}",
                       f"--model.num_layers={layers}", "--model.num_heads=8", "--model.num_kv_heads=4",
                       "--model.vocab_size=32000"])
    model = build_model(cfg, 31999, up_to_stage=len(cfg.stages) - 1)
    params = [(n, p) for n, p in model.named_parameters()]
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-4)
    for _, p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return cfg, model, params, opt


def writers(cfg, model, params, opt, folder: Path):
    """name -> (staged?) -> a save callable, as the trainer builds them (training_hooks.checkpoint_write)."""
    state = ParallelState.single(cfg)
    saver = DistributedCheckpointer(0, 1)
    inner, slots = optimizer_slots(opt, params)
    plain = {"stage_idx": 0, "step": 1, "config": cfg.to_dict()}

    def state_pt(staged: bool):
        sd = {"model": model.state_dict(), "optimizer": opt.state_dict(), **plain}
        sd = staged_copy(sd) if staged else sd
        return lambda: ckpt.save_checkpoint(folder / "pt", "c", sd, {"global_step": 1}, keep=1)

    def dcp(staged: bool):
        boxes = {**model_boxes(model, state), **optimizer_boxes(model, slots, live_entries(inner, slots), state)}
        boxes = {k: b.staged() for k, b in boxes.items()} if staged else boxes
        return lambda: saver.save(folder / "dcp", "c", boxes, plain, {"global_step": 1}, keep=1, watched=False)
    return {"state.pt": state_pt, "dcp": dcp}


def measure(make, asynchronous: bool) -> tuple[float, float]:
    saves = BackgroundSave(asynchronous)
    t0 = time.perf_counter()
    saves.submit(make(asynchronous))  # (staging happens in make, before the write is submitted)
    blocked = time.perf_counter() - t0
    saves.close(failing=False)
    return blocked, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="folder to write into (default: a temporary one)")
    args = ap.parse_args()
    cfg, model, params, opt = build(args.hidden, args.layers)
    folder = Path(args.out or tempfile.mkdtemp(prefix="ckpt_bench_"))
    num_params = sum(p.numel() for _, p in params)
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2 * 4 * num_params
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or '?'}; "
          f"torch {torch.__version__}; {folder}")
    print(f"model: {num_params / 1e6:.1f}M parameters; model + AdamW moments {tensor_bytes / 2**20:.1f} MiB")
    print(f"| format   | mode  | blocks s | done s | MiB written |\n|---|---|---|---|---|")
    for name, make in writers(cfg, model, params, opt, folder).items():
        for asynchronous in (False, True):
            runs = [measure(make, asynchronous) for _ in range(args.repeats)]
            written = sum(f.stat().st_size for f in (folder / ("pt" if name == "state.pt" else "dcp")).rglob("*")
                          if f.is_file())
            print(f"| {name:<8} | {'async' if asynchronous else 'sync':<5} | "
                  f"{statistics.median(r[0] for r in runs):8.3f} | {statistics.median(r[1] for r in runs):6.3f} | "
                  f"{written / 2**20:11.1f} |")
    if not args.out:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Helpers shared by the kernel microbenchmarks: argument parsing, timing, device description, tables.

    from common import bench_args, device_banner, time_ms, print_table   (run from benchmarks/)

Timing uses CUDA events on a GPU (after warm-up, which also absorbs Triton autotuning and
compilation) and ``time.perf_counter`` on CPU; the median of ``iters`` runs is reported. CPU numbers
say nothing about kernel performance: ``device_banner`` prints that loudly.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import torch

from megatron_evomoe.ops.backend_timing import cuda_event_timer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Common flags: --tiny, --device, --dtype, --warmup, --iters, --only, --json (plus ``extra(parser)`` ones)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="small shapes and torch backends only: a smoke test that runs on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10 GPU / 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed runs, median reported (default 50 GPU / 3 CPU)")
    p.add_argument("--only", default="", help="comma list of the shape names to run (default: all)")
    p.add_argument("--json", default="", metavar="PATH", help="also write the tables to PATH (write_json)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if args.device.type != "cuda" and not args.tiny:
        p.error("on CPU only --tiny runs (full shapes need a GPU)")
    args.torch_dtype = DTYPES[args.dtype]
    on_gpu = args.device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (50 if on_gpu else 3)
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads visible)"


def device_banner(device: torch.device, title: str) -> None:
    print(f"== {title}")
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    if device.type != "cuda":
        print("NOTE: CPU run (--tiny). These numbers are NOT kernel performance: Triton kernels do not run")
        print("      compiled on CPU, and only the PyTorch paths are timed. This run is a smoke test.")
    sys.stdout.flush()


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA: the event timer the `measured` backend choice uses)."""
    if device.type == "cuda":
        return 1e3 * cuda_event_timer("benchmark", fn, warmup=warmup, reps=iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def try_time_ms(fn, device, warmup, iters) -> tuple[float | None, str]:
    """(milliseconds, "") or (None, why) when the method raises (unsupported dtype / shape / device)."""
    try:
        return time_ms(fn, device, warmup, iters), ""
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, "out of memory"
    except Exception as exc:  # a method that does not support this case is reported, not fatal
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {msg[:60]}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Left-aligned text table; cells are str()-ed."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    sys.stdout.flush()


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def selected(shapes: dict, args: argparse.Namespace) -> dict:
    """The entries of `shapes` that --only names (all without it); an unknown name is an error."""
    if not args.only:
        return shapes
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise SystemExit(f"--only: unknown shape {unknown[0]!r}; known: {', '.join(shapes)}")
    return {n: shapes[n] for n in names}


def _cell(text: str) -> object:
    """A table cell back to a number where it is one: "1.25" -> 1.25, "0.85x" -> 0.85, "-" -> None."""
    if text == "-":
        return None
    try:
        return float(text[:-1]) if text.endswith("x") else float(text)
    except ValueError:
        return text


def write_json(args: argparse.Namespace, tables: dict) -> None:
    """With --json PATH: {device, dtype, torch, tables: {title: [{header: cell}]}} to PATH, the cells
    as printed (numbers parsed back), so a script can read the same figures as the tables show."""
    if not args.json:
        return
    out = {"device": device_name(args.device), "dtype": args.dtype, "torch": torch.__version__, "tables": {
        title: [dict(zip(headers, (_cell(str(c)) for c in row))) for row in rows]
        for title, (headers, rows) in tables.items()}}
    tmp = f"{args.json}.tmp"  # then renamed: a run killed mid-write leaves the previous complete file
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)

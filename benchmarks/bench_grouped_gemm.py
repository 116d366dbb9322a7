"""Grouped GEMM microbenchmark: forward and backward TFLOP/s of the expert GEMMs.

    python benchmarks/bench_grouped_gemm.py                 # GPU: model shapes, every method
    python benchmarks/bench_grouped_gemm.py --tiny          # CPU smoke test (torch paths only)

Shapes (tokens T per step, each routed to top-k experts -> T*k rows):
  Mixtral 8x7B   hidden 4096, FFN 14336, 8 experts, top-2
  Qwen3-30B-A3B  hidden 2048, FFN 768, 128 experts, top-8
  EvoMoE-scale   hidden 2048, FFN 5504 (Qwen-1.8B), 4 experts, top-2
  EvoMoE recipe  4 experts, top-1, 16k rows: hidden 2048 / FFN 5504 (Qwen-1.8B), 2560 / 10240 (Phi-2),
                 4096 / 14336 (a 7B)
each as the up projection (hidden -> FFN) and the down projection (FFN -> hidden), with balanced
and skewed expert loads (skewed: Zipf-like, the first expert takes the most rows, some get none).

Methods: this package's Triton kernel (GPU), its TMA persistent variant (sm_90), "auto" (the faster
of these and torch._grouped_mm per shape and phase, timed once), the op's PyTorch backend, torch._grouped_mm where
present, a loop of per-expert matmuls, megablocks' grouped_gemm where installed, and a dense GEMM of
the same FLOPs (the roofline the grouped kernels chase). "fwd" is y = x @ w[e]; "bwd" is dx and dw
(torch.autograd.grad), counted as twice the forward FLOPs. "vs best alt" divides by the best other
grouped method (dense excluded); "vs dense" by the dense GEMM.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_args, device_banner, fmt, print_table, ratio, selected, try_time_ms, write_json  # noqa: E402

MODELS = {  # name: (hidden, ffn, experts, top-k, tokens)
    "Mixtral-8x7B": (4096, 14336, 8, 2, 8192),
    "Qwen3-30B-A3B": (2048, 768, 128, 8, 8192),
    "EvoMoE-2B": (2048, 5504, 4, 2, 8192),
    "EvoMoE-1.8B top-1": (2048, 5504, 4, 1, 16384),
    "EvoMoE-Phi2 top-1": (2560, 10240, 4, 1, 16384),
    "EvoMoE-7B top-1": (4096, 14336, 4, 1, 16384),
}
TINY_MODELS = {
    "tiny-8e": (64, 96, 8, 2, 256),
    "tiny-32e": (48, 32, 32, 4, 128),
}


def expert_counts(rows: int, experts: int, load: str) -> list[int]:
    """Rows per expert summing to `rows`: equal, or Zipf-like 1/(rank+1)^1.5 with the tail rounded down
    (so the last experts of a large E get no rows at all)."""
    if load == "balanced":
        base = [rows // experts] * experts
        for e in range(rows - sum(base)):
            base[e] += 1
        return base
    weights = [1.0 / (e + 1) ** 1.5 for e in range(experts)]
    total = sum(weights)
    counts = [int(rows * w / total) if w / total > 0.002 else 0 for w in weights]
    counts[0] += rows - sum(counts)
    return counts


def methods(x, w, offsets, counts, device, tiny):
    """{name: callable(x, w) -> y}; every one differentiable through autograd."""
    from megatron_evomoe.ops.grouped_gemm import grouped_mm, grouped_mm_op

    bounds, lo = [], 0
    for c in counts:
        bounds.append((lo, lo + c))
        lo += c
    found = {}
    if device.type == "cuda" and not tiny:
        found["triton (ours)"] = lambda x, w: grouped_mm(x, w, offsets, backend="triton")
        if torch.cuda.get_device_capability(device) >= (9, 0):
            found["triton TMA (ours)"] = lambda x, w: grouped_mm_op(x, w, offsets, "triton_tma")
        found["auto (measured)"] = lambda x, w: grouped_mm(x, w, offsets, backend="auto")
    found["ops torch backend"] = lambda x, w: grouped_mm(x, w, offsets, backend="torch")
    if hasattr(torch, "_grouped_mm"):
        offs32 = offsets.to(torch.int32)
        found["torch._grouped_mm"] = lambda x, w: torch._grouped_mm(x, w, offs32)
    else:
        found["torch._grouped_mm"] = "not in this torch"

    def loop(x, w):
        return torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(bounds)])

    found["loop of matmuls"] = loop
    try:
        import grouped_gemm  # megablocks' grouped GEMM (pip install grouped_gemm)

        batch_sizes = torch.tensor(counts, dtype=torch.int64)  # its API wants them on the host
        found["megablocks gmm"] = lambda x, w: grouped_gemm.ops.gmm(x, w, batch_sizes)
    except ImportError:
        found["megablocks gmm"] = "not installed"
    return found


def bench_case(args, model, hidden, ffn, experts, topk, tokens, proj, load, table):
    device, dtype = args.device, args.torch_dtype
    K, N = (hidden, ffn) if proj == "up" else (ffn, hidden)
    rows = tokens * topk
    counts = expert_counts(rows, experts, load)
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(rows, K, generator=gen) * 0.1).to(device, dtype).requires_grad_()
    w = (torch.randn(experts, K, N, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    dy = (torch.randn(rows, N, generator=gen) * 0.1).to(device, dtype)
    wd = w.detach()[0].clone().requires_grad_()  # dense GEMM with the same FLOPs: [rows, K] @ [K, N]
    flops = 2.0 * rows * K * N

    results = {}
    candidates = methods(x, w, offsets, counts, device, args.tiny)
    candidates["dense GEMM (same FLOPs)"] = None
    for name, fn in candidates.items():
        if isinstance(fn, str):
            results[name] = (None, None, fn)
            continue
        if fn is None:
            fwd = lambda: x @ wd  # noqa: E731
            inputs = (x, wd)
        else:
            fwd = lambda fn=fn: fn(x, w)  # noqa: E731
            inputs = (x, w)
        t_fwd, why = try_time_ms(lambda: fwd(), device, args.warmup, args.iters)
        t_bwd = None
        if t_fwd is not None:
            y = fwd()
            t_bwd, why = try_time_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
                                     device, args.warmup, args.iters)
            del y
        results[name] = (t_fwd, t_bwd, why)

    for p, mult in (("fwd", 1.0), ("bwd", 2.0)):
        i = 0 if p == "fwd" else 1
        tflops = {n: (None if r[i] is None else mult * flops / (r[i] * 1e-3) / 1e12) for n, r in results.items()}
        dense = tflops["dense GEMM (same FLOPs)"]
        for name, r in results.items():
            alts = [v for n, v in tflops.items() if n != name and n != "dense GEMM (same FLOPs)" and v is not None]
            best_alt = max(alts) if alts else None
            note = r[2] if r[i] is None else ""
            digits = 3 if args.tiny else 1
            table.append([model, proj, f"{K}x{N}", load, p, name, fmt(r[i], 3), fmt(tflops[name], digits),
                          ratio(tflops[name], best_alt) if name != "dense GEMM (same FLOPs)" else "",
                          ratio(tflops[name], dense) if name != "dense GEMM (same FLOPs)" else "", note])
    del x, w, dy, wd


def main(argv=None):
    args = bench_args(__doc__.splitlines()[0], argv)
    device_banner(args.device, f"grouped GEMM, {args.dtype}")
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs compare TF32 paths on all sides
    table = []
    headers = ["model", "proj", "KxN", "load", "pass", "method", "ms", "TFLOP/s", "vs best alt", "vs dense", "note"]
    for model, (hidden, ffn, experts, topk, tokens) in selected(TINY_MODELS if args.tiny else MODELS, args).items():
        for proj in ("up", "down"):
            for load in ("balanced", "skewed"):
                bench_case(args, model, hidden, ffn, experts, topk, tokens, proj, load, table)
                write_json(args, {"grouped_gemm": (headers, table)})  # after each case: a time-out keeps them
    print_table(headers, table, title=f"grouped GEMM on {args.device.type} ({args.dtype}; median of {args.iters})")


if __name__ == "__main__":
    main()

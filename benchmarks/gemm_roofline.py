"""This machine's fp32 GEMM rate: the roofline the training step is compared with.

Measured in the benchmark's own run, in a fresh process with the same thread count as the
implementations: a large square matmul (the best rate the BLAS reaches here) and the matmul
shapes the step itself runs (dense projections, LM head, one expert's rows at 8 and at the
sweep's largest expert count), each the best of a few timed repetitions.
"""
from __future__ import annotations

import time

SQUARE = 2048  # 17 GFLOP per product: long enough to reach the BLAS's steady rate


def gemm_rate(m: int, k: int, n: int, min_seconds: float = 0.05, repeats: int = 5) -> float:
    """Best GFLOP/s of torch.mm([m, k] @ [k, n]) in fp32 over `repeats` timed batches."""
    import torch
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up: BLAS init, page faults of out
    calls = max(1, int(min_seconds * 50e9 / (2 * m * k * n)))  # ~min_seconds at 50 GFLOP/s
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        best = max(best, 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9)
    return best


def step_shapes(a, max_experts: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the step's matmuls, by name; a: train_throughput.py's arguments."""
    tokens = a.batch * a.seq
    kv = a.kv_heads * (a.hidden // a.heads)
    return {"q/o projection": (tokens, a.hidden, a.hidden), "k/v projection": (tokens, a.hidden, kv),
            "LM head": (tokens, a.hidden, a.vocab),
            f"expert rows, {a.experts} experts": (tokens * a.top_k // a.experts, a.hidden, a.ffn),
            f"expert rows, {max_experts} experts": (max(1, tokens * a.top_k // max_experts), a.hidden, a.ffn)}


def measure(a, max_experts: int) -> dict[str, float]:
    """GFLOP/s of the square matmul ("square") and of each of the step's shapes."""
    rates = {"square": gemm_rate(SQUARE, SQUARE, SQUARE)}
    for name, (m, k, n) in step_shapes(a, max_experts).items():
        rates[name] = gemm_rate(m, k, n)
    return rates

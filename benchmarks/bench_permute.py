"""Permute / unpermute microbenchmark: effective GB/s of MoE token dispatch and combine.

    python benchmarks/bench_permute.py            # GPU: model shapes, every backend
    python benchmarks/bench_permute.py --tiny     # CPU smoke test (torch paths only)

Passes (T tokens, K slots each, C channels; bytes counted once per tensor element moved):
  permute fwd     x [T, C] -> x_perm [T*K, C]                    read T*C, write T*K*C
  permute bwd     grad_x_perm [T*K, C] -> grad_x [T, C]          read T*K*C, write T*C
  unpermute fwd   y_perm, gates -> y                             read T*K*C, write T*C
  unpermute bwd   grad_y, y_perm -> grad_y_perm, grad_gates      read T*C + T*K*C, write T*K*C
(index and gate traffic is small and not counted). Methods: the op's backends (triton, cuda_ext
when built, torch), and a plain torch path with the routing precomputed (index_select for the
gathers, index_add_ for the sums). "vs copy" compares with a device-to-device copy of the same
number of bytes (read + write), the practical bandwidth ceiling.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_args, device_banner, fmt, print_table, ratio, selected, try_time_ms, write_json  # noqa: E402

MODELS = {  # name: (tokens, hidden, experts, top-k)
    "Mixtral-8x7B": (16384, 4096, 8, 2),
    "Qwen3-30B-A3B": (16384, 2048, 128, 8),
    "EvoMoE-2B": (16384, 2048, 4, 2),
}
TINY_MODELS = {"tiny-8e": (512, 64, 8, 2), "tiny-32e": (256, 48, 32, 4)}


def routing(T, E, K, device):
    """Distinct experts per token, skewed towards low ids (like real routers)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(T, E, generator=g) * torch.linspace(2.0, 1.0, E)
    return scores.topk(K, dim=1).indices.to(device)


def backends(device, tiny):
    names = ["torch"]
    if device.type == "cuda" and not tiny:
        names.insert(0, "triton")
        from megatron_evomoe.ops import _ext
        names.insert(0, "cuda_ext" if _ext.load() is not None else "cuda_ext: " + _ext.describe())
    return names


def bench_model(args, model, T, C, E, K, table):
    from megatron_evomoe.ops.permute import permute, unpermute

    device, dtype = args.device, args.torch_dtype
    elt = torch.tensor([], dtype=dtype).element_size()
    idx = routing(T, E, K, device)
    x = torch.randn(T, C, device=device, dtype=dtype, requires_grad=True)
    gates = torch.rand(T, K, device=device, requires_grad=True)
    grad_x_perm = torch.randn(T * K, C, device=device, dtype=dtype)
    grad_y = torch.randn(T, C, device=device, dtype=dtype)
    bytes_ = {
        "permute fwd": (T * C + T * K * C) * elt,
        "permute bwd": (T * K * C + T * C) * elt,
        "unpermute fwd": (T * K * C + T * C) * elt,
        "unpermute bwd": (T * C + 2 * T * K * C) * elt,
    }
    results = {}  # (method, pass) -> (ms, note)
    for b in backends(device, args.tiny):
        if b.startswith("cuda_ext: "):
            for p in bytes_:
                results[("cuda_ext", p)] = (None, b.split(": ", 1)[1][:60])
            continue
        run = lambda b=b: permute(x, idx, E, backend=b)  # noqa: E731
        results[(b, "permute fwd")] = try_time_ms(run, device, args.warmup, args.iters)
        x_perm, row_map, _ = run()
        results[(b, "permute bwd")] = try_time_ms(
            lambda: torch.autograd.grad(x_perm, x, grad_x_perm, retain_graph=True), device, args.warmup, args.iters)
        y_perm = x_perm.detach().requires_grad_()
        results[(b, "unpermute fwd")] = try_time_ms(lambda b=b: unpermute(y_perm, row_map, gates, backend=b),
                                                    device, args.warmup, args.iters)
        y = unpermute(y_perm, row_map, gates, backend=b)
        results[(b, "unpermute bwd")] = try_time_ms(
            lambda: torch.autograd.grad(y, (y_perm, gates), grad_y, retain_graph=True), device, args.warmup, args.iters)
        del x_perm, y_perm, y

    # Plain torch with the routing already known (what a hand-written dispatcher does).
    x_perm, row_map, _ = permute(x.detach(), idx, E, backend="torch")
    token_of_row = torch.empty(T * K, dtype=torch.int64, device=device)
    token_of_row[row_map.reshape(-1)] = torch.arange(T, device=device).repeat_interleave(K)
    gate_of_row = torch.empty(T * K, dtype=gates.dtype, device=device)
    gate_of_row[row_map.reshape(-1)] = gates.detach().reshape(-1)
    xd, yp = x.detach(), x_perm
    plain = {
        "permute fwd": lambda: xd.index_select(0, token_of_row),
        "permute bwd": lambda: torch.zeros_like(xd).index_add_(0, token_of_row, grad_x_perm),
        "unpermute fwd": lambda: torch.zeros_like(xd).index_add_(0, token_of_row, yp * gate_of_row[:, None].to(dtype)),
        "unpermute bwd": lambda: (grad_y.index_select(0, token_of_row) * gate_of_row[:, None].to(dtype),
                                  (grad_y.index_select(0, token_of_row) * yp).sum(1)),
    }
    for p, fn in plain.items():
        results[("index_select/index_add_", p)] = try_time_ms(fn, device, args.warmup, args.iters)

    digits = 3 if args.tiny else 1
    for p, nbytes in bytes_.items():
        src = torch.empty(nbytes // 2 // elt, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        t_copy, _ = try_time_ms(lambda: dst.copy_(src), device, args.warmup, args.iters)
        copy_gbs = nbytes / (t_copy * 1e-3) / 1e9 if t_copy else None
        entries = [(m, pp) for (m, pp) in results if pp == p]
        gbs = {m: (None if results[(m, p)][0] is None else nbytes / (results[(m, p)][0] * 1e-3) / 1e9)
               for m, _ in entries}
        for m, _ in entries:
            ms, note = results[(m, p)]
            alts = [v for n, v in gbs.items() if n != m and v is not None]
            table.append([model, f"T={T} C={C} E={E} K={K}", p, m, fmt(ms, 3), fmt(gbs[m], digits),
                          ratio(gbs[m], max(alts) if alts else None), ratio(gbs[m], copy_gbs), note])
        table.append([model, f"T={T} C={C} E={E} K={K}", p, "device copy (same bytes)", fmt(t_copy, 3),
                      fmt(copy_gbs, digits), "", "", ""])
        del src, dst


def main(argv=None):
    args = bench_args(__doc__.splitlines()[0], argv)
    device_banner(args.device, f"permute / unpermute, {args.dtype}")
    table = []
    headers = ["model", "shape", "pass", "method", "ms", "GB/s", "vs best alt", "vs copy", "note"]
    for model, (T, C, E, K) in selected(TINY_MODELS if args.tiny else MODELS, args).items():
        bench_model(args, model, T, C, E, K, table)
        write_json(args, {"permute": (headers, table)})  # after each model: a time-out keeps them
    print_table(headers, table, title=f"permute / unpermute on {args.device.type} ({args.dtype}; median of {args.iters})")


if __name__ == "__main__":
    main()

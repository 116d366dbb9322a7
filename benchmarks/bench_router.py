"""Router microbenchmark: the fused DTR kernel vs eager PyTorch DTR (bilinear) vs materialised DTR,
and the fused softmax + top-k vs torch.softmax + torch.topk.

    python benchmarks/bench_router.py            # GPU: the paper's router (16k tokens, C=2048, H=32,
                                                 #      R=8, D=16, E=4, top-1) and a few other sizes
    python benchmarks/bench_router.py --tiny     # CPU smoke test (torch paths only)

DTR methods (same inputs: z [T, C] with 70% text / 30% image tokens, router parameters in --dtype):
  fused         megatron_evomoe.ops.dtr.dtr_route(backend="triton"): one kernel per token block for
                the forward, four for the backward (GPU only)
  eager         dtr_route(backend="torch"): the bilinear form with einsums, tokens grouped by modality
  materialised  builds Theta_down [T, 2R, C] and Theta_up [T, D, R] per token, as the paper writes it
                (T*2R*C floats: 2 GiB at the main size in fp32)
Passes: "fwd" (routing outputs only) and "fwd+bwd" (a loss over logits, gates and prob_sum, then
backward to z and every router parameter). Speed-ups are relative to "eager"; "peak MiB" is the
CUDA memory high-water mark of one fwd+bwd above what the inputs hold.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_args, device_banner, fmt, print_table, ratio, selected, try_time_ms, write_json  # noqa: E402

# name: (T, C, H, R, D, E, K)
SHAPES = {
    "paper (EvoMoE DTR)": (16384, 2048, 32, 8, 16, 4, 1),
    "paper, C=4096": (16384, 4096, 32, 8, 16, 4, 1),
    "small hypernet": (16384, 2048, 16, 4, 8, 4, 1),
    "large hypernet": (8192, 2048, 64, 16, 32, 8, 2),
}
TINY_SHAPES = {
    "tiny": (256, 64, 8, 4, 8, 4, 1),
    "tiny, top-2": (512, 128, 16, 8, 16, 8, 2),
}
TOPK_SHAPES = {"E=4 k=1": (16384, 4, 1), "E=64 k=2": (16384, 64, 2), "E=128 k=8": (16384, 128, 8)}
TINY_TOPK_SHAPES = {"E=8 k=2": (1024, 8, 2)}


def make_inputs(T, C, H, R, D, E, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    params = [rnd(2, H, C, std=C ** -0.5), rnd(2, H, std=0.5), rnd(2, H, 2 * R, C, std=0.5 * (C * H) ** -0.5),
              rnd(2, 2 * R, C, std=0.5 * C ** -0.5), rnd(2, H, D, R, std=0.5 * (H * R) ** -0.5),
              rnd(2, D, R, std=0.5 * R ** -0.5), rnd(E, D, std=D ** -0.5), rnd(E, std=0.5)]
    z = rnd(T, C, std=1.0)
    mod = (torch.rand(T, generator=g) < 0.3).long().to(device)   # 1 = image
    return z, mod, params


def dtr_methods(device, tiny):
    from megatron_evomoe.kernels.dtr_reference import dtr_reference_materialized
    from megatron_evomoe.ops.dtr import dtr_route

    methods = {
        "eager": lambda *a, **k: dtr_route(*a, **k, backend="torch"),
        "materialised": dtr_reference_materialized,
    }
    if device.type == "cuda" and not tiny:
        methods = {"fused": lambda *a, **k: dtr_route(*a, **k, backend="triton"), **methods}
    return methods


def bench_dtr(args, rows):
    device, dtype = args.device, args.torch_dtype
    shapes = selected(TINY_SHAPES if args.tiny else SHAPES, args)
    for name, (T, C, H, R, D, E, K) in shapes.items():
        z, mod, params = make_inputs(T, C, H, R, D, E, device, dtype)
        leaves = [z.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        times = {}
        for method, fn in dtr_methods(device, args.tiny).items():
            def fwd():
                with torch.no_grad():
                    return fn(z, mod, *params, K)

            def fwd_bwd():
                for t in leaves:
                    t.grad = None
                logits, probs, idx, gates, prob_sum, counts = fn(leaves[0], mod, *leaves[1:], K)
                (logits.float().square().mean() + gates.sum() + prob_sum.sum() * 1e-3).backward()

            t_f, why_f = try_time_ms(fwd, device, args.warmup, args.iters)
            t_b, why_b = try_time_ms(fwd_bwd, device, args.warmup, args.iters)
            peak = None
            if device.type == "cuda" and t_b is not None:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            times[method] = (t_f, t_b, peak, why_f or why_b)
        ref_f, ref_b = times["eager"][0], times["eager"][1]
        for method, (t_f, t_b, peak, why) in times.items():
            rows.append([name, f"T={T} C={C} H={H} R={R} D={D} E={E} k={K}", method, fmt(t_f, 3), ratio(ref_f, t_f),
                         fmt(t_b, 3), ratio(ref_b, t_b), fmt(peak, 0), why])
        del z, params, leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_topk(args, rows):
    from megatron_evomoe.ops.topk_softmax import topk_softmax

    device = args.device
    backends = ["torch"] + (["triton"] if device.type == "cuda" and not args.tiny else [])
    for name, (T, E, K) in (TINY_TOPK_SHAPES if args.tiny else TOPK_SHAPES).items():
        logits = torch.randn(T, E, device=device, dtype=args.torch_dtype)
        times = {}
        for backend in backends:
            x = logits.clone().requires_grad_()

            def fwd_bwd():
                probs, idx, gates = topk_softmax(x, K, True, backend=backend)
                (gates.sum() + probs.sum()).backward()

            with torch.no_grad():
                t_f, why = try_time_ms(lambda: topk_softmax(logits, K, True, backend=backend), device,
                                       args.warmup, args.iters)
            t_b, why_b = try_time_ms(fwd_bwd, device, args.warmup, args.iters)
            times[backend] = (t_f, t_b, why or why_b)
        for backend, (t_f, t_b, why) in times.items():
            rows.append([name, T, backend, fmt(t_f, 3), ratio(times["torch"][0], t_f), fmt(t_b, 3),
                         ratio(times["torch"][1], t_b), why])


def main(argv=None):
    args = bench_args(__doc__.split("\n")[0], argv)
    device_banner(args.device, f"router benchmark ({args.dtype})")
    if args.device.type == "cuda" and not args.tiny:
        print("fused = Triton kernels compiled for this GPU (first call compiles; warm-up absorbs it)")
    dtr_rows, topk_rows = [], []
    bench_dtr(args, dtr_rows)
    dtr_headers = ["shape", "sizes", "method", "fwd ms", "fwd speed-up", "fwd+bwd ms", "fwd+bwd speed-up",
                   "peak MiB", "note"]
    print_table(dtr_headers, dtr_rows, title="Dynamic Token-aware Router (speed-up = eager time / method time)")
    write_json(args, {"dtr": (dtr_headers, dtr_rows)})  # before the top-k table: a time-out keeps it
    if not args.only:  # --only names DTR shapes; the top-k table has its own
        bench_topk(args, topk_rows)
    topk_headers = ["shape", "tokens", "backend", "fwd ms", "fwd speed-up", "fwd+bwd ms", "fwd+bwd speed-up", "note"]
    print_table(topk_headers, topk_rows, title="softmax + top-k of the linear router (speed-up vs torch)")
    write_json(args, {"dtr": (dtr_headers, dtr_rows), "topk": (topk_headers, topk_rows)})
    if args.device.type != "cuda":
        print("\nCPU run: times above are PyTorch on CPU, not kernel performance.")


if __name__ == "__main__":
    main()

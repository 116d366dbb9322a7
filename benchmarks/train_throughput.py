#!/usr/bin/env python
"""End-to-end training-step throughput of a small MoE decoder: this project vs Hugging Face Mixtral.

Both models get the identical configuration (layers, hidden, FFN, heads, experts, top-k, vocab,
sequence length, batch, dtype, AdamW) and are measured side by side in one run, each in its own
subprocess so that peak memory (max RSS on CPU, max allocated on CUDA) is per implementation.
Each runs as its framework would by default: ours with the backends `auto` picks (on CPU the
compiled csrc kernels, `cpu_ext`) and the trainer's optimizer (fused AdamW); Mixtral with
transformers' default experts implementation and its Trainer's default fused AdamW. The compiled
rows add torch.compile (inductor) per decoder layer: ours with parallel/compile.py's
apply_compile (what train.compile does), Mixtral's layers the same way; compile time is the
first step's excess over the median step, reported apart and not in the step time.

The same run measures the machine's fp32 GEMM roofline (gemm_roofline.py, same thread count) and
the step's FLOPs (step_flops.py: FlopCounterMode, cross-checked by a hand count), and prints each
implementation's model FLOP/s as a fraction of that roofline.

    python benchmarks/train_throughput.py                      # the comparison + expert sweep
    python benchmarks/train_throughput.py --experts 8 --quick  # fewer timed steps
    python benchmarks/train_throughput.py --no-compile         # without the compiled rows

Tables: the GEMM roofline; tokens/s, model FLOP/s and peak memory of a full step (forward +
backward + optimizer); then, for 4..64 experts at top-2 with equal active parameters,
forward+backward and optimizer time apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_ours(a):
    import torch
    from megatron_evomoe.config import load_config
    from megatron_evomoe.model.llm import DecoderLM
    from megatron_evomoe.moe.upcycling import upcycle_to_moe

    cfg = load_config(None, [
        "--stages=[{name: s}]", f"--model.vocab_size={a.vocab}", f"--model.hidden_size={a.hidden}",
        f"--model.num_layers={a.layers}", f"--model.num_heads={a.heads}", f"--model.num_kv_heads={a.kv_heads}",
        f"--model.ffn_hidden_size={a.ffn}", f"--model.max_seq_len={a.seq}", f"--data.seq_len={a.seq}",
        "--vision.enabled=false", f"--moe.num_experts={a.experts}", f"--moe.top_k={a.top_k}", "--moe.layers=all",
        "--moe.init=scratch", "--router.type=linear", "--moe.aux_loss_coeff=0.01",
        f"--moe.expert_backend={a.expert_backend}"])
    model = DecoderLM(cfg.model)
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        layer.mlp = upcycle_to_moe(layer.mlp, cfg, gen)

    def loss_fn(ids):
        h = model.embed(ids)
        logits, aux = model(h, torch.zeros_like(ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return loss + aux
    return model, loss_fn


def build_hf(a):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
                        num_experts_per_tok=a.top_k, max_position_embeddings=a.seq, router_aux_loss_coef=0.01,
                        output_router_logits=True, attn_implementation="sdpa")
    model = MixtralForCausalLM(cfg)

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss
    return model, loss_fn


def compile_layers(a, model):
    """torch.compile (inductor) each decoder layer in place: ours as train.compile does, Mixtral alike."""
    if a.impl == "ours":
        from megatron_evomoe.parallel.compile import apply_compile
        return apply_compile(model)
    for layer in model.model.layers:
        layer.compile()
    return model


def worker(a) -> dict:
    """One implementation, one process: time steps, report medians and peak memory."""
    import torch
    torch.manual_seed(0)
    if a.impl == "ours" and a.device == "cpu" and a.cpu_allocator == "caching":
        from megatron_evomoe.training.cpu_allocator import use_caching_allocator
        use_caching_allocator()  # what the trainer does on CPU (train.cpu_allocator)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mode == "roofline":
        from gemm_roofline import measure
        return {"rates": measure(a, max(sweep_counts(a) + [a.experts]))}
    device = torch.device(a.device)
    model, loss_fn = (build_ours if a.impl == "ours" else build_hf)(a)
    model.to(device).train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)
    if a.mode == "flops":
        from step_flops import counted_flops
        return {"flops": counted_flops(loss_fn, ids)}
    if a.compile:
        compile_layers(a, model)
    opt = build_optimizer(a, model, device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fb, step, first = [], [], 0.0
    for i in range(a.warmup + a.iters):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = loss_fn(ids)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        if i == 0:
            first = t2 - t0
        if i >= a.warmup:
            fb.append(t1 - t0)
            step.append(t2 - t1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # KiB -> MiB, whole process
    fwd_bwd, optim = statistics.median(fb), statistics.median(step)
    return {"impl": a.impl, "experts": a.experts, "fwd_bwd_s": fwd_bwd, "optim_s": optim,
            "first_step_excess_s": first - fwd_bwd - optim,  # compile time in a compiled row
            "params": sum(p.numel() for p in model.parameters()), "peak_mib": peak,
            "base_rss_mib": base_rss / 1024, "loss": float(loss)}


def build_optimizer(a, model, device):
    """Each implementation's own default: ours is what the trainer builds (training/optim.py);
    Hugging Face's Trainer defaults to torch's fused AdamW ("adamw_torch_fused") with torch >= 2.8."""
    import torch
    if a.impl == "ours":
        from megatron_evomoe.training.optim import build_optimizer as ours
        return ours(list(model.named_parameters()), lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), device=device)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(a, impl: str, experts: int, expert_backend: str = "auto", cpu_allocator: str = "caching",
            compile_: bool = False, mode: str = "step") -> dict:
    """One worker process; a compiled run that fails or passes --compile-timeout comes back as
    {"error": why} (the table says so), any other failure raises."""
    args = [sys.executable, __file__, "--worker", "--mode", mode, "--impl", impl, "--experts", str(experts),
            "--expert-backend", expert_backend, "--cpu-allocator", cpu_allocator, "--sweep", a.sweep]
    for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "seq", "batch", "top_k", "warmup", "iters",
              "threads", "device"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    args += ["--bf16"] * a.bf16 + ["--compile"] * compile_
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=a.compile_timeout if compile_ else None)
    except subprocess.TimeoutExpired:
        return {"error": f"not done within --compile-timeout {a.compile_timeout:.0f} s"}
    if r.returncode != 0:
        why = f"{impl} with {experts} experts failed:\n{r.stderr[-3000:]}"
        if compile_:
            return {"error": "compile failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
        raise RuntimeError(why)
    return json.loads(r.stdout.strip().splitlines()[-1])


def step_time(r: dict) -> float:
    return r["fwd_bwd_s"] + r["optim_s"] if "error" not in r else float("inf")


def best_of_interleaved(a, runs, key) -> list[dict]:
    """Each run (impl, experts, expert backend, allocator, compile, mode) `a.repeats` times, in rounds
    that go through all of them in turn (so drifting machine load hits every run alike); the best
    result of each by `key` (smallest). Fresh processes each time: the spread between processes is
    larger than within one."""
    results = [[] for _ in runs]
    for _ in range(a.repeats):
        for i, run in enumerate(runs):
            results[i].append(run_one(a, *run))
    return [min(r, key=key) for r in results]


def sweep_counts(a) -> list[int]:
    return [int(x) for x in a.sweep.split(",")] if a.sweep else []


def print_flops(a, hf_version) -> float:
    """Counts the step's FLOPs (FlopCounterMode on each implementation, and by hand), prints them;
    returns the count the FLOP/s columns use: Mixtral's if transformers is installed, else ours."""
    from step_flops import hand_flops
    ours = run_one(a, "ours", a.experts, mode="flops")["flops"]
    hf = run_one(a, "hf", a.experts, mode="flops")["flops"] if hf_version else None
    hand = hand_flops(a)
    hf_txt = f"Mixtral {hf / 1e9:.4g}, " if hf else ""
    print(f"step FLOPs (forward + backward), GFLOP: FlopCounterMode {hf_txt}ours {ours / 1e9:.4g}; "
          f"hand count {hand / 1e9:.4g} (experts, attention projections and full S x S attention, router, LM head)")
    return hf or ours


def print_roofline(a, rates: dict) -> float:
    """Prints the measured GEMM rates; returns the square-GEMM rate (the roofline, GFLOP/s)."""
    from gemm_roofline import SQUARE, step_shapes
    threads = a.threads or os.cpu_count()
    print(f"\nGEMM roofline, fp32, {threads} threads: {SQUARE}^3 square {rates['square']:.1f} GFLOP/s; at the step's "
          "shapes (M x K x N):")
    for name, (m, k, n) in step_shapes(a, max(sweep_counts(a) + [a.experts])).items():
        print(f"  {name:<28}{m:>6} x {k} x {n:<6}{rates[name]:>8.1f} GFLOP/s{rates[name] / rates['square']:>6.2f}")
    return rates["square"]


def print_sweep(a, hf_version) -> None:
    """Forward+backward and optimizer time at each expert count (top-k fixed: equal active
    parameters), ours (and ours compiled with --compiled-sweep) beside Mixtral, each relative to 8."""
    counts = sweep_counts(a)
    columns = [("ours", False, "ours")] + [("ours", True, "compiled")] * a.compiled_sweep
    columns += [("hf", False, "HF")] * bool(hf_version)
    runs = [(impl, e, "auto", "caching", comp) for e in counts for impl, comp, _ in columns]
    best = dict(zip(runs, best_of_interleaved(a, runs, key=lambda r: r.get("fwd_bwd_s", float("inf")))))
    ref_count = 8 if 8 in counts else counts[0]
    print(f"\nexpert scaling, top-{a.top_k} (equal active parameters): forward+backward and optimizer step apart")
    print(f"{'experts':>8}" + "".join(f"  {label + ' fwd+bwd':>17}{'x vs ' + str(ref_count):>8}{label + ' optim':>15}"
                                      for *_, label in columns))
    for e in counts:
        cells = []
        for impl, comp, _ in columns:
            r, ref = best[(impl, e, "auto", "caching", comp)], best[(impl, ref_count, "auto", "caching", comp)]
            cells.append(f"  {r['fwd_bwd_s']:>17.3f}{r['fwd_bwd_s'] / ref['fwd_bwd_s']:>8.2f}{r['optim_s']:>15.3f}"
                         if "error" not in r and "error" not in ref else f"  {r.get('error', ref.get('error')):>40}")
        print(f"{e:>8}" + "".join(cells))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "hf"), default="ours")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--sweep", default="4,8,16,32,64", help="expert counts for the scaling table ('' to skip)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration (fastest reported)")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps, 1 repeat")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled rows")
    p.add_argument("--compiled-sweep", action="store_true", help="add ours compiled to the expert scaling table")
    p.add_argument("--compile-timeout", type=float, default=1200, help="seconds a compiled row's process may take")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # worker: compile the layers
    p.add_argument("--mode", choices=("step", "roofline", "flops"), default="step", help=argparse.SUPPRESS)
    p.add_argument("--expert-backend", default="auto", help=argparse.SUPPRESS)  # worker: moe.expert_backend
    p.add_argument("--cpu-allocator", default="caching", help=argparse.SUPPRESS)  # worker: train.cpu_allocator
    p.set_defaults(compile=None)
    a = p.parse_args(argv)
    a.compile = (not a.worker) if a.compile is None else a.compile  # the table has compiled rows by default
    if a.quick:
        a.warmup, a.iters, a.repeats = 1, 2, 1
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    tokens = a.batch * a.seq
    print(f"== training-step throughput, {date.today()}, {platform.machine()} {platform.processor()}, "
          f"{os.cpu_count()} CPUs visible, device {a.device}, {'bf16' if a.bf16 else 'fp32'}")
    print(f"config: {a.layers} layers, hidden {a.hidden}, FFN {a.ffn}, heads {a.heads}/{a.kv_heads}, vocab {a.vocab}, "
          f"batch {a.batch} x {a.seq} tokens, top-{a.top_k}; median of {a.iters} steps after {a.warmup} warm-up, "
          f"fastest of {a.repeats} interleaved processes")
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    flops = print_flops(a, hf_version)
    # Rows 2 and 3 take away, in turn, the CPU allocator setting and the compiled csrc kernels
    # (cpu_ext), so the table shows what each contributes; the compiled rows add torch.compile.
    variants = [("megatron_evomoe", "ours", "auto", "caching", False),
                ("  without caching allocator", "ours", "auto", "system", False),
                ("  and with PyTorch-only ops", "ours", "torch", "system", False)]
    if a.compile:
        variants.append(("megatron_evomoe, compiled", "ours", "auto", "caching", True))
    if hf_version:
        variants.append((f"transformers {hf_version} Mixtral", "hf", "auto", "caching", False))
        if a.compile:
            variants.append((f"transformers {hf_version} Mixtral, compiled", "hf", "auto", "caching", True))
    roofline_run = ("ours", a.experts, "auto", "caching", False, "roofline")
    runs = [(impl, a.experts, backend, alloc, comp) for _, impl, backend, alloc, comp in variants] + [roofline_run]
    *rows, roofline = best_of_interleaved(
        a, runs, key=lambda r: -r["rates"]["square"] if "rates" in r else step_time(r))
    peak = print_roofline(a, roofline["rates"])
    hf = next((r for (_, impl, *_, comp), r in zip(variants, rows) if impl == "hf" and not comp), None)
    print(f"\n{'implementation':<44}{'experts':>8}{'step s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>9}"
          f"{'peak MiB':>10}{'vs HF':>7}{'compile s':>10}")
    for (name, *_, comp), r in zip(variants, rows):
        if "error" in r:
            print(f"{name:<44}{a.experts:>8}  {r['error']}")
            continue
        s = step_time(r)
        ratio = f"{step_time(hf) / s:>6.2f}x" if hf else f"{'-':>7}"
        compile_s = f"{r['first_step_excess_s']:>10.1f}" if comp else f"{'-':>10}"
        print(f"{name:<44}{r['experts']:>8}{s:>9.3f}{tokens / s:>10.0f}{flops / s / 1e9:>9.1f}"
              f"{flops / s / 1e9 / peak:>9.2f}{r['peak_mib']:>10.0f}{ratio}{compile_s}")
    if not hf_version:
        print("transformers is not installed: no Hugging Face comparison (pip install transformers)")
    print("(GFLOP/s: the step's model FLOPs above / step time; of peak: that over the square-GEMM rate; "
          "compile s: the first step's excess over the median step, not in step s)")
    if a.sweep:
        print_sweep(a, hf_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())

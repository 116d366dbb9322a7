#!/usr/bin/env python
"""End-to-end training-step throughput of a small MoE decoder: this project vs Hugging Face Mixtral.

Both models get the identical configuration (layers, hidden, FFN, heads, experts, top-k, vocab,
sequence length, batch, dtype, AdamW) and are measured side by side in one run, each in its own
subprocess so that peak memory (max RSS on CPU, max allocated on CUDA) is per implementation.
Each runs as its framework would by default: ours with the backends `auto` picks (on CPU the
compiled csrc kernels, `cpu_ext`) and the trainer's optimizer (fused AdamW); Mixtral with
transformers' default experts implementation and its Trainer's default fused AdamW.

    python benchmarks/train_throughput.py                      # the comparison + expert sweep
    python benchmarks/train_throughput.py --experts 8 --quick  # fewer timed steps

Tables: tokens/s and peak memory of a full step (forward + backward + optimizer); then, for
4..64 experts at top-2 with equal active parameters, forward+backward and optimizer time apart.
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


def worker(a) -> dict:
    """One implementation, one process: time steps, report medians and peak memory."""
    import torch
    torch.manual_seed(0)
    if a.impl == "ours" and a.device == "cpu" and a.cpu_allocator == "caching":
        from megatron_evomoe.training.cpu_allocator import use_caching_allocator
        use_caching_allocator()  # what the trainer does on CPU (train.cpu_allocator)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model, loss_fn = (build_ours if a.impl == "ours" else build_hf)(a)
    model.to(device).train()
    opt = build_optimizer(a, model, device)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fb, step = [], []
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
        if i >= a.warmup:
            fb.append(t1 - t0)
            step.append(t2 - t1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # KiB -> MiB, whole process
    return {"impl": a.impl, "experts": a.experts, "fwd_bwd_s": statistics.median(fb), "optim_s": statistics.median(step),
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


def run_one(a, impl: str, experts: int, expert_backend: str = "auto", cpu_allocator: str = "caching") -> dict:
    args = [sys.executable, __file__, "--worker", "--impl", impl, "--experts", str(experts),
            "--expert-backend", expert_backend, "--cpu-allocator", cpu_allocator]
    for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "seq", "batch", "top_k", "warmup", "iters",
              "threads", "device"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.bf16:
        args.append("--bf16")
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"{impl} with {experts} experts failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def best_of_interleaved(a, runs, key) -> list[dict]:
    """Each run (impl, experts, expert backend, allocator) `a.repeats` times, in rounds that go through
    all of them in turn (so drifting machine load hits every run alike); the fastest result of each
    by `key`. Fresh processes each time: the spread between processes is larger than within one."""
    results = [[] for _ in runs]
    for _ in range(a.repeats):
        for i, run in enumerate(runs):
            results[i].append(run_one(a, *run))
    return [min(r, key=key) for r in results]


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
    p.add_argument("--expert-backend", default="auto", help=argparse.SUPPRESS)  # worker: moe.expert_backend
    p.add_argument("--cpu-allocator", default="caching", help=argparse.SUPPRESS)  # worker: train.cpu_allocator
    a = p.parse_args(argv)
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
    # Rows 2 and 3 take away, in turn, the CPU allocator setting and the compiled csrc kernels
    # (cpu_ext), so the table shows what each contributes.
    variants = [("megatron_evomoe", "auto", "caching"), ("  without caching allocator", "auto", "system"),
                ("  and with PyTorch-only ops", "torch", "system")]
    runs = [("ours", a.experts, backend, alloc) for _, backend, alloc in variants]
    names = [name for name, _, _ in variants]
    if hf_version:
        runs.append(("hf", a.experts, "auto", "caching"))
        names.append(f"transformers {hf_version} Mixtral")
    rows = best_of_interleaved(a, runs, key=lambda r: r["fwd_bwd_s"] + r["optim_s"])
    hf = rows[-1] if hf_version else None
    print(f"\n{'implementation':<38}{'experts':>8}{'step s':>9}{'tokens/s':>11}{'peak MiB':>10}{'vs HF':>8}")
    for name, r in zip(names, rows):
        s = r["fwd_bwd_s"] + r["optim_s"]
        ratio = (hf["fwd_bwd_s"] + hf["optim_s"]) / s if hf else float("nan")
        print(f"{name:<38}{r['experts']:>8}{s:>9.3f}{tokens / s:>11.0f}{r['peak_mib']:>10.0f}{ratio:>7.2f}x")
    if not hf_version:
        print("transformers is not installed: no Hugging Face comparison (pip install transformers)")
    if a.sweep:
        counts = [int(x) for x in a.sweep.split(",")]
        print(f"\nexpert scaling, top-{a.top_k} (equal active parameters): forward+backward and optimizer step apart")
        print(f"{'experts':>8}  {'ours fwd+bwd':>13}{'x vs 8':>8}{'ours optim':>11}  "
              f"{'HF fwd+bwd':>11}{'x vs 8':>8}{'HF optim':>9}")
        impls = ["ours", "hf"] if hf_version else ["ours"]
        runs = [(impl, e, "auto", "caching") for e in counts for impl in impls]
        best = dict(zip(runs, best_of_interleaved(a, runs, key=lambda r: r["fwd_bwd_s"])))
        res = {e: (best[("ours", e, "auto", "caching")], best.get(("hf", e, "auto", "caching"))) for e in counts}
        ref = res.get(8, res[counts[0]])
        for e in counts:
            o, h = res[e]
            hf_txt = (f"{h['fwd_bwd_s']:>11.3f}{h['fwd_bwd_s'] / ref[1]['fwd_bwd_s']:>8.2f}{h['optim_s']:>9.3f}"
                      if h else f"{'-':>11}{'-':>8}{'-':>9}")
            print(f"{e:>8}  {o['fwd_bwd_s']:>13.3f}{o['fwd_bwd_s'] / ref[0]['fwd_bwd_s']:>8.2f}{o['optim_s']:>11.3f}  {hf_txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor parallelism of the decoder options for Phi and StableLM, and of Qwen2-MoE's shared expert.

One world-2 spawn runs every layout back to back (as test_equivalence.py does); each layout trains
3 AdamW steps of a tiny multimodal model and must reproduce the single-process run:
  * StableLM-like: LayerNorm (with bias), partial rotary (half of each head), q/k/v biases, MoE on
    layers 1 and 3 (DTR router, top-2) with a shared expert of width 32: TP2, TP2 + SP, EP2;
  * Phi-like: LayerNorm, partial rotary, parallel residual, GELU(tanh) FFN, biases on q/k/v, the
    attention output, both FFN linears and the LM head (vocabulary 51: TP pads the head's bias),
    dense: TP2, TP2 + SP.
Checked: losses and gradient norms of every step (1e-5 relative), the trained parameters gathered
back (1e-4 absolute), which tensors are sharded (column-parallel biases split with the output,
row-parallel and LayerNorm biases replicated, the shared expert's FFN split and its gate
replicated), and that replicated tensors are bitwise equal on both ranks. Under SP a LayerNorm
bias or a row-parallel bias sees only its sequence shard: a missing all-reduce of its gradient
shows as a loss or parameter difference here.
"""
from __future__ import annotations

import torch

from megatron_evomoe.parallel import full_state_dict
from megatron_evomoe.parallel.state import named_shard_specs

from . import common as C
from .dist_utils import run_distributed

NUM_STEPS, GLOBAL_BATCH, NUM_MICRO = 3, 8, 2
STABLELM = ("--model.norm=layernorm", "--model.rotary_pct=0.5", "--model.qkv_bias=true",
            "--moe.shared_expert_size=32")
PHI = ("--model.norm=layernorm", "--model.rotary_pct=0.5", "--model.parallel_residual=true",
       "--model.ffn_activation=gelu_tanh", "--model.qkv_bias=true", "--model.attn_out_bias=true",
       "--model.mlp_bias=true", "--model.lm_head_bias=true", "--moe.layers=none", "--stages=[{name: s}]")
LAYOUTS = {  # name: (model options, tiny_cfg kwargs)
    "stablelm_tp2": (STABLELM, dict(tp=2)),
    "stablelm_tp2_sp": (STABLELM, dict(tp=2, sp=True)),
    "stablelm_ep2": (STABLELM, dict(ep=2)),
    "phi_tp2": (PHI, dict(tp=2)),
    "phi_tp2_sp": (PHI, dict(tp=2, sp=True)),
}


def _cfg(name: str, single: bool = False):
    options, kw = LAYOUTS[name]
    return C.tiny_cfg(**({} if single else kw), extra=options)


def _worker(rank, world_size):
    out = {}
    for name in LAYOUTS:
        steps = C.make_batches(NUM_STEPS, GLOBAL_BATCH)
        state, model, res = C.parallel_run(_cfg(name), steps, NUM_MICRO, rank, world_size)
        specs = named_shard_specs(model)
        res["full"] = full_state_dict(model, state)
        res["shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        res["replicated"] = {n: p.detach().clone() for n, p in model.named_parameters() if n not in specs}
        out[name] = res
    return out


def _comparable(key: str, t: torch.Tensor) -> torch.Tensor:
    """Drop what has no true gradient, where AdamW turns rounding noise into whole steps: the key
    bias of the vision tower's fused qkv, and the LLM's key bias (q.b_k shifts all scores of a query
    equally; RoPE breaks that only on the rotated half, so the whole bias is left out)."""
    if key.startswith("vision.") and key.endswith("qkv.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t[:0] if key.endswith("attn.wk.bias") else t


def _check_sharding(name: str, shapes: dict, ref: dict) -> None:
    tp = LAYOUTS[name][1].get("tp", 1)
    for n, full in ref.items():
        if not n.startswith("llm.") or n not in shapes:
            continue
        got, split0 = shapes[n], (-(-full[0] // tp),) + full[1:]
        column = any(s in n for s in (".attn.wq.", ".attn.wk.", ".attn.wv.", ".mlp.w_gate.", ".mlp.w_up.",
                                      ".shared_expert.w_gate.", ".shared_expert.w_up.", "llm.lm_head."))
        if column:  # weight rows and bias split with the output features (vocabulary padded)
            assert got == split0, f"{name}: {n} {got} vs full {full}"
        elif ".attn.wo.weight" in n or ".mlp.w_down.weight" in n or ".shared_expert.w_down." in n:
            assert got == (full[0], full[1] // tp), f"{name}: {n} {got}"
        elif n.endswith(".bias") or ".shared_expert.gate." in n or "norm." in n:
            assert got == full, f"{name}: {n} should be replicated, is {got}"  # row-parallel / LN bias, gate


def test_tp_of_phi_and_stablelm_options_and_shared_expert():
    per_rank = run_distributed(_worker, 2, timeout=400)
    refs = {}  # one single-process run per model (the layouts of a model share it)
    for name in LAYOUTS:
        cfg = _cfg(name, single=True)
        if LAYOUTS[name][0] not in refs:
            refs[LAYOUTS[name][0]] = C.reference(cfg, C.make_batches(NUM_STEPS, GLOBAL_BATCH), NUM_MICRO)
        ref = refs[LAYOUTS[name][0]]
        ref_shapes = {n: tuple(p.shape) for n, p in C.build_model(cfg).named_parameters()}
        assert any(n.endswith(("attn_norm.bias", "wo.bias", "shared_expert.gate.weight")) for n in ref_shapes)
        for rank, res in enumerate(r[name] for r in per_rank):
            where = f"{name} rank {rank}"
            torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5,
                                       atol=0, msg=lambda m: f"{where}: losses differ\n{m}")
            torch.testing.assert_close(torch.tensor(res["grad_norms"]), torch.tensor(ref["grad_norms"]),
                                       rtol=1e-5, atol=0, msg=lambda m: f"{where}: grad norms differ\n{m}")
            assert set(res["full"]) == set(ref["state_dict"]), where
            for k, want in ref["state_dict"].items():
                torch.testing.assert_close(_comparable(k, res["full"][k]), _comparable(k, want), rtol=0, atol=1e-4,
                                           msg=lambda m: f"{where}: {k}\n{m}")
            _check_sharding(name, res["shapes"], ref_shapes)
        a, b = (r[name]["replicated"] for r in per_rank)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the shared expert was trained (its output projection starts at zero when upcycled)
    assert refs[STABLELM]["state_dict"]["llm.layers.1.mlp.shared_expert.w_down.weight"].abs().max() > 1e-3

"""Tensor parallelism of the decoder options for Phi and StableLM, and of Qwen2-MoE's shared expert.

One world-2 spawn runs every layout back to back (as test_equivalence.py does); each layout trains
3 AdamW steps of a tiny multimodal model and must reproduce the single-process run:
  * StableLM-like: LayerNorm (with bias), partial rotary (half of each head), q/k/v biases, MoE on
    layers 1 and 3 (DTR router, top-2) with a shared expert of width 32: TP2, TP2 + SP, EP2;
  * Phi-like: LayerNorm, partial rotary, parallel residual, GELU(tanh) FFN, biases on q/k/v, the
    attention output, both FFN linears and the LM head (vocabulary 51: TP pads the head's bias),
    MoE on layers 1 and 3 (linear router, top-1) whose GELU experts carry per-expert fc1/fc2 biases
    (b_up split with w_up under TP, b_down added once after the sum): TP2, TP2 + SP, EP2;
  * the Phi-like model's stage structure under TP2 and PP2 (dense -> evolve -> sparse with moe.init=evolution,
    parallel/stage_structure.py): the evolved copies of every FFN tensor, biases included, gathered back
    equal the one-process conversion, a single-process state dict loads into the sharded evolving model,
    and the experts split from it equal the one-process split.
Checked: losses and gradient norms of every step (1e-5 relative), the trained parameters gathered
back (1e-4 absolute), which tensors are sharded (column-parallel biases split with the output,
row-parallel and LayerNorm biases replicated, the shared expert's FFN split and its gate
replicated), and that replicated tensors are bitwise equal on both ranks. Under SP a LayerNorm
bias or a row-parallel bias sees only its sequence shard: a missing all-reduce of its gradient
shows as a loss or parameter difference here.
"""
from __future__ import annotations

import torch

from megatron_evomoe.model.mllm import MultimodalLM
from megatron_evomoe.parallel import ParallelState, full_state_dict, load_full_state_dict, parallelize
from megatron_evomoe.parallel import apply_stage_structure as parallel_structure
from megatron_evomoe.parallel.state import named_shard_specs
from megatron_evomoe.stages.structure import apply_stage_structure

from . import common as C
from .dist_utils import run_distributed

NUM_STEPS, GLOBAL_BATCH, NUM_MICRO = 3, 8, 2
STABLELM = ("--model.norm=layernorm", "--model.rotary_pct=0.5", "--model.qkv_bias=true",
            "--moe.shared_expert_size=32")
PHI = ("--model.norm=layernorm", "--model.rotary_pct=0.5", "--model.parallel_residual=true",
       "--model.ffn_activation=gelu_tanh", "--model.qkv_bias=true", "--model.attn_out_bias=true",
       "--model.mlp_bias=true", "--model.lm_head_bias=true", "--router.type=linear", "--moe.top_k=1")
LAYOUTS = {  # name: (model options, tiny_cfg kwargs)
    "stablelm_tp2": (STABLELM, dict(tp=2)),
    "stablelm_tp2_sp": (STABLELM, dict(tp=2, sp=True)),
    "stablelm_ep2": (STABLELM, dict(ep=2)),
    "phi_tp2": (PHI, dict(tp=2)),
    "phi_tp2_sp": (PHI, dict(tp=2, sp=True)),
    "phi_ep2": (PHI, dict(ep=2)),
}
PHI_STAGE_LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2)}
PHI_STAGES = ("--moe.init=evolution", "--evolution.beta_ranges=[[0.5, 0.6], [0.7, 0.8], [0.9, 1.0]]",
              "--stages=[{name: d}, {name: e, moe_mode: evolve}, {name: s, moe_mode: sparse}]")


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
    out["phi_stages"] = {layout: _phi_stages(rank, world_size, **kw) for layout, kw in PHI_STAGE_LAYOUTS.items()}
    return out


def _perturbed_evolved(sd: dict) -> dict:
    """The evolving model's state with every evolved copy moved off FFN1 (by a different amount per
    copy and tensor), as evolution would: the split must carry each copy's own values."""
    out = dict(sd)
    for i, k in enumerate(sorted(k for k in sd if ".evolved_" in k)):
        n = sd[k].shape[0]
        out[k] = sd[k] + (0.01 * (i + 1)) * torch.arange(1, n + 1, dtype=sd[k].dtype).view(n, *[1] * (sd[k].dim() - 1))
    return out


def _phi_stages(rank, world_size, **layout):
    """One process and a parallel layout side by side (the one-process run is repeated on each rank:
    cheap). Under PP each rank converts the other stage's layers as throwaway shadows, so that the
    generator and global RNG draws stay those of one process."""
    cfg1, cfg2 = C.tiny_cfg(extra=PHI + PHI_STAGES), C.tiny_cfg(**layout, extra=PHI + PHI_STAGES)
    torch.manual_seed(0)
    single = MultimodalLM(cfg1, C.IMAGE_TOKEN)
    sharded = MultimodalLM(cfg2, C.IMAGE_TOKEN)
    sharded.load_state_dict(single.state_dict())
    state = ParallelState.build(cfg2, rank, world_size)
    sharded = parallelize(sharded, state, cfg2)
    evolve, sparse = cfg1.stages[1], cfg1.stages[2]
    apply_stage_structure(single, cfg1, evolve, torch.Generator().manual_seed(5))
    parallel_structure(sharded, cfg2, evolve, torch.Generator().manual_seed(5), state)
    out = {"evolve": full_state_dict(sharded, state),
           "evolve_ref": {k: v.clone() for k, v in single.state_dict().items()}}
    moved = _perturbed_evolved(out["evolve_ref"])
    single.load_state_dict(moved)
    load_full_state_dict(sharded, moved, state)
    torch.manual_seed(6)  # (the fresh routers draw from the global RNG)
    apply_stage_structure(single, cfg1, sparse, torch.Generator().manual_seed(6))
    torch.manual_seed(6)
    parallel_structure(sharded, cfg2, sparse, torch.Generator().manual_seed(6), state)
    out["sparse"], out["sparse_ref"] = full_state_dict(sharded, state), single.state_dict()
    out["moved"] = moved
    out["shapes"] = {n: tuple(p.shape) for n, p in sharded.named_parameters()}
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
        elif ".experts." in n:  # [E/ep, ...] under EP; F (w_up [E, C, F] dim 2, b_up and w_down dim 1) over TP
            ep = LAYOUTS[name][1].get("ep", 1)
            f_dim = {"w_up": 2, "w_gate": 2, "b_up": 1, "b_gate": 1, "w_down": 1, "b_down": None}[n.split(".")[-1]]
            want = [full[0] // ep, *full[1:]]
            if f_dim is not None:
                want[f_dim] //= tp
            assert got == tuple(want), f"{name}: {n} {got} vs full {full}"


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
    # the Phi experts' biases were trained (they start as the dense FFN's zero biases)
    assert refs[PHI]["state_dict"]["llm.layers.1.mlp.experts.b_up"].abs().max() > 1e-3
    assert refs[PHI]["state_dict"]["llm.layers.3.mlp.experts.b_down"].abs().max() > 1e-3
    _check_phi_stages([r["phi_stages"] for r in per_rank])


def _check_phi_stages(per_rank):
    for rank, layout, res in ((r, layout, res[layout]) for r, res in enumerate(per_rank) for layout in res):
        for step in ("evolve", "sparse"):
            got, want = res[step], res[f"{step}_ref"]
            assert set(got) == set(want), (layout, rank, step, set(got) ^ set(want))
            for k, v in want.items():
                torch.testing.assert_close(got[k], v, rtol=0, atol=0,
                                           msg=lambda m: f"{layout} rank {rank} {step} {k}: {m}")
        evolved = {k for k in res["evolve_ref"] if ".evolved_" in k}
        assert {k.rsplit(".", 1)[1] for k in evolved} == {"evolved_w_up", "evolved_w_down", "evolved_b_up",
                                                          "evolved_b_down"}
        # expert n + 1 of the split is evolved copy n (weights transposed to [in, out], biases as they are)
        moved, sparse = res["moved"], res["sparse"]
        for i in (1, 3):
            p = f"llm.layers.{i}.mlp."
            torch.testing.assert_close(sparse[p + "experts.b_up"][2], moved[p + "evolved_b_up"][1], rtol=0, atol=0)
            torch.testing.assert_close(sparse[p + "experts.b_down"][0], moved[p + "w_down.bias"], rtol=0, atol=0)
            torch.testing.assert_close(sparse[p + "experts.w_up"][3], moved[p + "evolved_w_up"][2].t(), rtol=0,
                                       atol=0)
        if layout == "tp2":
            assert res["shapes"]["llm.layers.1.mlp.experts.b_up"] == (4, 24)  # F = 48 over TP2
            assert res["shapes"]["llm.layers.1.mlp.experts.b_down"] == (4, 32)  # replicated
        else:  # pipeline stage 0 holds layers 0-1, stage 1 layers 2-3
            mine, other = (1, 3) if rank == 0 else (3, 1)
            assert res["shapes"][f"llm.layers.{mine}.mlp.experts.b_up"] == (4, 48)
            assert f"llm.layers.{other}.mlp.experts.b_up" not in res["shapes"]

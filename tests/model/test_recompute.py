"""train.recompute: the same losses and gradients, fewer activations kept, side effects counted once.

Gradients: the tiny multimodal model of tests/parallel/common.py (4 layers, MoE on alternate layers) in
every moe_mode (dense, evolve, sparse with the DTR and with the linear router), fp32, none vs selective
vs full at 1e-6. Memory: the tensor bytes alive after one decoder layer's forward (what autograd keeps
for its backward), measured with parallel/memory_tracking.py and derived by hand for full and selective.
"""
from __future__ import annotations

import copy

import pytest
import torch

from megatron_evomoe.config import ConfigError, StageConfig, load_config
from megatron_evomoe.model.llm import DecoderLayer, RotaryEmbedding
from megatron_evomoe.model.mllm import MultimodalLM
from megatron_evomoe.model.recompute import apply_recompute
from megatron_evomoe.parallel.memory_tracking import LiveTensorBytes
from megatron_evomoe.stages.structure import apply_stage_structure

from ..parallel.common import IMAGE_TOKEN, make_batches, tiny_cfg

MODES = ("none", "selective", "full")


def _model(moe_mode: str, router: str) -> MultimodalLM:
    cfg = tiny_cfg(router=router)
    torch.manual_seed(0)
    model = MultimodalLM(cfg, IMAGE_TOKEN)
    gen = torch.Generator().manual_seed(0)
    for mode in {"dense": [], "evolve": ["evolve"], "sparse": ["evolve", "sparse"]}[moe_mode]:
        apply_stage_structure(model, cfg, StageConfig(name=mode, moe_mode=mode), gen)
    return model


def _loss_and_grads(model, batch, calls):
    for layer in model.llm.layers:
        if hasattr(layer.mlp, "routing_hook"):
            layer.mlp.routing_hook = lambda *a: calls.append(1)
    out = model(batch["input_ids"], batch["images"], batch["labels"])
    loss = out.lm_loss_sum / 100 + out.aux_loss
    loss.backward()
    return float(out.lm_loss_sum.detach()), float(out.aux_loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                         if p.grad is not None}


@pytest.mark.parametrize("moe_mode,router", [("dense", "dtr"), ("evolve", "dtr"), ("sparse", "dtr"),
                                             ("sparse", "linear")])
def test_same_gradients_and_statistics_counted_once(moe_mode, router):
    base = _model(moe_mode, router)
    batch = make_batches(1, 4)[0]
    results = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        apply_recompute(model, mode)
        calls = []
        results[mode] = (*_loss_and_grads(model, batch, calls), len(calls))
    lm, aux, grads, num_calls = results["none"]
    assert num_calls == (2 if moe_mode == "sparse" else 0)  # one routing record per MoE layer per forward
    assert len(grads) > 20
    for mode in ("selective", "full"):
        lm_r, aux_r, grads_r, calls_r = results[mode]
        assert calls_r == num_calls, mode  # not again during the recompute
        assert lm_r == pytest.approx(lm, rel=1e-6) and aux_r == pytest.approx(aux, rel=1e-6, abs=1e-9), mode
        assert grads_r.keys() == grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(grads_r[n], g, rtol=1e-6, atol=1e-6, msg=lambda m: f"{mode} {n}: {m}")


def _kept_bytes(mode: str, B=2, S=8) -> tuple[int, dict]:
    """Bytes created by one dense decoder layer's forward and still alive before its backward."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    layer = DecoderLayer(cfg.model, 0)
    rope = RotaryEmbedding(cfg.model.hidden_size // cfg.model.num_heads, 32, cfg.model.rope_theta)
    apply_recompute(type("M", (), {"llm": type("L", (), {"layers": [layer]})})(), mode)
    x = torch.randn(B, S, cfg.model.hidden_size, requires_grad=True)
    positions = torch.arange(S)
    with LiveTensorBytes() as mem:
        y, _ = layer(x, None, rope, positions)
    kept = mem.live
    y.sum().backward()  # (the graph is whole)
    return kept, dict(B=B, S=S, C=cfg.model.hidden_size, F=cfg.model.ffn_hidden_size, y=y.numel() * 4)


def test_kept_activation_bytes_drop_as_derived():
    none, d = _kept_bytes("none")
    selective, _ = _kept_bytes("selective")
    full, _ = _kept_bytes("full")
    T, F = d["B"] * d["S"], d["F"]
    # full: the layer keeps nothing but its output (its input x was made before the region)
    assert full == d["y"], (full, d)
    # selective: the up half's gate, up and silu(gate) ([T, F] fp32 each) are no longer kept, and neither is
    # SDPA's own record for backward, its log-sum-exp [B, nh, S]; its output stays (the output projection keeps
    # it: the CPU kernel writes it as [B, S, nh, hd], so the reshape before wo is a view), and so do q, k, v
    # (the recompute's inputs)
    nh = tiny_cfg().model.num_heads
    lse = d["B"] * nh * d["S"] * 4
    assert none - selective == 3 * T * F * 4 + lse, (none, selective, 3 * T * F * 4, lse)
    assert full < selective < none


def test_unknown_recompute_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="train.recompute"):
        load_config(None, ["--train.recompute=everything"])

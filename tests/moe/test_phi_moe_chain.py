"""A Phi-2 checkpoint (a tiny random one in the Hugging Face layout) becomes an EvoMoE model: imported,
trained dense, evolved (FFN1 + 3 evolved copies of fc1/fc2 and their biases), split into 4 GELU experts
with biases on alternate layers, top-1, trained sparse; its export names why no HF class holds it."""
import json

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import load_config
from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe.convert.errors import ConversionError
from megatron_evomoe.convert.export import evomoe_to_hf
from megatron_evomoe.moe.evolution import EvolvingFFN
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.stages.structure import apply_stage_structure, evolution_scheduler
from megatron_evomoe.training.restore import load_trained_model
from tests.convert.helpers import SMALL_LLM, randomize, text_ids, write_tokenizer

STAGES = ["--moe.layers=alternate", "--moe.num_experts=4", "--moe.top_k=1", "--moe.init=evolution",
          "--evolution.beta_ranges=[[0.5, 0.6], [0.7, 0.8], [0.9, 0.95]]", "--router.type=linear",
          "--moe.expert_backend=torch", "--router.backend=torch",
          "--stages=[{name: dense}, {name: evolve, moe_mode: evolve}, {name: sparse, moe_mode: sparse}]"]


def _train(model, steps, scheduler=None):
    """AdamW steps on next-token loss of fixed text; -> the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = text_ids(batch=2, length=12, seed=3)
    losses = []
    for _ in range(steps):
        out = model(ids, None, ids)
        loss = out.lm_loss_sum / out.num_tokens + out.aux_loss
        opt.zero_grad()
        loss.backward()
        if scheduler is not None:
            scheduler.before_step()
        opt.step()
        if scheduler is not None:
            scheduler.after_step()
        losses.append(float(loss.detach()))
    return losses


def test_imported_phi_runs_dense_evolve_sparse_with_gelu_experts(tmp_path):
    hf = pytest.importorskip("transformers", reason="the Phi checkpoint is written by transformers")
    src = tmp_path / "phi"
    randomize(hf.PhiForCausalLM(hf.PhiConfig(**SMALL_LLM))).save_pretrained(src)
    write_tokenizer(src)
    assert convert_main(["hf-to-evomoe", "--src", str(src), "--dst", str(tmp_path / "run")]) == 0
    model, imported, _, _ = load_trained_model(tmp_path / "run")
    cfg = load_config(None, STAGES)
    cfg.model, cfg.vision = imported.model, imported.vision  # Phi's shapes and options, as imported
    assert (cfg.model.ffn_activation, cfg.model.mlp_bias, cfg.model.num_layers) == ("gelu_tanh", True, 2)
    model.train()
    gen = torch.Generator().manual_seed(0)

    apply_stage_structure(model, cfg, cfg.stages[0], gen)  # dense: Phi as imported
    dense_losses = _train(model, 3)
    assert dense_losses[-1] < dense_losses[0]

    apply_stage_structure(model, cfg, cfg.stages[1], gen)  # evolve: layer 1 (alternate) only
    evo = model.llm.layers[1].mlp
    assert isinstance(evo, EvolvingFFN) and type(model.llm.layers[0].mlp) is not EvolvingFFN
    assert evo.evolved_b_up.shape == (3, 48) and evo.evolved_b_down.shape == (3, 32)
    sched = evolution_scheduler(model, cfg)
    _train(model, 3, sched)
    d = sched.distances()[0]
    assert 0 < d[0] < d[1] < d[2]  # a larger beta keeps less of each update: further from FFN1
    bias_moved = (evo.evolved_b_up - evo.w_up.bias.detach()).abs().amax(1)  # [3]
    assert bool((bias_moved > 0).all())  # the biases evolved too

    ffn1 = {k: v.detach().clone() for k, v in evo.ffn1_weights().items()}
    evolved_b_down = evo.evolved_b_down.clone()
    apply_stage_structure(model, cfg, cfg.stages[2], gen)  # sparse: the split
    layer = model.llm.layers[1].mlp
    assert isinstance(layer, MoELayer) and layer.router.top_k == 1
    ex = layer.experts
    assert ex.activation == "gelu_tanh" and ex.w_gate is None and ex.num_experts == 4
    assert torch.equal(ex.w_up[0], ffn1["w_up"].t()) and torch.equal(ex.b_up[0], ffn1["b_up"])
    assert torch.equal(ex.b_down[1:], evolved_b_down)
    sparse_losses = _train(model, 3)
    assert all(torch.isfinite(torch.tensor(sparse_losses)))
    assert sparse_losses[-1] < sparse_losses[0]
    assert float(ex.b_down.grad.abs().sum()) > 0

    # export: no Hugging Face class has Phi's decoder with MoE layers
    state = {"model": model.state_dict(), "stage_idx": 2, "step": 3, "global_step": 9, "config": cfg.to_dict()}
    ckpt.save_checkpoint(tmp_path / "moe", "sparse", state, {"stage": "sparse", "stage_idx": 2, "step": 3,
                                                              "global_step": 9}, keep=1)
    with pytest.raises(ConversionError, match=r"^--format qwen2_moe: model.norm='layernorm' \(the qwen2_moe layout "
                                              r"has 'rmsnorm'\); use --format evomoe$"):
        evomoe_to_hf(tmp_path / "moe", tmp_path / "hf", "qwen2_moe", echo=lambda s: None)
    lines = []
    evomoe_to_hf(tmp_path / "moe", tmp_path / "own", echo=lines.append)  # auto: the project's own format
    assert json.loads((tmp_path / "own" / "config.json").read_text())["model_type"] == "evomoe"
    assert any("MoE layers in a decoder" in s for s in lines)

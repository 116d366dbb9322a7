"""HF decoder LLM -> our checkpoint: logits match the transformers model in fp32 (< 1e-4)."""
import json

import pytest
import torch

from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.router import TopKRouter
from megatron_evomoe.training.restore import load_trained_model

from .helpers import SMALL_LLM, randomize, text_ids

TOL = 1e-4


def import_and_compare(hf_model, src, dst, **load_kw):
    """Convert with the CLI, load with load_trained_model, compare logits; returns (model, cfg, diff)."""
    assert convert_main(["hf-to-evomoe", "--src", str(src), "--dst", str(dst)]) == 0
    model, cfg, bundle, state = load_trained_model(dst, **load_kw)
    ids = text_ids()
    with torch.no_grad():
        ref = hf_model(input_ids=ids).logits
        ours = model(ids).logits
    assert ours.shape == ref.shape
    return model, cfg, float((ours - ref).abs().max())


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logit_parity(hf, save_hf, tmp_path, tied):
    m = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM, tie_word_embeddings=tied, rope_theta=5e5)))
    model, cfg, diff = import_and_compare(m, save_hf(m, "llama"), tmp_path / "run")
    assert diff < TOL
    assert (cfg.model.hidden_size, cfg.model.num_kv_heads, cfg.model.rope_theta) == (32, 2, 5e5)
    assert cfg.model.tie_embeddings is tied and cfg.model.qkv_bias is False and not cfg.vision.enabled
    if tied:
        assert model.llm.lm_head.weight is model.llm.embed.weight
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("00-*/meta.json")).read_text())
    assert meta["format"] == "hf-import" and meta["source_architectures"] == ["LlamaForCausalLM"]


def test_qwen2_with_qkv_biases(hf, save_hf, tmp_path):
    m = randomize(hf.Qwen2ForCausalLM(hf.Qwen2Config(**SMALL_LLM)))
    assert m.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    model, cfg, diff = import_and_compare(m, save_hf(m, "qwen2"), tmp_path / "run")
    assert diff < TOL
    assert cfg.model.qkv_bias and model.llm.layers[0].attn.wq.bias is not None


def test_sharded_source_with_index(hf, save_hf, tmp_path):
    m = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM)))
    src = save_hf(m, "sharded", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    assert import_and_compare(m, src, tmp_path / "run")[2] < TOL


def test_mixtral_experts_and_router(hf, save_hf, tmp_path):
    m = randomize(hf.MixtralForCausalLM(hf.MixtralConfig(**SMALL_LLM, num_local_experts=4, num_experts_per_tok=2)))
    model, cfg, diff = import_and_compare(m, save_hf(m, "mixtral"), tmp_path / "run")
    assert diff < TOL
    for layer in model.llm.layers:  # every layer sparse, linear router, renormalised top-2
        assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp.router, TopKRouter)
        assert layer.mlp.experts.w_gate.shape == (4, 32, 48)  # [E, C, F]
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.renormalize, cfg.moe.layers) == (4, 2, True, "all")
    # the router is Mixtral's gate, the experts its w1/w3/w2 transposed
    hf_gate = m.model.layers[1].mlp.gate.weight
    assert torch.equal(model.llm.layers[1].mlp.router.weight, hf_gate)


@pytest.mark.parametrize("norm_topk", [False, True])
def test_qwen2_moe_mixed_layers(hf, save_hf, tmp_path, norm_topk):
    cfg = hf.Qwen2MoeConfig(**dict(SMALL_LLM, num_hidden_layers=3), num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=48, shared_expert_intermediate_size=0, mlp_only_layers=[0],
                            norm_topk_prob=norm_topk)
    m = randomize(hf.Qwen2MoeForCausalLM(cfg))
    model, ours, diff = import_and_compare(m, save_hf(m, "qwen2moe"), tmp_path / "run")
    assert diff < TOL
    assert ours.moe.layers == "1,2" and ours.moe.renormalize is norm_topk and ours.model.qkv_bias
    assert not isinstance(model.llm.layers[0].mlp, MoELayer) and isinstance(model.llm.layers[2].mlp, MoELayer)


def test_tokenizer_copied_and_generate_loadable(hf, save_hf, tmp_path):
    """The run folder carries its tokenizer (with <image> appended) and still loads after a move."""
    m = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM)))
    run = tmp_path / "run"
    assert convert_main(["hf-to-evomoe", "--src", str(save_hf(m, "llama")), "--dst", str(run)]) == 0
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    moved = tmp_path / "moved"
    run.rename(moved)
    from megatron_evomoe.generate import load_for_inference
    model, cfg, bundle, _ = load_for_inference(moved)
    assert bundle.tokenizer.image_token_id == 60 and cfg.model.vocab_size == 64


def test_vocab_grows_for_image_token(hf, save_hf, tmp_path):
    """A tokenizer that fills the vocabulary: <image> needs a new row; old logits are unchanged."""
    from .helpers import write_tokenizer
    m = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM)))
    src = save_hf(m, "llama", tokenizer=False)
    write_tokenizer(src, num_words=64)
    assert convert_main(["hf-to-evomoe", "--src", str(src), "--dst", str(tmp_path / "run")]) == 0
    model, cfg, bundle, _ = load_trained_model(tmp_path / "run")
    assert cfg.model.vocab_size == 65 and bundle.tokenizer.image_token_id == 64
    ids = text_ids()
    with torch.no_grad():
        ours, ref = model(ids).logits, m(input_ids=ids).logits
    assert float((ours[..., :64] - ref).abs().max()) < TOL


def test_phi_logit_parity(hf, save_hf, tmp_path):
    """Phi: LayerNorm, partial rotary (0.5 of each head), parallel block, fc1 -> gelu_new -> fc2, biases."""
    m = randomize(hf.PhiForCausalLM(hf.PhiConfig(**SMALL_LLM, resid_pdrop=0.1)))
    model, cfg, diff = import_and_compare(m, save_hf(m, "phi"), tmp_path / "run")
    assert diff < TOL
    o = cfg.model
    assert (o.norm, o.rotary_pct, o.parallel_residual, o.ffn_activation) == ("layernorm", 0.5, True, "gelu_tanh")
    assert o.qkv_bias and o.attn_out_bias and o.mlp_bias and o.lm_head_bias and cfg.moe.layers == "none"
    layer = model.llm.layers[0]
    assert layer.mlp_norm is None and not hasattr(layer.mlp, "w_gate") and layer.attn_norm.bias is not None
    assert torch.equal(model.llm.lm_head.bias, m.lm_head.bias)
    assert torch.equal(layer.mlp.w_up.bias, m.model.layers[0].mlp.fc1.bias)
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("00-*/meta.json")).read_text())
    assert any("resid_pdrop=0.1" in n for n in meta["notes"])  # dropout is named, not silently dropped
    # KV-cache decoding (partial rotary on cached keys, parallel block) = HF's greedy choice at every step
    from megatron_evomoe.generation import greedy_generate
    seq = text_ids(1, 6)[0]
    ours = greedy_generate(model, [seq], None, 6, eos_id=-1)[0]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, m(input_ids=seq[None]).logits[0, -1].argmax()[None]])
    assert ours == seq[6:].tolist()


@pytest.mark.parametrize("variant", ["qkv_bias", "parallel_residual", "v4_config"])
def test_stablelm_logit_parity(hf, save_hf, tmp_path, variant):
    """StableLM(-2): LayerNorm, partial rotary (0.25 by default), SwiGLU, optional q/k/v bias and parallel block;
    v4_config: a transformers-4 config.json (partial_rotary_factor and rope_theta at the top level)."""
    kw = {"qkv_bias": dict(use_qkv_bias=True), "parallel_residual": dict(use_parallel_residual=True),
          "v4_config": dict(partial_rotary_factor=0.5, rope_theta=5e4)}[variant]
    m = randomize(hf.StableLmForCausalLM(hf.StableLmConfig(**SMALL_LLM, **kw)))
    src = save_hf(m, "stablelm")
    if variant == "v4_config":
        c = json.loads((src / "config.json").read_text())
        assert c.pop("rope_parameters")["partial_rotary_factor"] == 0.5
        (src / "config.json").write_text(json.dumps(dict(c, partial_rotary_factor=0.5, rope_theta=5e4)))
    model, cfg, diff = import_and_compare(m, src, tmp_path / "run")
    assert diff < TOL
    o = cfg.model
    assert o.norm == "layernorm" and o.ffn_activation == "swiglu" and not (o.attn_out_bias or o.mlp_bias)
    assert o.rotary_pct == (0.5 if variant == "v4_config" else 0.25)
    assert o.qkv_bias is (variant == "qkv_bias") and o.parallel_residual is (variant == "parallel_residual")
    if variant == "v4_config":
        assert o.rope_theta == 5e4


def test_qwen2_moe_shared_expert(hf, save_hf, tmp_path):
    """Qwen2-MoE's shared expert (its own width, sigmoid gate) becomes our MoELayer.shared_expert."""
    cfg = hf.Qwen2MoeConfig(**dict(SMALL_LLM, num_hidden_layers=3), num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=48, shared_expert_intermediate_size=40, mlp_only_layers=[0])
    m = randomize(hf.Qwen2MoeForCausalLM(cfg))
    model, ours, diff = import_and_compare(m, save_hf(m, "qwen2moe"), tmp_path / "run")
    assert diff < TOL
    assert ours.moe.shared_expert_size == 40 and ours.moe.layers == "1,2"
    shared = model.llm.layers[1].mlp.shared_expert
    assert shared.w_gate.weight.shape == (40, 32)
    assert torch.equal(shared.gate.weight, m.model.layers[1].mlp.shared_expert_gate.weight)
    assert model.llm.layers[0].mlp.w_gate.weight.shape == (48, 32)  # the dense layer is unchanged
    with torch.no_grad():  # the shared expert matters: without it the logits move
        layer = model.llm.layers[2].mlp
        layer.shared_expert, saved = None, layer.shared_expert
        assert float((model(text_ids()).logits - m(input_ids=text_ids()).logits).abs().max()) > 1e-2
        layer.shared_expert = saved

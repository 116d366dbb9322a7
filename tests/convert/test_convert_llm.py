"""HF decoder LLM -> our checkpoint: logits match the transformers model in fp32 (< 1e-4)."""
import json

import pytest
import torch

from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe.convert import ConversionError, hf_to_evomoe
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


# ------------------------------------------------------------------ transformers-5 fused experts

def fused_layout(hf, save_hf, model, name):
    """save_pretrained as transformers 5 holds the model in memory: experts fused, the MoE block at mlp."""
    src = save_hf(model, name, save_original_format=False)
    from safetensors import safe_open
    keys = set(safe_open(str(src / "model.safetensors"), "pt").keys())
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys and "model.layers.1.mlp.gate.weight" in keys
    assert not any(".experts.0." in k or "block_sparse_moe" in k for k in keys)
    return src


def test_mixtral_fused_experts_layout(hf, save_hf, tmp_path):
    m = randomize(hf.MixtralForCausalLM(hf.MixtralConfig(**SMALL_LLM, num_local_experts=4, num_experts_per_tok=2)))
    model, cfg, diff = import_and_compare(m, fused_layout(hf, save_hf, m, "mixtral5"), tmp_path / "run")
    assert diff < TOL and cfg.moe.layers == "all"
    experts = m.model.layers[1].mlp.experts  # gate_up_proj [E, 2F, C]: the gate rows first
    assert torch.equal(model.llm.layers[1].mlp.experts.w_gate, experts.gate_up_proj[:, :48].transpose(1, 2))
    assert torch.equal(model.llm.layers[1].mlp.experts.w_down, experts.down_proj.transpose(1, 2))
    # the export writes the per-expert layout, which transformers 5 loads back to the same logits
    assert convert_main(["evomoe-to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "out")]) == 0
    from safetensors import safe_open
    keys = set(safe_open(str(tmp_path / "out" / "model.safetensors"), "pt").keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert float((back(input_ids=text_ids()).logits - m(input_ids=text_ids()).logits).abs().max()) < TOL


def test_qwen2_moe_fused_experts_layout(hf, save_hf, tmp_path):
    cfg = hf.Qwen2MoeConfig(**dict(SMALL_LLM, num_hidden_layers=3), num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=48, shared_expert_intermediate_size=40, mlp_only_layers=[0])
    m = randomize(hf.Qwen2MoeForCausalLM(cfg))
    model, ours, diff = import_and_compare(m, fused_layout(hf, save_hf, m, "qwen2moe5"), tmp_path / "run")
    assert diff < TOL and ours.moe.layers == "1,2" and ours.moe.shared_expert_size == 40


def test_missing_router_names_both_layouts(hf, save_hf, tmp_path):
    from safetensors.torch import load_file, save_file
    m = randomize(hf.MixtralForCausalLM(hf.MixtralConfig(**SMALL_LLM, num_local_experts=4, num_experts_per_tok=2)))
    src = fused_layout(hf, save_hf, m, "mixtral5")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError) as err:
        hf_to_evomoe(src, tmp_path / "run", echo=lambda _: None)
    msg = str(err.value)
    assert "'model.layers.1.block_sparse_moe.gate.weight' not found" in msg
    assert "nor 'model.layers.1.mlp.gate.weight' (the fused-experts layout of transformers >= 5)" in msg


# ------------------------------------------------------------------ Qwen-1 (remote code, hand-built reference)

def qwen1_reference_logits(w, cfg, ids):
    """Qwen-1's forward as its modeling_qwen.py defines it, written out: RMSNorm (float), fused c_attn
    split q | k | v, rotate-half RoPE on the first rotary_pct of each head, causal softmax attention
    scaled by 1/sqrt(head_dim), out = c_proj(w1(x) * silu(w2(x))), ln_f, lm_head (or tied wte)."""
    import torch.nn.functional as F
    B, T = ids.shape
    C, H, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_epsilon"]
    D = C // H
    rot = int(cfg["kv_channels"] * cfg["rotary_pct"])

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    inv = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, rot, 2).float() / rot)
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)  # [T, rot]
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rope(t):  # [B, T, H, D]: rotate the first `rot` channels, pass the rest
        r, rest = t[..., :rot], t[..., rot:]
        r1, r2 = r.chunk(2, -1)
        return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["transformer.wte.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        q, k, v = (t.reshape(B, T, H, D) for t in lin(rms(x, w[p + "ln_1.weight"]), p + "attn.c_attn").split(C, -1))
        q, k = rope(q), rope(k)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5
        a = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~causal, float("-inf")).softmax(-1), v)
        x = x + lin(a.reshape(B, T, C), p + "attn.c_proj")
        h = rms(x, w[p + "ln_2.weight"])
        x = x + lin(lin(h, p + "mlp.w1") * F.silu(lin(h, p + "mlp.w2")), p + "mlp.c_proj")
    x = rms(x, w["transformer.ln_f.weight"])
    return F.linear(x, w["lm_head.weight"] if "lm_head.weight" in w else w["transformer.wte.weight"])


QWEN_TOL = 5e-6


@pytest.mark.parametrize("variant", ["qwen_1_8b", "biases_partial_rotary_tied"])
def test_qwen1_logit_parity(tmp_path, variant):
    from .helpers import SMALL_QWEN, qwen_tensors, write_qwen
    cfg = dict(SMALL_QWEN, **({} if variant == "qwen_1_8b" else
                              dict(no_bias=False, rotary_pct=0.5, tie_word_embeddings=True)))
    w = qwen_tensors(cfg)
    src = write_qwen(tmp_path / "qwen", cfg, w)
    assert convert_main(["hf-to-evomoe", "--src", str(src), "--dst", str(tmp_path / "run")]) == 0
    model, ours, _, _ = load_trained_model(tmp_path / "run")
    o = ours.model
    assert (o.ffn_hidden_size, o.num_kv_heads, o.rope_theta, o.norm_eps, o.norm) == (48, 4, 5e4, 1e-5, "rmsnorm")
    assert o.max_seq_len == 48 and o.qkv_bias and o.rotary_pct == cfg["rotary_pct"]
    assert o.attn_out_bias is o.mlp_bias is (not cfg["no_bias"]) and o.tie_embeddings is cfg["tie_word_embeddings"]
    layer = model.llm.layers[1]  # w2 is the gate, w1 the up projection; c_attn rows q | k | v
    assert torch.equal(layer.mlp.w_gate.weight, w["transformer.h.1.mlp.w2.weight"])
    assert torch.equal(layer.attn.wk.bias, w["transformer.h.1.attn.c_attn.bias"][32:64])
    ids = text_ids()
    with torch.no_grad():
        diff = float((model(ids).logits - qwen1_reference_logits(w, cfg, ids)).abs().max())
    assert diff < QWEN_TOL
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("00-*/meta.json")).read_text())
    assert any("seq_length=48" in n for n in meta["notes"])


def test_qwen1_exports_as_qwen2(hf, tmp_path):
    """Qwen-1 (no_bias, full rotary) is the Qwen2 layout: the export loads in transformers' Qwen2ForCausalLM."""
    from .helpers import SMALL_QWEN, qwen_tensors, write_qwen
    w = qwen_tensors(SMALL_QWEN, seed=3)
    src = write_qwen(tmp_path / "qwen", SMALL_QWEN, w)
    assert convert_main(["hf-to-evomoe", "--src", str(src), "--dst", str(tmp_path / "run")]) == 0
    assert convert_main(["evomoe-to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "out")]) == 0
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ids = text_ids()
    with torch.no_grad():
        assert float((back(input_ids=ids).logits - qwen1_reference_logits(w, SMALL_QWEN, ids)).abs().max()) < QWEN_TOL


@pytest.mark.parametrize("changes, words", [
    (dict(kv_channels=16), "kv_channels=16 * num_attention_heads=4 != hidden_size=32"),
    (dict(scale_attn_weights=False), "scale_attn_weights=false"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling="),
])
def test_qwen1_unsupported_config(tmp_path, changes, words):
    from .helpers import SMALL_QWEN, qwen_tensors, write_qwen
    src = write_qwen(tmp_path / "qwen", dict(SMALL_QWEN, **changes), qwen_tensors(SMALL_QWEN), tokenizer=False)
    with pytest.raises(ConversionError) as err:
        hf_to_evomoe(src, tmp_path / "run", echo=lambda _: None)
    assert words in str(err.value) and "QWenLMHeadModel" in str(err.value)


def test_write_mapped_inverts_fused_reads(hf, save_hf, tmp_path):
    """Parts of one HF tensor (Qwen-1's c_attn, a fused gate_up_proj) are joined back exactly on write."""
    from megatron_evomoe.convert.hf_checkpoint import HFCheckpoint
    from megatron_evomoe.convert.hf_llm import llm_spec_from_hf, llm_weight_map
    from megatron_evomoe.convert.weight_map import read_mapped, write_mapped
    from .helpers import SMALL_QWEN, qwen_tensors, write_qwen
    m = randomize(hf.MixtralForCausalLM(hf.MixtralConfig(**SMALL_LLM, num_local_experts=4, num_experts_per_tok=2)))
    for src in (write_qwen(tmp_path / "qwen", SMALL_QWEN, qwen_tensors(SMALL_QWEN)),
                fused_layout(hf, save_hf, m, "mixtral5")):
        ck = HFCheckpoint(src)
        wmap = llm_weight_map(llm_spec_from_hf(ck.config))
        wmap = {k: s.alt if s.alt is not None and not ck.has(s.names[0]) else s for k, s in wmap.items()}
        shapes = {}  # our shapes, from the HF ones the map names
        for k, s in wmap.items():
            shape = list(ck.shape(s.names[0]))
            if s.op == "fused_t":
                shape = [shape[0], shape[2], shape[1] // s.part[1]]
            elif s.part[1] > 1:
                shape[0] //= s.part[1]
            shapes[k] = tuple(shape)
        back = write_mapped(read_mapped(ck, wmap, shapes), wmap)
        assert sorted(back) == sorted(ck.keys())
        for name, t in back.items():
            assert torch.equal(t, ck.get(name)), name

"""Decoder options for other families (Phi, StableLM) and the MoE shared expert (Qwen2-MoE)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_evomoe.config import ConfigError, StageConfig
from megatron_evomoe.model.llm import DecoderLM, RotaryEmbedding
from megatron_evomoe.model.mllm import MultimodalLM
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.shared_expert import SharedExpert
from megatron_evomoe.stages.structure import apply_stage_structure
from tests.model.test_llm import tiny_cfg


PHI = dict(norm="layernorm", rotary_pct=0.5, parallel_residual="true", ffn_activation="gelu_tanh",
           qkv_bias="true", attn_out_bias="true", mlp_bias="true", lm_head_bias="true")


def options(**kw):
    return tiny_cfg(**{f"model.{k}": v for k, v in kw.items()}, **{"moe.layers": "none"})


def test_defaults_keep_the_llama_parameter_names():
    keys = set(DecoderLM(tiny_cfg().model).state_dict())
    per_layer = {k.split(".", 2)[2] for k in keys if k.startswith("layers.0.")}
    assert per_layer == {"attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
                         "mlp_norm.weight", "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight"}
    assert {k for k in keys if not k.startswith("layers.")} == {"embed.weight", "norm.weight", "lm_head.weight"}


def test_phi_options_name_their_tensors():
    keys = set(DecoderLM(options(**PHI).model).state_dict())
    per_layer = {k.split(".", 2)[2] for k in keys if k.startswith("layers.0.")}
    assert per_layer == {"attn_norm.weight", "attn_norm.bias", "attn.wq.weight", "attn.wq.bias", "attn.wk.weight",
                         "attn.wk.bias", "attn.wv.weight", "attn.wv.bias", "attn.wo.weight", "attn.wo.bias",
                         "mlp.w_up.weight", "mlp.w_up.bias", "mlp.w_down.weight", "mlp.w_down.bias"}
    assert {"norm.bias", "lm_head.bias"} <= keys


def test_partial_rotary_rotates_the_first_channels_only():
    """HF convention: rotary width int(head_dim * pct), frequencies over that width, rest passed through."""
    rope_full, rope_part = RotaryEmbedding(8, 16, 100.0), RotaryEmbedding(4, 16, 100.0)
    x, pos = torch.randn(2, 3, 10, 8), torch.arange(10)
    y = rope_part(x, pos)
    torch.testing.assert_close(y[..., 4:], x[..., 4:], rtol=0, atol=0)
    torch.testing.assert_close(y[..., :4], RotaryEmbedding(4, 16, 100.0)(x[..., :4].contiguous(), pos))
    assert not torch.allclose(y[..., :4], rope_full(x, pos)[..., :4])  # frequencies differ from the full width's
    lm = DecoderLM(options(rotary_pct=0.5).model)  # head_dim 8 -> 4 rotated channels
    assert lm.rope.cos.shape == (40, 4)


def test_parallel_residual_layer_is_x_plus_attn_plus_mlp_of_one_norm():
    torch.manual_seed(0)
    lm = DecoderLM(options(**PHI).model)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and LayerNorm off their (zero, one) init
    layer = lm.layers[0]
    assert layer.mlp_norm is None
    x, mod, pos = torch.randn(2, 6, 32), torch.zeros(2, 6, dtype=torch.long), torch.arange(6)
    h = F.layer_norm(x, (32,), layer.attn_norm.weight, layer.attn_norm.bias, 1e-5)
    mlp = layer.mlp.w_down(F.gelu(layer.mlp.w_up(h), approximate="tanh"))
    want = x + layer.attn(h, lm.rope, pos) + mlp
    got, aux = layer(x, mod, lm.rope, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert aux is None


def test_new_biases_start_at_zero_and_options_are_validated():
    lm = DecoderLM(options(**PHI).model)
    assert all(float(p.detach().abs().max()) == 0 for n, p in lm.named_parameters() if n.endswith(".bias"))
    with pytest.raises(ConfigError, match="model.norm: 'batchnorm' is not one of rmsnorm, layernorm"):
        options(norm="batchnorm")
    with pytest.raises(ConfigError, match=r"model.rotary_pct: rotates int\(head_dim \* rotary_pct\) = 3"):
        options(rotary_pct=0.4)  # head_dim 8 -> 3 channels: odd
    with pytest.raises(ConfigError, match="model.rotary_pct: 0.0 must be in"):
        options(rotary_pct=0.0)
    with pytest.raises(ConfigError, match="moe.shared_expert_size: 30 is not divisible by parallel.tp=4"):
        tiny_cfg(**{"moe.shared_expert_size": 30, "parallel.tp": 4})


def test_gelu_or_biased_ffn_becomes_moe_but_gets_no_shared_expert():
    """The routed experts follow the dense FFN (tests/moe); a shared expert is Qwen2-MoE's bias-free
    SwiGLU FFN, so a GELU or biased model is refused one, naming the field."""
    stages = "[{name: a}, {name: b, moe_mode: sparse}]"
    cfg = tiny_cfg(**{"model.ffn_activation": "gelu_tanh", "model.mlp_bias": "true", "stages": stages,
                      "moe.init": "copy", "moe.layers": "1"})
    model = MultimodalLM(cfg, 3)
    apply_stage_structure(model, cfg, cfg.stages[1], torch.Generator())
    ex = model.llm.layers[1].mlp.experts
    assert (ex.activation, ex.w_gate, tuple(ex.b_down.shape)) == ("gelu_tanh", None, (cfg.moe.num_experts, 32))
    for kw in ({"model.ffn_activation": "gelu_tanh"}, {"model.mlp_bias": "true"}):
        with pytest.raises(ConfigError, match=r"^moe.shared_expert_size: a shared expert is a bias-free SwiGLU FFN"):
            tiny_cfg(**kw, **{"moe.layers": "1", "moe.shared_expert_size": 16})


def _moe_cfg(shared: int):
    return tiny_cfg(**{"moe.layers": "1", "moe.init": "noise", "router.type": "linear", "moe.top_k": 2,
                       "moe.shared_expert_size": shared, "moe.expert_backend": "torch",
                       "stages": "[{name: s, moe_mode: sparse}]"})


def test_shared_expert_adds_a_gated_dense_swiglu():
    torch.manual_seed(0)
    se = SharedExpert(32, 24)
    x = torch.randn(5, 32)
    want = torch.sigmoid(x @ se.gate.weight.t()) * (
        (F.silu(x @ se.w_gate.weight.t()) * (x @ se.w_up.weight.t())) @ se.w_down.weight.t())
    torch.testing.assert_close(se(x), want)
    # in a MoE layer: routed output + shared expert output
    cfg = _moe_cfg(24)
    model = MultimodalLM(cfg, 3)
    apply_stage_structure(model, cfg, cfg.stages[0], torch.Generator().manual_seed(0))
    layer = model.llm.layers[1].mlp
    assert isinstance(layer, MoELayer) and layer.shared_expert.w_up.weight.shape == (24, 32)
    assert float(layer.shared_expert.w_down.weight.detach().abs().max()) == 0  # upcycled: starts as the routed output
    with torch.no_grad():
        layer.shared_expert.w_down.weight.normal_()
        h, mod = torch.randn(2, 6, 32), torch.zeros(2, 6, dtype=torch.long)
        y, _ = layer(h, mod)
        shared, layer.shared_expert = layer.shared_expert, None
        routed, _ = layer(h, mod)
    torch.testing.assert_close(y, routed + shared(h.reshape(-1, 32)).view(2, 6, 32))


def test_shared_expert_draws_from_the_generator_only():
    """Configs without a shared expert build exactly as before; with one, the global RNG is untouched."""
    states = []
    for shared in (0, 24):
        cfg = _moe_cfg(shared)
        torch.manual_seed(0)
        model = MultimodalLM(cfg, 3)
        apply_stage_structure(model, cfg, cfg.stages[0], torch.Generator().manual_seed(0))
        states.append((model.state_dict(), torch.rand(1)))
    (a, ra), (b, rb) = states
    assert torch.equal(ra, rb)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k for k in b if k not in a} == {f"llm.layers.1.mlp.shared_expert.{n}.weight"
                                            for n in ("w_gate", "w_up", "w_down", "gate")}

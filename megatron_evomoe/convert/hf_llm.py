"""Hugging Face decoder LLMs <-> our DecoderLM: config and weight-name mapping.

Supported (`model_type`): ``llama`` and ``mistral`` (RMSNorm, rotate-half RoPE, GQA,
SwiGLU, no biases), ``qwen2`` (the same with q/k/v biases -> ``model.qkv_bias``),
``mixtral`` (every layer MoE, softmax -> top-k -> renormalised gates: our TopKRouter with
``moe.renormalize=true``, k > 1), ``qwen2_moe`` (MoE on the layers that
``decoder_sparse_step`` / ``mlp_only_layers`` select, gates renormalised iff
``norm_topk_prob``; a shared expert -> ``moe.shared_expert_size``), ``phi`` (Phi-1/1.5/2:
LayerNorm, partial rotary, parallel block, fc1 -> gelu_new -> fc2, biases everywhere) and
``stablelm`` (StableLM / StableLM-2: LayerNorm, partial rotary, SwiGLU, optional q/k/v biases
and parallel residual) and ``qwen`` (Qwen-1, remote code: fused c_attn, w1/w2/c_proj SwiGLU;
config and weight map in hf_qwen.py); `FAMILY_OPTIONS` lists the `model.*` options each family
sets. MoE experts are read in both the per-expert and transformers 5's fused layout (`_moe_map`).
Not representable, each with a clear `ConversionError`: rope scaling, a head_dim other than
hidden/heads, LLaMA's biases on the output or MLP projections, per-head q/k LayerNorm
(``qk_layernorm``), sliding-window attention shorter than the sequence.

One weight map serves both directions: `llm_weight_map` names, for each of our tensors,
the Hugging Face tensor(s) it comes from and how (copied, or per-expert [out, in]
matrices stacked and transposed into our [E, in, out] layout); import reads through it and
export (export.py) writes through it, so an export re-imports exactly (weight_map.py has
`Src`, `read_mapped` and `write_mapped`; hf_checkpoint.py reads the Hugging Face folder).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..config import ModelConfig
from .config_fields import config_float, config_int
from .errors import ConversionError, unsupported
from .hf_qwen import qwen_spec_from_hf, qwen_weight_map
from .llm_spec import LLMSpec
from .weight_map import Src

__all__ = ["LLMSpec", "llm_spec_from_hf", "llm_weight_map", "FAMILY_OPTIONS", "family_mismatch",
           "export_extras", "hf_llm_config", "moe_layers_string"]

# model_type -> why our decoder cannot represent it (checked before anything else).
UNSUPPORTED_LLMS = {
    "gemma": "Gemma scales embeddings by sqrt(hidden) and uses (1 + weight) RMSNorm and GeGLU",
    "phi3": "Phi-3 fuses qkv_proj and gate_up_proj and may use long-rope scaling",
}
LLM_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "phi", "stablelm", "qwen")


# =============================================================================== config

def _rope(cfg: dict, fail, where: str) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else params.get("rope_type")
    if rtype not in (None, "default"):
        raise fail(f"rope scaling {rtype!r} (only plain RoPE is implemented)")
    return config_float({"rope_theta": cfg.get("rope_theta", params.get("rope_theta"))}, "rope_theta", where, 10000.0)


def llm_spec_from_hf(cfg: dict, where: str = "config.json", max_seq_len: Optional[int] = None) -> LLMSpec:
    """Read an HF LLM config; ConversionError for anything our decoder cannot represent."""
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []

    def fail(feature: str) -> ConversionError:
        return unsupported(mt, archs, feature, where)

    if mt in UNSUPPORTED_LLMS:
        raise fail(UNSUPPORTED_LLMS[mt])
    if mt == "qwen":  # Qwen-1: its own config field names
        return qwen_spec_from_hf(cfg, where, max_seq_len)
    if mt not in LLM_TYPES:
        raise fail(f"model_type {mt!r} is not a supported decoder (supported: {', '.join(LLM_TYPES)})")

    def need(key, minimum=1):  # sizes and counts: a missing, zero or string value is an error here
        return config_int(cfg, key, where, minimum=minimum)

    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    kv = config_int(cfg, "num_key_value_heads", where, default=heads)
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise fail(f"head_dim={cfg.get('head_dim')} differs from hidden_size/num_attention_heads="
                   f"{hidden}/{heads} (our attention derives the head size from them)")
    options = {"phi": _phi_options, "stablelm": _stablelm_options}.get(mt, _llama_options)(mt, cfg, fail)
    max_pos, notes = _max_positions(mt, cfg, need("max_position_embeddings"), max_seq_len)
    notes += _dropout_notes(cfg)
    ffn = need("intermediate_size")
    spec = LLMSpec(family={"mistral": "llama"}.get(mt, mt), model=dict(
        vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, ffn_hidden_size=ffn, max_seq_len=max_pos,
        rope_theta=_rope(cfg, fail, where), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=config_float(cfg, "initializer_range", where, 0.02), **options), notes=notes)
    if mt == "mixtral":
        _mixtral_moe(spec, cfg, need, fail)
    elif mt == "qwen2_moe":
        _qwen2_moe(spec, cfg, need, fail)
    return spec


# ModelConfig options each family fixes: an export to the family needs exactly these values
# (options a family reads from its config, e.g. StableLM's use_qkv_bias, are not listed).
_LLAMA_LIKE = dict(norm="rmsnorm", rotary_pct=1.0, parallel_residual=False, ffn_activation="swiglu",
                   attn_out_bias=False, mlp_bias=False, lm_head_bias=False)
FAMILY_OPTIONS = {
    "llama": dict(_LLAMA_LIKE, qkv_bias=False),
    "qwen2": dict(_LLAMA_LIKE, qkv_bias=True),
    "mixtral": dict(_LLAMA_LIKE, qkv_bias=False),
    "qwen2_moe": dict(_LLAMA_LIKE),
    # Phi: LayerNorm, one norm per (parallel) block, fc1 -> gelu_new -> fc2, a bias on every linear
    "phi": dict(norm="layernorm", parallel_residual=True, ffn_activation="gelu_tanh", qkv_bias=True,
                attn_out_bias=True, mlp_bias=True, lm_head_bias=True),
    # StableLM: LayerNorm, SwiGLU without biases, no bias on o_proj or the head
    "stablelm": dict(norm="layernorm", ffn_activation="swiglu", attn_out_bias=False, mlp_bias=False,
                     lm_head_bias=False),
}


def family_mismatch(model: dict, family: str) -> Optional[str]:
    """Why our decoder options (ModelConfig fields) do not fit HF `family`, or None if they do."""
    for key, want in FAMILY_OPTIONS[family].items():
        if model.get(key, ModelConfig.__dataclass_fields__[key].default) != want:
            return f"model.{key}={model.get(key)!r} (the {family} layout has {want!r})"
    return None


def _llama_options(mt: str, cfg: dict, fail) -> dict:
    _check_hidden_act(cfg, fail, ("silu",), "our FFN for this family is SwiGLU with SiLU")
    if cfg.get("attention_bias"):
        raise fail("attention_bias=true (biases on q/k/v and the output projection; "
                   "only q/k/v biases are supported, as in Qwen2)")
    if cfg.get("mlp_bias"):
        raise fail("mlp_bias=true (our FFN has no biases)")
    qkv_bias = {"qwen2": True, "qwen2_moe": bool(cfg.get("qkv_bias", True))}.get(mt, False)
    return dict(_LLAMA_LIKE, qkv_bias=qkv_bias, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))


def _check_hidden_act(cfg: dict, fail, supported: Tuple[str, ...], why: str) -> None:
    """The family's FFN activation; a missing hidden_act is the family's default, supported[0]."""
    act = cfg.get("hidden_act", supported[0])
    if act not in supported:
        raise fail(f"hidden_act={act!r} ({why})")


def _partial_rotary(cfg: dict, default: float) -> float:
    """HF's partial_rotary_factor: top level (transformers 4) or inside rope_parameters (5)."""
    pct = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"))
    return float(default if pct is None else pct)


def _no_qk_layernorm(cfg: dict, fail) -> None:
    if cfg.get("qk_layernorm"):
        raise fail("qk_layernorm=true (LayerNorm on the queries and keys of each head; not implemented)")


def _phi_options(mt: str, cfg: dict, fail) -> dict:
    _check_hidden_act(cfg, fail, ("gelu_new", "gelu_pytorch_tanh"),
                      "the Phi MLP is supported with the tanh GELU: gelu_new")
    _no_qk_layernorm(cfg, fail)
    return dict(FAMILY_OPTIONS["phi"], rotary_pct=_partial_rotary(cfg, 0.5),
                norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))


def _stablelm_options(mt: str, cfg: dict, fail) -> dict:
    _check_hidden_act(cfg, fail, ("silu",), "StableLM's MLP is supported as SwiGLU with SiLU")
    _no_qk_layernorm(cfg, fail)
    return dict(FAMILY_OPTIONS["stablelm"], rotary_pct=_partial_rotary(cfg, 0.25),
                qkv_bias=bool(cfg.get("use_qkv_bias", False)),
                parallel_residual=bool(cfg.get("use_parallel_residual", False)),
                norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))


def _max_positions(mt: str, cfg: dict, max_pos: int, max_seq_len: Optional[int]) -> Tuple[int, List[str]]:
    notes = []
    window = cfg.get("sliding_window")
    uses_window = ((mt in ("mistral", "mixtral") and window)
                   or (mt.startswith("qwen2") and cfg.get("use_sliding_window")))
    if any(t == "sliding_attention" for t in cfg.get("layer_types") or []):
        uses_window = True
    if uses_window and window and window < max_pos:
        # Attention only differs from full attention past the window: cap the length there.
        notes.append(f"sliding_window={window} < max_position_embeddings={max_pos}: "
                     f"model.max_seq_len capped at {window}, where full attention is exact")
        max_pos = int(window)
    if max_seq_len:
        max_pos = min(max_pos, int(max_seq_len))
    return max_pos, notes


def _dropout_notes(cfg: dict) -> List[str]:
    keys = ("resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout")
    used = [f"{k}={cfg[k]}" for k in keys if cfg.get(k)]
    if not used:
        return []
    return [f"dropout ({', '.join(used)}) is not applied by our decoder: the same function at inference, "
            "fine-tuning runs without it"]


def _mixtral_moe(spec: LLMSpec, cfg: dict, need, fail) -> None:
    spec.num_experts, spec.top_k = need("num_local_experts"), need("num_experts_per_tok")
    if spec.top_k == 1:
        raise fail("num_experts_per_tok=1: Mixtral renormalises a single gate to 1.0, our router keeps "
                   "the softmax probability for top-1")
    spec.renormalize = True
    spec.moe_layers = list(range(spec.model["num_layers"]))


def _qwen2_moe(spec: LLMSpec, cfg: dict, need, fail) -> None:
    layers, ffn = spec.model["num_layers"], spec.model["ffn_hidden_size"]
    spec.shared_expert_size = int(cfg.get("shared_expert_intermediate_size") or 0)
    if spec.shared_expert_size == 0:
        spec.ignorable = ("*mlp.shared_expert.*", "*mlp.shared_expert_gate.*")  # width 0: adds exactly 0
    spec.num_experts, spec.top_k = need("num_experts", 0), need("num_experts_per_tok")
    spec.renormalize = bool(cfg.get("norm_topk_prob", False))
    if spec.renormalize and spec.top_k == 1:
        raise fail("norm_topk_prob=true with num_experts_per_tok=1 (gate always 1.0); our router keeps "
                   "the softmax probability for top-1")
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    spec.moe_layers = [i for i in range(layers)
                       if spec.num_experts > 0 and i not in only_mlp and (i + 1) % step == 0]
    moe_ffn = int(cfg.get("moe_intermediate_size") or ffn)
    if spec.moe_layers and len(spec.moe_layers) == layers:
        spec.model["ffn_hidden_size"] = moe_ffn
    elif spec.moe_layers and moe_ffn != ffn:
        raise fail(f"dense layers (intermediate_size={ffn}) and MoE experts (moe_intermediate_size="
                   f"{moe_ffn}) of different widths; our experts are made from the dense FFN shape")


def moe_layers_string(layers: List[int], num_layers: int) -> str:
    if not layers:
        return "none"
    if layers == list(range(num_layers)):
        return "all"
    return ",".join(str(i) for i in layers)


# =============================================================================== weight map

def llm_weight_map(spec: LLMSpec, prefix: str = "model.", head: str = "lm_head.", ours: str = "llm.") -> Dict[str, Src]:
    """Our state-dict name -> Src, for the decoder of `spec` (prefixes select a nested LLM).

    `prefix` is where the decoder body lives in the LLaMA-style naming (``model.``); Qwen-1 keeps
    it at ``transformer.`` (hf_qwen.py), which then takes the place of that trailing ``model.``.
    """
    if spec.family == "qwen":
        return qwen_weight_map(spec, prefix, head, ours)
    m = spec.model
    opt = {k: m.get(k, f.default) for k, f in ModelConfig.__dataclass_fields__.items()}
    phi = spec.family == "phi"
    norms = ("weight", "bias") if opt["norm"] == "layernorm" else ("weight",)
    out: Dict[str, Src] = {f"{ours}embed.weight": Src((f"{prefix}embed_tokens.weight",))}
    final = f"{prefix}final_layernorm." if phi else f"{prefix}norm."
    out.update({f"{ours}norm.{k}": Src((final + k,)) for k in norms})
    out[f"{ours}lm_head.weight"] = Src((f"{prefix}embed_tokens.weight",) if m["tie_embeddings"]
                                       else (f"{head}weight",))
    if opt["lm_head_bias"]:
        out[f"{ours}lm_head.bias"] = Src((f"{head}bias",))
    for i in range(m["num_layers"]):
        hf, us = f"{prefix}layers.{i}.", f"{ours}layers.{i}."
        out.update({f"{us}attn_norm.{k}": Src((f"{hf}input_layernorm.{k}",)) for k in norms})
        if not opt["parallel_residual"]:
            out.update({f"{us}mlp_norm.{k}": Src((f"{hf}post_attention_layernorm.{k}",)) for k in norms})
        out.update(_attention_map(hf, us, opt, "dense" if phi else "o_proj"))
        if i in spec.moe_layers:
            out.update(_moe_map(spec, hf, us))
            continue
        names = {"w_up": "fc1", "w_down": "fc2"} if opt["ffn_activation"] == "gelu_tanh" else \
            {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
        for our, theirs in names.items():
            for k in ("weight", "bias") if opt["mlp_bias"] else ("weight",):
                out[f"{us}mlp.{our}.{k}"] = Src((f"{hf}mlp.{theirs}.{k}",))
    return out


def _attention_map(hf: str, us: str, opt: dict, out_name: str) -> Dict[str, Src]:
    out = {}
    for our, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", out_name)):
        out[f"{us}attn.{our}.weight"] = Src((f"{hf}self_attn.{theirs}.weight",))
        if opt["attn_out_bias"] if our == "wo" else opt["qkv_bias"]:
            out[f"{us}attn.{our}.bias"] = Src((f"{hf}self_attn.{theirs}.bias",))
    return out


FUSED_EXPERTS = "the fused-experts layout of transformers >= 5"


def _moe_map(spec: LLMSpec, hf: str, us: str) -> Dict[str, Src]:
    """Router, stacked experts and (Qwen2-MoE) the shared expert of one MoE layer.

    Two layouts are read: the per-expert one that the released checkpoints and transformers'
    save_pretrained write (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2, Qwen2-MoE:
    mlp.experts.{e}.gate_proj/up_proj/down_proj), and transformers 5's in-memory layout
    (``save_pretrained(save_original_format=False)``): the block at ``mlp.``, the router at
    mlp.gate, experts.gate_up_proj [E, 2F, C] (gate rows first) and experts.down_proj [E, C, F].
    Export writes the per-expert layout, which every transformers version loads.
    """
    fused = hf + "mlp."
    if spec.family == "mixtral":
        block, names = hf + "block_sparse_moe.", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
    else:
        block, names = fused, {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
    router_alt = Src((fused + "gate.weight",)) if block != fused else None
    out = {us + "mlp.router.weight": Src((block + "gate.weight",), alt=router_alt, alt_label=FUSED_EXPERTS)}
    fused_srcs = {"w_gate": Src((fused + "experts.gate_up_proj",), "fused_t", part=(0, 2)),
                  "w_up": Src((fused + "experts.gate_up_proj",), "fused_t", part=(1, 2)),
                  "w_down": Src((fused + "experts.down_proj",), "fused_t")}
    for our, theirs in names.items():
        per_expert = tuple(f"{block}experts.{e}.{theirs}.weight" for e in range(spec.num_experts))
        out[f"{us}mlp.experts.{our}"] = Src(per_expert, "stack_t", alt=fused_srcs[our], alt_label=FUSED_EXPERTS)
    if spec.shared_expert_size > 0:
        for our, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            out[f"{us}mlp.shared_expert.{our}.weight"] = Src((f"{block}shared_expert.{theirs}.weight",))
        out[f"{us}mlp.shared_expert.gate.weight"] = Src((f"{block}shared_expert_gate.weight",))
    return out


def export_extras(spec: LLMSpec, prefix: str = "model.", dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Tensors the HF class has but our model does not need: Qwen2-MoE's width-0 shared expert."""
    out: Dict[str, torch.Tensor] = {}
    if spec.family != "qwen2_moe" or spec.shared_expert_size > 0:
        return out
    C = spec.model["hidden_size"]
    for i in spec.moe_layers:
        p = f"{prefix}layers.{i}.mlp."
        out[p + "shared_expert.gate_proj.weight"] = torch.zeros(0, C, dtype=dtype)
        out[p + "shared_expert.up_proj.weight"] = torch.zeros(0, C, dtype=dtype)
        out[p + "shared_expert.down_proj.weight"] = torch.zeros(C, 0, dtype=dtype)
        out[p + "shared_expert_gate.weight"] = torch.zeros(1, C, dtype=dtype)
    return out


# =============================================================================== export config

def hf_llm_config(model_cfg, family: str, moe_layers: List[int], num_experts: int, top_k: int,
                  renormalize: bool, torch_dtype: str, shared_expert_size: int = 0) -> dict:
    """An HF config.json dict for our decoder as `family` (llama | qwen2 | mixtral | qwen2_moe | phi | stablelm)."""
    m = model_cfg
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM", "phi": "PhiForCausalLM", "stablelm": "StableLmForCausalLM"}[family]
    rope = {"rope_theta": m.rope_theta, "rope_type": "default"}
    cfg = {
        "architectures": [arch], "model_type": family, "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_parameters": rope,
        "hidden_act": "silu", "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": torch_dtype, "dtype": torch_dtype,
    }
    if family in ("phi", "stablelm"):
        del cfg["rms_norm_eps"]
        # the factor is read at the top level (transformers 4) or from rope_parameters (5)
        rope["partial_rotary_factor"] = m.rotary_pct
        cfg.update(layer_norm_eps=m.norm_eps, partial_rotary_factor=m.rotary_pct, qk_layernorm=False)
    if family == "phi":
        cfg.update(hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0)
    if family == "stablelm":
        cfg.update(use_qkv_bias=bool(m.qkv_bias), use_parallel_residual=bool(m.parallel_residual), hidden_dropout=0.0)
    if family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, head_dim=m.hidden_size // m.num_heads)
    if family in ("qwen2", "qwen2_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if family == "mixtral":
        cfg.update(num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                   router_jitter_noise=0.0, output_router_logits=False)
    if family == "qwen2_moe":
        dense = [i for i in range(m.num_layers) if i not in moe_layers]
        cfg.update(num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=bool(renormalize and top_k > 1),
                   decoder_sparse_step=1, mlp_only_layers=dense, moe_intermediate_size=m.ffn_hidden_size,
                   shared_expert_intermediate_size=int(shared_expert_size), qkv_bias=bool(m.qkv_bias),
                   output_router_logits=False)
    return cfg

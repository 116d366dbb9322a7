"""Qwen-1 (``model_type: qwen``, ``QWenLMHeadModel``, remote code) -> our decoder: config and weight map.

Qwen-1's block is LLaMA's with other names and two fusions, read from its published
modeling_qwen.py / configuration_qwen.py:
- ``transformer.wte`` (embedding), ``transformer.h.{i}``, ``transformer.ln_f``, ``lm_head``;
  ln_1 / ln_2 / ln_f are RMSNorms (eps ``layer_norm_epsilon``), pre-norm, sequential residual.
- ``attn.c_attn``: one [3 * hidden, hidden] projection with a bias, rows q | k | v (every head
  has its own k and v: no GQA); ``attn.c_proj`` the output projection (bias iff ``no_bias`` is
  false). Scores are scaled by 1/sqrt(head_dim); rotate-half RoPE (base ``rotary_emb_base``) on
  the first ``int(kv_channels * rotary_pct)`` channels of each head.
- MLP: ``c_proj(w1(x) * silu(w2(x)))``, each of width ``intermediate_size // 2``: w2 is the
  gate, w1 the up projection (biases iff ``no_bias`` is false).
- ``use_dynamic_ntk`` (RoPE base grown with the length) and ``use_logn_attn`` (queries scaled by
  log_seq_length(position)) act only at inference on sequences longer than ``seq_length``: up to
  ``seq_length`` both are the identity, so ``model.max_seq_len`` is capped there and the import is
  exact on every length it allows.

The tokenizer is tiktoken-based (``qwen.tiktoken`` + remote ``tokenization_qwen.py``), not a
``tokenizer.json``: the import writes an equivalent tokenizer.json (qwen_tokenizer.py) unless the
folder already has one or ``--tokenizer`` names another.
"""
from __future__ import annotations

from typing import Dict, Optional

from .config_fields import config_float, config_int
from .errors import unsupported
from .llm_spec import LLMSpec
from .weight_map import Src


def qwen_spec_from_hf(cfg: dict, where: str = "config.json", max_seq_len: Optional[int] = None) -> LLMSpec:
    """Read a Qwen-1 config.json; ConversionError for anything our decoder cannot represent."""
    def fail(feature: str):
        return unsupported("qwen", cfg.get("architectures") or [], feature, where)

    hidden = config_int(cfg, "hidden_size", where)
    heads = config_int(cfg, "num_attention_heads", where)
    rotary_pct = _check_attention(cfg, where, hidden, heads, fail)
    biases = cfg.get("no_bias", True) is False  # c_proj and the MLP's three linears
    max_pos, notes = _positions(cfg, where, max_seq_len)
    used = [f"{k}={cfg[k]}" for k in ("emb_dropout_prob", "attn_dropout_prob") if cfg.get(k)]
    if used:
        notes.append(f"dropout ({', '.join(used)}) is not applied by our decoder: the same function at inference")
    model = dict(
        vocab_size=config_int(cfg, "vocab_size", where), hidden_size=hidden,
        num_layers=config_int(cfg, "num_hidden_layers", where), num_heads=heads, num_kv_heads=heads,
        ffn_hidden_size=config_int(cfg, "intermediate_size", where, minimum=2) // 2, max_seq_len=max_pos,
        rope_theta=config_float(cfg, "rotary_emb_base", where, 10000.0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=config_float(cfg, "initializer_range", where, 0.02),
        norm="rmsnorm", norm_eps=config_float(cfg, "layer_norm_epsilon", where, 1e-6), rotary_pct=rotary_pct,
        parallel_residual=False, ffn_activation="swiglu", qkv_bias=True, attn_out_bias=biases,
        mlp_bias=biases, lm_head_bias=False)
    # buffers some exports of the remote code wrote (masked_bias, the causal mask, RoPE inverse frequencies)
    ignorable = ("*.attn.masked_bias", "*.attn.bias", "*rotary_emb.inv_freq")
    return LLMSpec(family="qwen", model=model, notes=notes, ignorable=ignorable)


def _check_attention(cfg: dict, where: str, hidden: int, heads: int, fail) -> float:
    """What our attention cannot represent is an error; returns rotary_pct."""
    head_dim = config_int(cfg, "kv_channels", where, default=hidden // heads)
    if hidden % heads or head_dim * heads != hidden:
        # c_attn is split at `hidden` columns, its heads are kv_channels wide: equal only then
        raise fail(f"kv_channels={head_dim} * num_attention_heads={heads} != hidden_size={hidden}")
    if cfg.get("scale_attn_weights", True) is False:
        raise fail("scale_attn_weights=false (our attention always scales scores by 1/sqrt(head_dim))")
    if cfg.get("rope_scaling"):
        raise fail(f"rope_scaling={cfg['rope_scaling']!r} (only plain RoPE is implemented)")
    rotary_pct = config_float(cfg, "rotary_pct", where, 1.0)
    if not 0.0 < rotary_pct <= 1.0:
        raise fail(f"rotary_pct={rotary_pct} (must be in (0, 1])")
    return rotary_pct


def _positions(cfg: dict, where: str, max_seq_len: Optional[int]):
    """(model.max_seq_len, notes): seq_length, where dynamic NTK and logn attention start to act."""
    # the remote code reads seq_length (the NTK / logn threshold), not max_position_embeddings
    key = "seq_length" if cfg.get("seq_length") is not None else "max_position_embeddings"
    seq_length = config_int(cfg, key, where)
    notes = []
    if cfg.get("use_dynamic_ntk", True) or cfg.get("use_logn_attn", True):
        notes.append(f"use_dynamic_ntk / use_logn_attn act only past seq_length={seq_length} tokens: "
                     f"model.max_seq_len capped at {seq_length}, where both are the identity")
    return (min(seq_length, int(max_seq_len)) if max_seq_len else seq_length), notes


def qwen_weight_map(spec: LLMSpec, prefix: str = "model.", head: str = "lm_head.",
                    ours: str = "llm.") -> Dict[str, Src]:
    """Our state-dict name -> Src for a Qwen-1 decoder (a trailing ``model.`` of `prefix` -> ``transformer.``)."""
    root = prefix[: -len("model.")] + "transformer." if prefix.endswith("model.") else prefix
    m = spec.model
    out: Dict[str, Src] = {
        f"{ours}embed.weight": Src((f"{root}wte.weight",)),
        f"{ours}norm.weight": Src((f"{root}ln_f.weight",)),
        f"{ours}lm_head.weight": Src((f"{root}wte.weight",) if m["tie_embeddings"] else (f"{head}weight",)),
    }
    kinds = ("weight", "bias") if m["mlp_bias"] else ("weight",)
    for i in range(m["num_layers"]):
        hf, us = f"{root}h.{i}.", f"{ours}layers.{i}."
        out[f"{us}attn_norm.weight"] = Src((f"{hf}ln_1.weight",))
        out[f"{us}mlp_norm.weight"] = Src((f"{hf}ln_2.weight",))
        for part, our in enumerate(("wq", "wk", "wv")):  # c_attn rows: q | k | v
            for k in ("weight", "bias"):
                out[f"{us}attn.{our}.{k}"] = Src((f"{hf}attn.c_attn.{k}",), part=(part, 3))
        for k in kinds:
            out[f"{us}attn.wo.{k}"] = Src((f"{hf}attn.c_proj.{k}",))
            for our, theirs in (("w_gate", "w2"), ("w_up", "w1"), ("w_down", "c_proj")):
                out[f"{us}mlp.{our}.{k}"] = Src((f"{hf}mlp.{theirs}.{k}",))
    return out

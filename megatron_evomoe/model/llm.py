"""Decoder LLM: RMSNorm, RoPE, grouped-query attention (SDPA), SwiGLU FFN or MoE per layer.

Plain modules: no communication code. Parallel layouts are applied from outside
(megatron_evomoe/parallel). Every feed-forward block takes `(x, modality)` and
returns `(y, aux_loss)` so dense, evolving and MoE blocks are interchangeable.

Options of `ModelConfig` that let other decoder families load exactly (defaults: LLaMA):
- ``norm``: ``rmsnorm`` | ``layernorm`` (with bias: Phi, StableLM);
- ``rotary_pct``: only the first ``int(head_dim * rotary_pct)`` channels of each head are
  rotated, with frequencies over that width (HF's ``partial_rotary_factor``);
- ``parallel_residual``: x + attn(ln(x)) + mlp(ln(x)) with one norm per layer (Phi);
- ``ffn_activation``: ``swiglu`` (w_gate, w_up, w_down) | ``gelu_tanh`` (w_up -> GELU(tanh) ->
  w_down, Phi's fc1/fc2);
- biases: ``qkv_bias`` (q/k/v), ``attn_out_bias`` (wo), ``mlp_bias`` (every FFN linear),
  ``lm_head_bias``.
Parameter names never change with the options; a layer just has or lacks a tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, check_choice
from .absent import is_absent
from .recompute import recomputed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., C] -> [..., C], normalised in fp32 for stability under bf16 autocast."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (Phi, StableLM); like RMSNorm, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., C] -> [..., C], in fp32 like `rms_norm`."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.type_as(x)


def build_norm(cfg) -> nn.Module:
    if getattr(cfg, "norm", "rmsnorm") == "layernorm":
        return LayerNorm(cfg.hidden_size, cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


def rotary_dim(cfg) -> int:
    """Channels of each head that RoPE rotates: int(head_dim * rotary_pct), as HF truncates."""
    return int(cfg.hidden_size // cfg.num_heads * getattr(cfg, "rotary_pct", 1.0))


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; applied with the rotate-half convention (LLaMA/HF).

    head_dim: the rotated width. A head wider than that (partial rotary, Phi/StableLM) has its
    first `head_dim` channels rotated and the rest passed through unchanged.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim, dtype=torch.float32), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the tables where the buffers live: a model built on the meta device calls this
        after its tensors got storage (parallel/sharded_construction.py)."""
        if self.cos.is_meta:
            return
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        t = torch.arange(self.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # [S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
        self.cos.copy_(emb.cos().float())
        self.sin.copy_(emb.sin().float())

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, nh, S, hd], positions: [S] or [B, S]
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        if cos.dim() == 3:  # per-sample positions -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        rd = cos.shape[-1]
        if rd < x.shape[-1]:  # partial rotary: rotate [..., :rd], pass the rest through
            return torch.cat([self._rotate(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
        return self._rotate(x, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, qkv_bias: bool = False,
                 out_bias: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        # qkv_bias: Qwen/Qwen2 put biases on q, k and v (not on the output projection).
        self.wq = nn.Linear(hidden, num_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        # out_bias: Phi's `dense` has one (StableLM's o_proj does not)
        self.wo = nn.Linear(num_heads * self.head_dim, hidden, bias=out_bias)
        self.recompute_core = False  # train.recompute=selective (model/recompute.py)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor,
                kv_cache=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, C]; positions: [S] or [B, S]; attn_mask: [B, 1, S, S] additive (`attention_bias`)
        or bool (True = may attend), for packed rows; None for plain causal attention."""
        B, S, _ = x.shape
        # heads are read from the weight shapes so a TP-sharded layer (fewer local heads) just works
        q = self.wq(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, nh, S, hd]
        k = self.wk(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, nkv, S, hd]
        v = self.wv(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = rope(q, positions), rope(k, positions)
        gqa = q.shape[1] != k.shape[1]
        if attn_mask is not None:
            assert kv_cache is None, "packed rows are a training forward (no KV cache)"
            if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:  # (not what DecoderLM gives)
                attn_mask = attn_mask.to(q.dtype)
            y = self._core(q, k, v, attn_mask, False, gqa)
            return self.wo(y.transpose(1, 2).reshape(B, S, -1))
        causal = True
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            causal = True if S > 1 else False  # one new token attends to the whole cache (a branch: a
            # plain bool for SDPA even when torch.compile traces S as a symbol)
            if causal and k.shape[2] != S:
                raise NotImplementedError("chunked prefill onto a non-empty KV cache")
        y = self._core(q, k, v, None, causal, gqa)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def _core(self, q, k, v, attn_mask, causal: bool, gqa: bool) -> torch.Tensor:
        """SDPA: [B, nh, S, hd] x3 -> [B, nh, S, hd]; recomputed in backward under selective recompute."""
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)
        return recomputed(sdpa, q, k, v) if self.recompute_core else sdpa(q, k, v)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, S] -> bool [B, 1, S, S]: token i may attend to j iff j <= i and both are in
    the same segment. Padding (-1) is one more segment, so every row keeps its diagonal (a row
    with nothing to attend to would make SDPA return NaN)."""
    S = segment_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()  # [S, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, S, S]
    return (same & causal)[:, None]


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask [B, 1, S, S] -> additive mask in the attention's dtype: 0 where allowed, -inf
    elsewhere. Made once per forward: given a bool mask, SDPA converts it in every layer and
    keeps each layer's copy for the backward (B*S*S elements per layer)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the layers compute in: the autocast dtype when autocast is on, else h's."""
    device_type = h.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype


class FFN(nn.Module):
    """Feed-forward block. swiglu: w_down(silu(w_gate x) * w_up x);
    gelu_tanh (Phi's fc1 -> gelu_new -> fc2): w_down(gelu_tanh(w_up x)), no w_gate."""

    def __init__(self, hidden: int, ffn_hidden: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        check_choice(ModelConfig, "ffn_activation", activation, "model.ffn_activation")
        self.activation = activation
        if activation == "swiglu":
            self.w_gate = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.w_up = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.w_down = nn.Linear(ffn_hidden, hidden, bias=bias)
        self.recompute_hidden = False  # train.recompute=selective (model/recompute.py)
        for lin in self.children():
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None):
        h = recomputed(self._hidden, x) if self.recompute_hidden else self._hidden(x)  # [..., F]
        return self.w_down(h), None

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu_tanh":
            return F.gelu(self.w_up(x), approximate="tanh")
        return F.silu(self.w_gate(x)) * self.w_up(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                              qkv_bias=getattr(cfg, "qkv_bias", False),
                              out_bias=getattr(cfg, "attn_out_bias", False))
        # parallel residual (Phi): attn_norm feeds both branches, so the layer has no mlp_norm
        self.mlp_norm = None if getattr(cfg, "parallel_residual", False) else build_norm(cfg)
        self.mlp: nn.Module = FFN(cfg.hidden_size, cfg.ffn_hidden_size, getattr(cfg, "ffn_activation", "swiglu"),
                                  bias=getattr(cfg, "mlp_bias", False))
        self.recompute = "none"  # train.recompute: "full" reruns this layer in backward (model/recompute.py)

    def forward(self, x, modality, rope, positions, kv_cache=None, attn_mask=None):
        if self.recompute == "full":  # (model/recompute.py)
            return recomputed(self._forward, x, modality, rope, positions, kv_cache, attn_mask)
        return self._forward(x, modality, rope, positions, kv_cache, attn_mask)

    def _forward(self, x, modality, rope, positions, kv_cache=None, attn_mask=None):
        if self.mlp_norm is None:  # x + attn(ln(x)) + mlp(ln(x))
            h = self.attn_norm(x)
            y, aux = self.mlp(h, modality)
            return x + self.attn(h, rope, positions, kv_cache, attn_mask) + y, aux
        x = x + self.attn(self.attn_norm(x), rope, positions, kv_cache, attn_mask)
        y, aux = self.mlp(self.mlp_norm(x), modality)
        return x + y, aux


def llm_init_rule(name: str, ndim: int, cfg) -> tuple[str, float]:
    """(kind, scale) of a decoder tensor's initial values: matrices N(0, init_std), GPT-2 style
    residual output projections (wo, w_down) scaled down with depth; biases 0, norm weights 1."""
    if ndim < 2:
        if name.endswith(".bias"):  # linear and LayerNorm biases start at zero
            return "constant", 0.0
        assert name.endswith("norm.weight"), f"no init rule for {name}"
        return "constant", 1.0
    owner = name.split(".")[-2] if name.endswith("weight") else name.split(".")[-1]
    std = cfg.init_std
    return "normal", std / math.sqrt(2 * cfg.num_layers) if owner in ("wo", "w_down") else std


class DecoderLM(nn.Module):
    """Token embedding -> decoder layers -> final norm -> LM head."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved (from the tokenizer) before building"
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=getattr(cfg, "lm_head_bias", False))
        if cfg.tie_embeddings:  # (the weight only: a head bias stays its own tensor)
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(rotary_dim(cfg), cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws from the global RNG (a model built directly); the trainer builds on the meta device
        and draws per tensor instead (model/init.py), with these same rules."""
        for name, p in self.named_parameters():
            kind, scale = llm_init_rule(name, p.dim(), self.cfg)
            if kind == "normal":
                nn.init.normal_(p, 0.0, scale)
            elif name.endswith(".bias"):  # (norm weights keep the ones they were built with)
                nn.init.zeros_(p)

    def forward(self, h: torch.Tensor, modality: torch.Tensor, positions: torch.Tensor | None = None,
                kv_caches=None, segment_ids: torch.Tensor | None = None):
        """h: [B, S, C] input embeddings (or a previous pipeline stage's output); modality: [B, S]
        -> (logits [B, S, V], aux loss scalar). Layers held by other pipeline stages are skipped; a
        stage without the LM head returns its last hidden states [B, S, C] instead of logits.
        positions: [S] or [B, S] (default 0..S-1); segment_ids: [B, S] for packed rows (attention
        stays inside each segment), None = causal over the whole row. Both describe the whole
        sequence, also when h is a sequence-parallel shard (attention sees it gathered)."""
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        mask = None  # built once here for every layer (not per layer)
        if segment_ids is not None:
            mask = attention_bias(block_causal_mask(segment_ids), compute_dtype(h))
        aux_total = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            if is_absent(layer):
                continue
            h, aux = layer(h, modality, self.rope, positions, None if kv_caches is None else kv_caches[i],
                           mask)
            if aux is not None:
                aux_total = aux_total + aux
        if is_absent(self.lm_head):
            return h, aux_total
        return self.lm_head(self.norm(h)), aux_total

"""Analytic FLOP count of one training step of a config, the peak bf16 throughput of common GPUs,
and model FLOP utilisation (MFU) from the two.

Conventions (what "TFLOP/s" and "MFU" mean wherever this project reports them):
- one multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax, activations,
  the loss and the optimizer are a few percent at real sizes and are left out, as in Megatron-LM's
  and PaLM's formulas);
- attention scores count the full S x S square, causal or not: QK^T and PV cost 2 * S * (heads *
  head_dim) each per token, 4 * S * heads * head_dim together. This is Megatron-LM's convention
  (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", the
  4 * B * s^2 * h term of their per-layer count) and PaLM's (Chowdhery et al. 2022, appendix B:
  6N + 12 L H Q T per token). A causal kernel that skips the masked half does about half of these
  FLOPs in hardware, so the MFU of attention-heavy runs reads higher than the hardware utilisation;
- MoE layers count the top_k experts each token is routed to (not all experts), plus the router;
- training = forward + backward = 3 x forward (backward: the activation and the weight gradient
  of each product); full activation recomputation adds one more forward (4 x); selective
  recomputation (model/recompute.py) adds the forward of what it reruns: the attention scores and
  the up half of every FFN and expert MLP (2 of SwiGLU's 3 matrices, 1 of GELU's 2). This is the model
  FLOP count of MFU (PaLM appendix B): a stage that freezes weights does less work but is still
  credited 3 x, so its MFU is comparable across stages;
- the embedding lookup is free; the LM head is a [C, V] product on every token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Config, moe_layer_indices
from ..model.modality import NUM_MODALITIES


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step. `terms`: forward FLOPs by part (attention_proj, attention_scores,
    dense_ffn, moe_experts, shared_expert, router, lm_head, vision, projector)."""
    terms: dict
    multiplier: float  # 3: forward + backward; 4: with full activation recomputation
    recomputed: float = 0.0  # selective recompute: the forward FLOPs run again in backward

    @property
    def forward(self) -> float:
        return float(sum(self.terms.values()))

    @property
    def total(self) -> float:
        return self.multiplier * self.forward + self.recomputed

    def tflops_per_s(self, seconds: float) -> float:
        return self.total / seconds / 1e12


def step_flops(cfg: Config, num_tokens: int, seq_len: int, *, num_images: int = 0, moe_mode: str = "sparse",
               recompute: str = "none") -> FlopCount:
    """FLOPs of one training step over `num_tokens` decoder tokens in sequences of `seq_len`, with
    `num_images` images through the vision tower. `moe_mode`: how the MoE-designated layers run
    (dense / evolve: the dense FFN, stage II runs FFN1 only; sparse: routed experts)."""
    if seq_len <= 0 or num_tokens < 0 or num_images < 0:
        raise ValueError(f"step_flops: seq_len must be > 0 and counts >= 0, got seq_len={seq_len}, "
                         f"num_tokens={num_tokens}, num_images={num_images}")
    per_token = _decoder_per_token(cfg, seq_len, moe_mode)
    terms = {name: num_tokens * f for name, f in per_token.items()}
    if num_images:
        terms.update({name: num_images * f for name, f in _vision_per_image(cfg).items()})
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"step_flops: recompute must be none, selective or full, got {recompute!r}")
    again = 0.0
    if recompute == "selective":
        up_share = 2 / 3 if cfg.model.ffn_activation == "swiglu" else 1 / 2  # the up half's matrices
        again = terms["attention_scores"] + up_share * (terms["dense_ffn"] + terms["moe_experts"])
    return FlopCount(terms=terms, multiplier=4.0 if recompute == "full" else 3.0, recomputed=again)


def _decoder_per_token(cfg: Config, seq_len: int, moe_mode: str) -> dict:
    m = cfg.model
    C, F, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    head_dim = C // m.num_heads
    q_width, kv_width = m.num_heads * head_dim, m.num_kv_heads * head_dim  # GQA: k and v are narrower
    ffn_mats = 3 if m.ffn_activation == "swiglu" else 2  # swiglu: gate, up, down; gelu: up, down
    dense_ffn = 2 * ffn_mats * C * F
    num_moe = len(moe_layer_indices(cfg)) if moe_mode == "sparse" else 0
    expert = dense_ffn  # experts are the dense FFN they are upcycled from (moe/experts.py): same matrices
    shared = 2 * 3 * C * cfg.moe.shared_expert_size + 2 * C if cfg.moe.shared_expert_size else 0
    return {
        "attention_proj": L * 2 * C * (2 * q_width + 2 * kv_width),  # q, k, v and the output projection
        "attention_scores": L * 4 * seq_len * q_width,  # QK^T + PV over the full square (see above)
        "dense_ffn": (L - num_moe) * dense_ffn,
        "moe_experts": num_moe * cfg.moe.top_k * expert,
        "shared_expert": num_moe * shared,
        "router": num_moe * router_flops_per_token(cfg),
        "lm_head": 2 * C * m.vocab_size,
    }


def router_flops_per_token(cfg: Config) -> int:
    """Forward FLOPs of one MoE layer's router on one token."""
    C, E = cfg.model.hidden_size, cfg.moe.num_experts
    r = cfg.router
    if r.type == "linear":
        return 2 * C * E
    if r.type == "linear_per_modality":  # moe/router.py computes every modality's logits, then picks one
        return 2 * NUM_MODALITIES * C * E
    H, R, D = r.hyper_hidden_size, r.rank, r.embed_dim
    # the DTR's bilinear form (kernels/dtr_reference.py): h = W1 z; p = W2_down z [H, 2R]; u = h.p +
    # b2_down z; q = W2_up a [H, D] (a = SwiGLU(u), [R]); e = h.q + b2_up a; logits = phi e
    macs = C * H + C * H * 2 * R + H * 2 * R + C * 2 * R + R * H * D + H * D + R * D + D * E
    return 2 * macs


def _vision_per_image(cfg: Config) -> dict:
    v = cfg.vision
    if not v.enabled:
        raise ValueError("step_flops: num_images > 0 but vision.enabled is false")
    Dv, P = v.hidden_size, v.num_image_tokens
    P_all = P + int(v.cls_token)  # the class token goes through every block
    block = 2 * Dv * 3 * Dv + 2 * Dv * Dv + 2 * 2 * Dv * v.ffn_hidden_size + 4 * P_all * Dv  # qkv, proj, MLP, attn
    C = cfg.model.hidden_size
    projector = 2 * Dv * C + (2 * C * C if v.projector == "mlp2x_gelu" else 0)
    return {
        "vision": P * 2 * 3 * v.patch_size ** 2 * Dv + P_all * v.num_layers * block,  # patch conv + blocks
        "projector": P * projector,
    }


# Dense (not 2:4 sparse) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, which print the
# sparse figure with an asterisk: A100 "312 | 624*", H100 SXM "1,979*", H100 PCIe "1,513*", H100 NVL
# "1,671*", H200 SXM "1,979*", H200 NVL "1,671*", L40S "733*", L4 "242*", A10 "125 | 250*", HGX B200
# "4.5 PF*" per GPU. H800 / A800 are the export variants with the same tensor cores as H100 / A100.
# First match wins: the narrower names come before the names they contain.
PEAK_BF16_TFLOPS = (
    (r"h100.*nvl", 835.0),
    (r"h100.*pcie", 756.0),
    (r"h200.*nvl", 835.0),
    (r"gh200", 989.0),
    (r"h100|h200|h800", 989.0),
    (r"a100|a800", 312.0),
    (r"b200", 2250.0),
    (r"l40s", 362.0),
    (r"\bl4\b", 121.0),
    (r"\ba10\b", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like torch.cuda.get_device_name(); None when not in the table."""
    name = device_name.lower()
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None


def mfu(flops: FlopCount | float, seconds: float, peak: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s of `flops` done in `seconds` over `peak` TFLOP/s."""
    total = flops.total if isinstance(flops, FlopCount) else float(flops)
    return total / seconds / (peak * 1e12)

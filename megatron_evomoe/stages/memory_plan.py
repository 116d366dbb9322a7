"""The memory plan of a layout: bytes per rank, per training stage, before anything runs.

Terms (one row per training stage, for its most loaded pipeline stage):

- params: every parameter and buffer this rank holds, fp32 (train.bf16 is autocast over fp32 weights);
- grads: fp32 gradients of the rank's trainable parameters (live from the first micro-batch's backward
  to the optimizer step: with gradient accumulation, during every later forward);
- optimizer: AdamW's two fp32 moments of the trainable parameters; with parallel.zero1 (dp > 1) a
  1/dp range (1/expert-dp for experts) of moments plus the fp32 master copy of that range
  (parallel/data_parallel.py::ZeroAdamW);
- evolved: stage II's frozen evolved FFN copies (moe/evolution.py: num_experts - 1 buffers per FFN);
- activations: what autograd keeps for backward per micro-batch (derived per tensor below; one image
  per sample, the worst case; under bf16 with the bf16 weight copies autocast makes), times the
  micro-batches in flight (1F1B: pp - pipeline rank, at most the accumulation steps);
- logits: the LM head's logits and the loss buffers of one micro-batch (last pipeline stage only);
- rerun: with train.recompute, what the backward's rerun of the largest layer adds on top (the loss
  buffers but the logits are freed by then, so only the excess over them counts).

The parameter terms are exact: the element counts come from the real model built on the meta device and
sharded as the parallel code shards it (`ShardCounts`, counted by parallel/shard_counts.py, passed in:
this layer does not import parallel/). Activations are derived from the shapes; tests/stages/
test_memory_plan.py checks the total against a measured training step (LiveTensorBytes).

The total is the sum: the peak at the start of the last micro-batch's backward, when the gradients of
the earlier micro-batches, every kept activation and the loss buffers are alive at once. With one
micro-batch per step and no pipeline the gradients are not yet alive then, so the total is an upper
bound by up to the gradient term. Not counted: the allocator's caching and fragmentation, CUDA
context and communication buffers (NCCL), the gradient buckets in flight during the last backward,
and the transient copies of the optimizer step (it runs after the activations are freed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config, ConfigError
from ..config.global_batch import accumulation_steps
from ..model.llm import rotary_dim

GIB = 2 ** 30
FP32 = 4
INT64 = 8
TERMS = ("params", "grads", "optimizer", "evolved", "activations", "logits", "rerun")


@dataclass(frozen=True)
class ShardCounts:
    """Elements one rank holds for one training stage (from the sharded meta model).

    trains: which parts train (their prefixes: "vision", "projector", "embed", "layers.{i}.attn_norm",
    "layers.{i}.attn", "layers.{i}.mlp_norm", "layers.{i}.mlp" (FFN or experts), "layers.{i}.router",
    "norm", "lm_head"), over the whole model; layers: the decoder layers this rank holds, with the kind
    of their MLP (dense, evolve, sparse); matrices: elements of the 2-D+ weights each part holds here
    (what autocast casts to bf16), by the same prefixes."""
    pp_rank: int
    num_params: int  # parameters + buffers other than the evolved copies
    num_trainable_dense: int
    num_trainable_expert: int
    num_evolved: int
    layers: tuple[tuple[int, str], ...]
    has_first: bool  # vision, projector and embedding are here
    has_last: bool  # final norm and LM head are here
    trains: frozenset = frozenset()
    matrices: dict = field(default_factory=dict)


@dataclass
class StagePlan:
    stage: str
    moe_mode: str
    pp_rank: int
    num_micro: int  # micro-batches per step per data-parallel rank
    num_in_flight: int
    terms: dict  # term -> bytes

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass(frozen=True)
class Dims:
    """Per-micro-batch shapes on one rank (letters as docs/CONVENTIONS.md)."""
    B: int
    S: int
    C: int
    F: int
    nh: int
    nkv: int
    tp: int
    sp: bool  # sequence parallelism: the residual stream is a 1/tp sequence shard
    act: int  # bytes of a linear's output: 2 under bf16 autocast, else 4
    bf16: bool
    fused_router: bool  # the DTR runs its fused (CUDA) op, not its PyTorch reference

    @property
    def T(self) -> int:
        return self.B * self.S

    @property
    def Tr(self) -> int:  # tokens of the residual stream on this rank
        return -(-self.T // self.tp) if self.sp else self.T

    @property
    def hd(self) -> int:
        return self.C // self.nh


# --------------------------------------------------------------------------------------------------
# Activations: what autograd keeps for backward, per tensor (bytes of one micro-batch)
# --------------------------------------------------------------------------------------------------
# Rules used throughout: a linear keeps its input only when its weight trains (the input's gradient needs
# the weight alone); a norm keeps its normalised input only when its gain trains, and its rsqrt [T, 1]
# whenever a gradient flows through it; under bf16 autocast every linear casts its fp32 input to a bf16
# copy of its own and keeps that copy. The residual stream stays fp32 (the embedding is fp32 and
# fp32 + bf16 is fp32). A tensor is kept only if a gradient flows into it: `grad_in` says whether one
# flows into a block's input (something upstream trains).

def _linear_inputs(d: Dims, rows: int, width: int, num_linears: int) -> int:
    """Bytes the linears reading one fp32 tensor [rows, width] keep: the shared tensor, or one bf16
    copy each under autocast."""
    return num_linears * rows * width * 2 if d.bf16 else rows * width * FP32


def _norm(d: Dims, grad_in: bool, gain_trains: bool) -> int:
    # the normalised x [Tr, C] fp32 (for the gain's gradient), rsqrt [Tr, 1] fp32 (for x's)
    return gain_trains * d.Tr * d.C * FP32 + grad_in * d.Tr * FP32


def attention_bytes(d: Dims, grad_in: bool, norm_trains: bool, attn_trains: bool, selective: bool,
                    rotary_dim: int) -> int:
    """attn_norm -> wq/wk/wv -> RoPE -> SDPA -> wo -> residual add, on one TP rank (nh/tp heads).

    kept: the norm's (above); wq/wk/wv's input [T, C] (gathered under SP); RoPE's cos/sin tables
    [S, rd] x 2 per q and k; SDPA's q, k, v [B, nh/tp, S, hd] (nkv for k, v) and, unless selective
    recomputes the core, its output and log-sum-exp [B, nh/tp, S] fp32; wo's input (the SDPA output);
    the residual sum [Tr, C] fp32 (the next norm's input)."""
    grad = grad_in or norm_trains or attn_trains  # a gradient flows through the attention core
    if not grad:
        return 0
    nhl, q_width, kv_width = d.nh // d.tp, d.C // d.tp, d.nkv * d.hd // d.tp
    kept = _norm(d, grad_in, norm_trains)
    kept += attn_trains * _linear_inputs(d, d.T, d.C, 3)
    kept += grad * 4 * d.S * rotary_dim * d.act
    kept += grad * d.T * (q_width + 2 * kv_width) * d.act  # (selective: the recompute's inputs)
    kept += ((grad and not selective) or attn_trains) * d.T * q_width * d.act
    kept += (grad and not selective) * d.B * nhl * d.S * FP32
    return kept + d.Tr * d.C * FP32


def ffn_bytes(d: Dims, grad_in: bool, norm_trains: bool, ffn_trains: bool, selective: bool, swiglu: bool) -> int:
    """mlp_norm -> FFN (w_gate, w_up [C, F/tp] -> silu(gate) * up -> w_down) -> residual add.

    kept: the norm's; w_gate/w_up's input [T, C] (selective: the checkpoint's fp32 input instead);
    unless selective: gate, silu(gate), up [T, F/tp] (GELU: up only); w_down's input [T, F/tp]; the
    residual sum [Tr, C] fp32."""
    grad = grad_in or norm_trains or ffn_trains  # a gradient flows through the FFN's hidden
    if not grad:
        return 0
    Fl = d.F // d.tp
    kept = _norm(d, grad_in, norm_trains)
    if selective:
        kept += grad * d.T * d.C * FP32
    else:
        kept += ffn_trains * _linear_inputs(d, d.T, d.C, 2 if swiglu else 1)
        kept += grad * (3 if swiglu else 1) * d.T * Fl * d.act
    kept += ffn_trains * d.T * Fl * d.act
    return kept + d.Tr * d.C * FP32


def router_bytes(cfg: Config, d: Dims, router_trains: bool, fused: bool) -> int:
    """What the router of a MoE layer keeps per token when a gradient reaches it (tokens [T]).

    Every router: logits and probabilities [T, E] fp32 (the z-loss's logsumexp and the softmax keep
    them), top-k ids int64 and gates fp32 [T, K], the logsumexp [T]. The DTR on CUDA (fused Triton op,
    ops/dtr.py) keeps its input z [T, C] fp32 and its hypernetwork's h [T, H], u [T, 2R], e [T, D]. Its
    PyTorch reference (the CPU backend, kernels/dtr_reference.py) keeps what autograd needs from its
    einsums: h [T, H], P = z W2_down [T, H, 2R], u [T, 2R], silu(u_R) [T, R], Q = a W2_up [T, H, D], and
    when the router trains the matmuls' inputs z [T, C], a [T, R], e [T, D]. A linear router keeps z
    when it trains."""
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    per_token = 2 * E * FP32 + K * (INT64 + FP32) + FP32
    r = cfg.router
    H, R, D = r.hyper_hidden_size, r.rank, r.embed_dim
    if r.type != "dtr":
        per_token += router_trains * d.C * FP32
    elif fused:
        per_token += (d.C + H + 2 * R + D) * FP32
    else:
        per_token += (H + H * 2 * R + 2 * R + R + H * D) * FP32 + router_trains * (d.C + R + D) * FP32
    return d.T * per_token


def moe_bytes(cfg: Config, d: Dims, grad_in: bool, norm_trains: bool, experts_train: bool, router_trains: bool,
              selective: bool, fused_router: bool) -> int:
    """mlp_norm -> router -> permute -> grouped experts -> unpermute -> residual add.

    Tokens are balanced over the experts: T*K rows reach this rank's experts (also under EP).
    kept: the norm's; the router's (`router_bytes`); the permutation's row map [T, K] int64; the
    experts' input x_perm [T*K, C] (the grouped GEMMs' custom ops keep their inputs whenever the graph
    is recorded); unless selective: up, gate, silu(gate) [T*K, F/tp]; w_down's input [T*K, F/tp]; the
    unpermute's y_perm [T*K, C]; the residual sum [Tr, C] fp32."""
    grad = grad_in or norm_trains
    g_router = grad or router_trains  # the router's graph is recorded
    g_experts = grad or experts_train
    if not (g_router or g_experts):
        return 0
    swiglu = cfg.model.ffn_activation == "swiglu"
    Fl, TK = d.F // d.tp, d.T * cfg.moe.top_k
    kept = _norm(d, grad_in, norm_trains)
    kept += g_router * router_bytes(cfg, d, router_trains, fused_router)
    kept += grad * TK * INT64
    if g_experts:
        kept += _linear_inputs(d, TK, d.C, 2 if swiglu else 1) if not selective else TK * d.C * FP32
        kept += (not selective) * (3 if swiglu else 1) * TK * Fl * d.act
        kept += TK * Fl * d.act
    kept += (g_experts or g_router) * TK * d.C * d.act
    return kept + d.Tr * d.C * FP32


def vision_bytes(cfg: Config, d: Dims, vision_trains: bool, projector_trains: bool) -> int:
    """ViT (N = B images of P patches, +1 class token) -> projector -> the splice into the text.

    Nothing is kept when neither trains (the images need no gradient). Per block with a gradient:
    LayerNorm's mean and rstd [N, P, 1] x 2 fp32 and input; qkv's input (when it trains), SDPA's
    q, k, v, output and log-sum-exp; the residual [N, P, Dv] fp32; fc1's input (when it trains), its
    output, quick_gelu's sigmoid, fc2's input (when it trains), the next residual. The projector keeps
    the features (when it trains), its GELU's input and output; the splice keeps its row index [T]."""
    v = cfg.vision
    N, P, Dv, Fv = d.B, v.num_image_tokens + int(v.cls_token), v.hidden_size, v.ffn_hidden_size
    kept = 0
    if vision_trains:
        rows = N * P
        per_block = (2 * 2 * rows * FP32 + 2 * _linear_inputs(d, rows, Dv, 1) + 5 * rows * Dv * d.act
                     + N * v.num_heads * P * FP32 + 2 * rows * Dv * FP32
                     + (2 + (v.activation == "quick_gelu")) * rows * Fv * d.act)
        kept += v.num_layers * per_block + rows * Dv * FP32 * (1 + v.pre_norm)  # + the stem's sums
        kept += v.final_norm * 2 * rows * FP32
    if vision_trains or projector_trains:
        C, Np = cfg.model.hidden_size, N * v.num_image_tokens
        kept += projector_trains * _linear_inputs(d, Np, Dv, 1) + 2 * Np * C * d.act + d.T * INT64
    return kept


def lm_head_bytes(d: Dims, norm_trains: bool, head_trains: bool) -> int:
    """Final norm -> LM head: the norm's and the head's input [T, C] (gathered under SP)."""
    return _norm(d, True, norm_trains) + head_trains * _linear_inputs(d, d.T, d.C, 1)


def logits_bytes(d: Dims, vocab_size: int) -> int:
    """The logits [B, S, V/tp] (bf16 under autocast), the loss's fp32 log-probabilities (or the
    vocab-parallel softmax) of the shifted logits [B*(S-1), V/tp], and at the start of backward, while
    they are all alive, the fp32 gradients of the log-probabilities and of the shifted logits."""
    Vl = -(-vocab_size // d.tp)
    shifted = d.B * (d.S - 1) * Vl
    return d.T * Vl * d.act + 3 * shifted * FP32


def _grad_into_rank(counts: ShardCounts) -> bool:
    """Whether a gradient flows into this rank's first decoder layer (something upstream trains)."""
    first_layer = min(i for i, _ in counts.layers)
    return any(p in counts.trains for p in ("vision", "projector", "embed")) or any(
        p.startswith("layers.") and int(p.split(".")[1]) < first_layer for p in counts.trains)


def _layers_with_grad(cfg: Config, d: Dims, counts: ShardCounts, mode: str):
    """(layer index, bytes it keeps under `mode`, gradient into it, gradient out of it) per layer here."""
    grad = _grad_into_rank(counts)
    for i, kind in counts.layers:
        kept, grad_out = _layer_bytes(cfg, d, i, kind, grad, counts.trains, mode)
        yield i, kind, kept, grad, grad_out
        grad = grad_out


def rank_activation_bytes(cfg: Config, d: Dims, counts: ShardCounts) -> int:
    """One micro-batch's kept activations on this rank (its pipeline stage's layers only), plus under
    bf16 the bf16 copies of the weights that autocast makes and the linears keep for backward."""
    t, mode = counts.trains, cfg.train.recompute
    grad = _grad_into_rank(counts)
    kept = 0
    copies = set()  # parts whose matrices autocast copies and keeps
    if counts.has_first:
        kept += vision_bytes(cfg, d, "vision" in t, "projector" in t)
        copies |= {p for p, on in (("vision", "vision" in t), ("projector", grad)) if on}
        kept += grad * d.Tr * d.C * FP32  # the decoder's input (the spliced embeddings)
    for i, _, kept_layer, _, grad_out in _layers_with_grad(cfg, d, counts, mode):
        if grad_out and mode != "full":
            copies |= _layer_parts(i)
        kept += kept_layer
    if counts.has_last:
        kept += lm_head_bytes(d, "norm" in t, "lm_head" in t)
        copies.add("lm_head")
    if d.bf16:
        kept += 2 * sum(n for p, n in counts.matrices.items() if p in copies)
    return kept


def _layer_parts(i: int) -> set[str]:
    return {f"layers.{i}.attn", f"layers.{i}.mlp", f"layers.{i}.router"}


def rerun_bytes(cfg: Config, d: Dims, counts: ShardCounts) -> int:
    """What recompute adds in backward beyond the loss buffers, which are freed by then but for the logits
    tensor (the step's output holds it): the largest layer's rerun (under full its whole forward, with
    its bf16 weight copies; under selective the recomputed core and FFN up half) plus the gradient of
    that layer's output [Tr, C] fp32. 0 without recompute."""
    mode = cfg.train.recompute
    if mode == "none":
        return 0
    largest = 0
    for i, kind, kept, grad_in, grad_out in _layers_with_grad(cfg, d, counts, mode):
        if not grad_out:
            continue
        again = _layer_bytes(cfg, d, i, kind, grad_in, counts.trains, "none")[0] - kept
        if d.bf16 and mode == "full":
            again += 2 * sum(n for p, n in counts.matrices.items() if p in _layer_parts(i))
        largest = max(largest, again)
    if not largest:
        return 0
    loss_buffers = 0
    if counts.has_last:
        loss_buffers = logits_bytes(d, cfg.model.vocab_size) - d.T * -(-cfg.model.vocab_size // d.tp) * d.act
    return max(0, largest + d.Tr * d.C * FP32 - loss_buffers)


def _layer_bytes(cfg: Config, d: Dims, i: int, kind: str, grad_in: bool, t, mode: str) -> tuple[int, bool]:
    """(bytes decoder layer i keeps, whether a gradient flows out of it)."""
    parts = {k: f"layers.{i}.{k}" in t for k in ("attn_norm", "attn", "mlp_norm", "mlp", "router")}
    grad_out = grad_in or any(parts.values())
    if mode == "full":  # only the checkpoint's input (when nothing kept it before) and its output
        return (grad_out and not grad_in) * d.Tr * d.C * FP32 + grad_out * d.Tr * d.C * FP32, grad_out
    selective, swiglu = mode == "selective", cfg.model.ffn_activation == "swiglu"
    kept = attention_bytes(d, grad_in, parts["attn_norm"], parts["attn"], selective, rotary_dim(cfg.model))
    grad_mid = grad_in or parts["attn_norm"] or parts["attn"]
    if kind == "sparse":
        kept += moe_bytes(cfg, d, grad_mid, parts["mlp_norm"], parts["mlp"], parts["router"], selective,
                          d.fused_router)
    else:  # dense and evolve (stage II's forward is FFN1 alone)
        kept += ffn_bytes(d, grad_mid, parts["mlp_norm"], parts["mlp"], selective, swiglu)
    return kept, grad_out


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
def dims(cfg: Config, device_type: str = "cuda") -> Dims:
    """The shapes of one micro-batch on a rank whose tensors live on `device_type` (it picks the DTR's
    backend: the fused op on CUDA unless router.backend=torch, the PyTorch reference elsewhere)."""
    m, p = cfg.model, cfg.parallel
    return Dims(B=cfg.train.micro_batch_size, S=cfg.data.seq_len, C=m.hidden_size, F=m.ffn_hidden_size,
                nh=m.num_heads, nkv=m.num_kv_heads, tp=p.tp, sp=bool(p.sequence_parallel and p.tp > 1),
                act=2 if cfg.train.bf16 else 4, bf16=cfg.train.bf16,
                fused_router=device_type == "cuda" and cfg.router.backend != "torch")


def optimizer_bytes(cfg: Config, counts: ShardCounts, dp: int, edp: int) -> int:
    """AdamW's 2 fp32 moments; under ZeRO-1 a 1/dp range of them plus the fp32 master of the range."""
    if not (cfg.parallel.zero1 and dp > 1):
        return 2 * FP32 * (counts.num_trainable_dense + counts.num_trainable_expert)
    ranges = -(-counts.num_trainable_dense // dp) + -(-counts.num_trainable_expert // edp)
    return 3 * FP32 * ranges


def stage_terms(cfg: Config, counts: ShardCounts, num_micro: int, dp: int, edp: int,
                device_type: str = "cuda") -> tuple[dict, int]:
    """(term -> bytes, micro-batches in flight) of one rank in one training stage."""
    in_flight = min(cfg.parallel.pp - counts.pp_rank, num_micro)  # 1F1B's warm-up depth
    d = dims(cfg, device_type)
    terms = {
        "params": FP32 * counts.num_params,
        "grads": FP32 * (counts.num_trainable_dense + counts.num_trainable_expert),
        "optimizer": optimizer_bytes(cfg, counts, dp, edp),
        "evolved": FP32 * counts.num_evolved,
        "activations": in_flight * rank_activation_bytes(cfg, d, counts),
        "logits": logits_bytes(d, cfg.model.vocab_size) if counts.has_last else 0,
        "rerun": rerun_bytes(cfg, d, counts),
    }
    return terms, in_flight


def plan_memory(cfg: Config, world_size: int, count_shards, device_type: str = "cuda") -> list[StagePlan]:
    """One row per training stage: the pipeline stage with the largest total.

    count_shards(cfg, world_size, stage_idx, pp_rank) -> ShardCounts (parallel/shard_counts.py);
    device_type: where the tensors live (the plan is for GPUs; "cpu" for the CPU measurement)."""
    p = cfg.parallel
    if world_size < 1 or world_size % (p.tp * p.pp):
        raise ConfigError(f"--world-size: {world_size} is not a multiple of parallel.tp * parallel.pp = "
                          f"{p.tp * p.pp}")
    dp = world_size // (p.tp * p.pp)
    if dp % p.ep:
        raise ConfigError(f"parallel.ep: {p.ep} does not divide the data-parallel size {dp} of world size "
                          f"{world_size}")
    rows = []
    for idx, stage in enumerate(cfg.stages):
        num_micro = accumulation_steps(cfg, stage, dp)
        best = None
        for pp_rank in range(p.pp):
            counts = count_shards(cfg, world_size, idx, pp_rank)
            terms, in_flight = stage_terms(cfg, counts, num_micro, dp, dp // p.ep, device_type)
            row = StagePlan(stage.name, stage.moe_mode, pp_rank, num_micro, in_flight, terms)
            if best is None or row.total > best.total:
                best = row
        rows.append(best)
    return rows


def format_plan(rows: list[StagePlan], gpu_memory_gb: float) -> str:
    """The table: one row per training stage (led by its index, so that no row starts like a row of the
    parameter table above it), GiB per term and the total."""
    head = f"{'#':<3}{'stage':<14}{'moe_mode':<9}{'pp':>3}{'micro':>6}" + "".join(f"{t:>12}" for t in TERMS) + \
        f"{'total GiB':>11}"
    lines = [f"memory per GPU (GiB, the most loaded pipeline stage; micro: micro-batches in flight) against "
             f"{gpu_memory_gb:g} GiB:", head]
    for i, r in enumerate(rows):
        lines.append(f"{i:<3}{r.stage:<14}{r.moe_mode:<9}{r.pp_rank:>3}{r.num_in_flight:>6}"
                     + "".join(f"{r.terms[t] / GIB:>12.2f}" for t in TERMS) + f"{r.total / GIB:>11.2f}")
    return "\n".join(lines)


FIXES = {
    "activations": "train.recompute=selective or full, a smaller train.micro_batch_size, or more parallel.tp "
                   "(with parallel.sequence_parallel=true)",
    "logits": "a smaller train.micro_batch_size or more parallel.tp (the vocabulary is split over TP)",
    "optimizer": "parallel.zero1=true (shards the AdamW state over data-parallel ranks) or more parallel.tp/pp",
    "params": "more parallel.tp or parallel.pp (or parallel.ep for experts)",
    "grads": "more parallel.tp or parallel.pp (or parallel.ep for experts)",
    "evolved": "more parallel.tp or parallel.pp",
    "rerun": "train.recompute=selective (reruns less than full) or more parallel.tp",
}


def verdict(rows: list[StagePlan], gpu_memory_gb: float) -> tuple[bool, str]:
    """(fits, one line): the largest stage against the GPU, and when it does not fit its biggest term and fix."""
    limit = gpu_memory_gb * GIB  # (an "80 GB" GPU holds 80 GiB)
    worst = max(rows, key=lambda r: r.total)
    if worst.total <= limit:
        return True, (f"fits: the largest stage ({worst.stage}) needs {worst.total / GIB:.2f} GiB of "
                      f"{limit / GIB:.2f} GiB per GPU")
    term = max(TERMS, key=lambda t: worst.terms[t])
    return False, (f"warning: does not fit: stage {worst.stage} needs {worst.total / GIB:.2f} GiB per GPU, more "
                   f"than {limit / GIB:.2f} GiB; the biggest term is {term} ({worst.terms[term] / GIB:.2f} GiB): "
                   f"try {FIXES[term]}")

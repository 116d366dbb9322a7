"""Turn the plain model into its parallel version (torchtitan-style `apply_*` functions).

    model = MultimodalLM(cfg, image_token_id)          # the same plain model, same seed, on every rank
    parallelize(model, state, cfg)                     # in place, in this order:
      1. split_pipeline   keep this stage's decoder layers (+ vision/embedding on the first stage,
                          final norm/LM head on the last); the others become placeholders
      2. apply_tp         shard attention heads, dense FFN columns, the experts' F dim, the
                          embedding and LM head vocabulary; optional sequence parallelism
      3. apply_ep         keep this rank's experts, install the all-to-all dispatcher
      4. apply_moe_stats  routers compute their load-balancing statistics over the DP group's
                          global batch (the aux loss does not depend on the layout)
    reducer = apply_dp(model, params, state)           # after the trainable set is known

Each step copies this rank's shard out of the full weights, so a model built with the same
seed and then parallelized computes exactly what the single-process model computes. Modules
keep their parameter names (patterns such as `llm.layers.{moe}.mlp.*` still match): a
module that needs communication is given a subclass of its own class that adds it (as
`fully_shard` does), and its `_shard_specs` say how each tensor relates to the full one.
`parallelize` is idempotent, so it is called again after every stage's structure change
(`apply_stage_structure`, which unshards the FFNs about to change, runs the plain
conversion, and re-shards the result).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..config import moe_layer_indices
from ..model.llm import FFN, Attention
from ..model.mllm import ModelOutput, MultimodalLM, causal_lm_loss_sum
from ..moe.evolution import EvolvingFFN
from ..moe.moe_layer import MoELayer
from .data_parallel import GradientReducer, ZeroAdamW
from .expert_parallel import AllToAllTokenDispatcher, ParallelGroupedExperts, use_global_batch_aux_loss
from .specialise import plain_class, specialise
from .state import REPLICATED, ParallelState, ShardSpec, comm_device, named_shard_specs
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TensorParallelContext,
                              VocabParallelEmbedding, copy_to_tp_region, enter_tp_region,
                              gather_from_sequence_region, shard_shared_expert,
                              scatter_to_sequence_region, take_shard, vocab_parallel_causal_lm_loss_sum)


def tp_context(state: ParallelState) -> TensorParallelContext:
    """The one TP context shared by every layer of this process (created on first use)."""
    ctx = getattr(state, "_tp_context", None)
    if ctx is None:
        ctx = TensorParallelContext(state.tp_group, state.tp_size, state.tp_rank, state.sequence_parallel)
        state._tp_context = ctx
    return ctx


# --------------------------------------------------------------------------------------------------
# Class specialisation: same module, same parameters, a subclass that adds the communication
# --------------------------------------------------------------------------------------------------
def _specialise(module: nn.Module, mixin: type, **attrs) -> nn.Module:
    return specialise(module, mixin, "TensorParallel", **attrs)


class _TPAttention:
    """Attention whose q/k/v are column-parallel (local heads) and wo row-parallel."""
    tp: TensorParallelContext

    def forward(self, x, rope, positions, kv_cache=None):
        # enter once for q, k and v (a copy, or the sequence all-gather under SP)
        return super().forward(enter_tp_region(x, self.tp), rope, positions, kv_cache)


class _TPFFN:
    """SwiGLU FFN (or EvolvingFFN) with w_gate/w_up column-parallel and w_down row-parallel."""
    tp: TensorParallelContext

    def forward(self, x, modality=None):
        return super().forward(enter_tp_region(x, self.tp), modality)


class _TPMoELayer:
    """Under SP the router must see the whole sequence (identical on every TP rank): gather it,
    and split the (already TP-reduced) output back. The gather's backward is a split, not a
    reduce-scatter, because both consumers (router, and experts after their own
    copy-to-region) produce the full input gradient on every rank."""
    tp: TensorParallelContext

    def forward(self, x, modality):
        if not self.tp.sp:
            return super().forward(x, modality)
        x = gather_from_sequence_region(x, self.tp.group, dim=1, reduce_grad=False)
        y, aux = super().forward(x, modality)
        return scatter_to_sequence_region(y, self.tp.group, dim=1), aux


class _SPNorm:
    """Norm on a sequence shard: its weight (and LayerNorm bias) gradient is partial on each TP
    rank, so they enter the forward through copy-to-region (identity; all-reduce of the gradient)."""
    tp: TensorParallelContext

    def forward(self, x):
        if not self.tp.sp:
            return super().forward(x)
        params = {k: v for k, v in self._parameters.items() if k in ("weight", "bias") and v is not None}
        for k, v in params.items():
            self._parameters[k] = copy_to_tp_region(v, self.tp.group)  # same trick as functional_call
        try:
            return super().forward(x)
        finally:
            self._parameters.update(params)


class _TPMultimodalLM:
    """Top-level forward under TP: SP scatter after the embedding, vocab-parallel loss."""
    tp: TensorParallelContext

    def forward(self, input_ids, images=None, labels=None) -> ModelOutput:
        h, modality = self.embed(input_ids, images)
        with tp_forward(self, h.shape[1], local_logits=labels is not None) as sp:
            if sp:
                h = scatter_to_sequence_region(h, self.tp.group, dim=1)
            positions = torch.arange(modality.shape[1], device=h.device)
            logits, aux = self.llm(h, modality, positions)
        loss_sum = num = None
        if labels is not None:
            loss_sum, num = lm_loss_sum(self, logits, labels)
        # logits: the local vocabulary shard [B, S, V/tp] when labels were given (never gathered)
        return ModelOutput(logits, loss_sum, num, aux, modality)


@contextlib.contextmanager
def tp_forward(model, seq_len: int, local_logits: bool):
    """For one forward: SP active if configured and the sequence splits evenly; LM head output
    left vocabulary-sharded if `local_logits`. Yields whether SP is active."""
    tp = getattr(model, "tp", None)
    head = getattr(model.llm, "lm_head", None)
    if tp is None:
        yield False
        return
    sp = tp.sequence_parallel and seq_len % tp.size == 0
    if tp.sequence_parallel and not sp and not getattr(tp, "_warned_sp", False):
        import logging
        logging.getLogger("megatron_evomoe").warning(
            "sequence parallelism: a sequence of %d tokens does not split over %d TP ranks; such forwards run "
            "with plain TP (same numbers, more memory)", seq_len, tp.size)
        tp._warned_sp = True
    prev = getattr(head, "gather_output", None)
    if isinstance(head, ColumnParallelLinear):
        head.gather_output = not local_logits
    try:
        with tp.sequence_parallel_region(sp):
            yield sp
    finally:
        if isinstance(head, ColumnParallelLinear):
            head.gather_output = prev


def lm_loss_sum(model, logits, labels):
    """(sum of token losses, count): vocab-parallel when the head is sharded and not gathered."""
    head = model.llm.lm_head
    if isinstance(head, ColumnParallelLinear) and logits.shape[-1] != head.full_out_features:
        return vocab_parallel_causal_lm_loss_sum(logits, labels, head)
    return causal_lm_loss_sum(logits, labels)


# --------------------------------------------------------------------------------------------------
# 2. Tensor parallelism
# --------------------------------------------------------------------------------------------------
def _live_layers(model):
    from .pipeline import is_placeholder
    return [(i, layer) for i, layer in enumerate(model.llm.layers) if not is_placeholder(layer)]


def apply_tp(model: MultimodalLM, state: ParallelState, cfg=None) -> MultimodalLM:
    """Shard the decoder over the TP group (no-op for tp == 1); idempotent."""
    if state.tp_size == 1:
        return model
    tp = tp_context(state)
    from .pipeline import is_placeholder
    for _, layer in _live_layers(model):
        _tp_attention(layer.attn, tp)
        if tp.sequence_parallel:
            _specialise(layer.attn_norm, _SPNorm, tp=tp)
            if layer.mlp_norm is not None:  # (none with model.parallel_residual)
                _specialise(layer.mlp_norm, _SPNorm, tp=tp)
        _tp_mlp(layer, tp)
    llm = model.llm
    if tp.sequence_parallel and not is_placeholder(llm.norm):
        _specialise(llm.norm, _SPNorm, tp=tp)
    if not is_placeholder(llm.embed) and not isinstance(llm.embed, VocabParallelEmbedding):
        llm.embed = VocabParallelEmbedding.from_embedding(llm.embed, tp)
    if not is_placeholder(llm.lm_head) and not isinstance(llm.lm_head, ColumnParallelLinear):
        tied = llm.cfg.tie_embeddings
        llm.lm_head = ColumnParallelLinear.from_linear(llm.lm_head, tp, input_mode="enter", gather_output=True)
        if tied:  # same vocabulary partition on both sides: re-tie the shards
            llm.lm_head.weight = llm.embed.weight
    _specialise(model, _TPMultimodalLM, tp=tp)
    return model


def _tp_attention(attn: Attention, tp: TensorParallelContext) -> None:
    if isinstance(attn, _TPAttention):
        return
    for name in ("wq", "wk", "wv"):
        setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), tp, input_mode="none"))
    attn.wo = RowParallelLinear.from_linear(attn.wo, tp)
    _specialise(attn, _TPAttention, tp=tp)


def _tp_mlp(layer, tp: TensorParallelContext) -> None:
    mlp = layer.mlp
    if isinstance(mlp, (_TPFFN, _TPMoELayer)):
        return
    if isinstance(mlp, MoELayer):
        ex = ParallelGroupedExperts.adopt(mlp.experts)
        if ex.tp is None:
            # F is dim 2 of w_gate/w_up [E, C, F] and dim 1 of w_down [E, F, C]
            for name, dim in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
                _replace_param(ex, name, take_shard(getattr(ex, name), dim, tp.size, tp.rank))
                ex._shard_specs[name] = ShardSpec(tp_dim=dim, full_size=getattr(ex, name).shape[dim] * tp.size,
                                                  ep_dim=ex._shard_specs[name].ep_dim, expert=True)
            ex.tp = tp
        if getattr(mlp, "shared_expert", None) is not None:  # a dense FFN: column/row parallel
            shard_shared_expert(mlp.shared_expert, tp)
        _specialise(mlp, _TPMoELayer, tp=tp)
        return
    if isinstance(mlp, FFN):  # FFN and EvolvingFFN
        if getattr(mlp, "w_gate", None) is not None:  # (a GELU FFN has w_up and w_down only)
            mlp.w_gate = ColumnParallelLinear.from_linear(mlp.w_gate, tp, input_mode="none")
        mlp.w_up = ColumnParallelLinear.from_linear(mlp.w_up, tp, input_mode="none")
        mlp.w_down = RowParallelLinear.from_linear(mlp.w_down, tp)
        if isinstance(mlp, EvolvingFFN):  # the evolved copies follow FFN1's sharding: [N, *w.shape]
            mlp._shard_specs = {}
            for name, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):
                buf = f"evolved_{name}"
                full = getattr(mlp, buf)
                setattr(mlp, buf, take_shard(full, dim, tp.size, tp.rank))
                mlp._shard_specs[buf] = ShardSpec(tp_dim=dim, full_size=full.shape[dim])
        _specialise(mlp, _TPFFN, tp=tp)
        return
    raise TypeError(f"apply_tp: no tensor-parallel plan for {type(mlp).__name__}")


def _replace_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


# --------------------------------------------------------------------------------------------------
# 3. Expert parallelism
# --------------------------------------------------------------------------------------------------
def apply_ep(model: MultimodalLM, state: ParallelState, cfg=None) -> MultimodalLM:
    """Keep experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of every MoE layer; all-to-all dispatch."""
    for _, layer in _live_layers(model):
        mlp = layer.mlp
        if not isinstance(mlp, MoELayer):
            continue
        ex = ParallelGroupedExperts.adopt(mlp.experts)
        if state.ep_size == 1 or isinstance(mlp.dispatcher, AllToAllTokenDispatcher):
            continue
        E = ex.num_global_experts
        if E % state.ep_size:
            raise ValueError(f"parallel.ep: {state.ep_size} does not divide moe.num_experts={E}")
        El = E // state.ep_size
        start = state.ep_rank * El
        for name in ("w_gate", "w_up", "w_down"):
            _replace_param(ex, name, getattr(ex, name)[start:start + El].detach().clone())
            ex._shard_specs[name] = ShardSpec(tp_dim=ex._shard_specs[name].tp_dim,
                                              full_size=ex._shard_specs[name].full_size, ep_dim=0, expert=True)
        ex.expert_offset = start
        mlp.dispatcher = AllToAllTokenDispatcher(E, state.ep_group, backend=mlp.dispatcher.backend)
    return model


# --------------------------------------------------------------------------------------------------
# 4. Global-batch router statistics
# --------------------------------------------------------------------------------------------------
def apply_moe_stats(model: MultimodalLM, state: ParallelState, cfg=None) -> MultimodalLM:
    """Routers all-reduce their load-balancing statistics over the DP group (dp > 1)."""
    if state.dp_size == 1:
        return model
    for _, layer in _live_layers(model):
        if isinstance(layer.mlp, MoELayer):
            use_global_batch_aux_loss(layer.mlp.router, state.dp_group)
    return model


# --------------------------------------------------------------------------------------------------
# Everything, in order
# --------------------------------------------------------------------------------------------------
def parallelize(model: MultimodalLM, state: ParallelState, cfg) -> MultimodalLM:
    """Apply PP split, TP, EP and the global-batch router statistics, in that order (idempotent)."""
    from .pipeline import split_pipeline
    if state.pp_size > 1:
        split_pipeline(model, state, cfg)  # 1. first, so later steps only touch this stage's modules
    apply_tp(model, state, cfg)  # 2. shards from the full weights
    apply_ep(model, state, cfg)  # 3. after TP: slices the (F-sharded) experts along the expert dim
    apply_moe_stats(model, state, cfg)  # 4.
    return model


def apply_dp(model: nn.Module, params: list[tuple[str, nn.Parameter]], state: ParallelState,
             bucket_size_mb: float = 25.0) -> GradientReducer:
    """The gradient reducer for this stage's trainable parameters (call `reduce()` after backward)."""
    return GradientReducer(model, params, state, bucket_size_mb=bucket_size_mb)


# --------------------------------------------------------------------------------------------------
# Stage structure changes under parallelism
# --------------------------------------------------------------------------------------------------
def apply_stage_structure(model: MultimodalLM, cfg, stage, generator: torch.Generator,
                          state: ParallelState) -> None:
    """`training.stages.apply_stage_structure` for a parallelized model.

    The FFNs of the MoE-designated layers are gathered back to full plain modules, the plain
    conversion runs on them exactly as in a single process (same generator draws, same global
    RNG draws, also for the layers of other pipeline stages, which are converted as throwaway
    shadows), and the result is parallelized again. New replicated parameters (routers) are
    then broadcast within the stage so that every rank holds the same values.
    """
    from ..training.stages import apply_stage_structure as plain_apply
    from .pipeline import pipeline_shadows
    before = {id(p) for p in model.parameters()}
    for i in moe_layer_indices(cfg):
        layer = model.llm.layers[i]
        if isinstance(getattr(layer, "mlp", None), _TPFFN):
            layer.mlp = unshard_ffn(layer.mlp, state)
    with pipeline_shadows(model, cfg):
        plain_apply(model, cfg, stage, generator)
    parallelize(model, state, cfg)
    _broadcast_new_replicated(model, state, before)


def unshard_ffn(mlp: nn.Module, state: ParallelState) -> nn.Module:
    """A TP-sharded FFN / EvolvingFFN -> the full plain module (collective over TP)."""
    full = gather_module_state(mlp, state)
    w_gate = full["w_gate.weight"]
    cls = plain_class(mlp)
    with torch.device("meta"):  # no init draws from the global RNG: the weights come from `full`
        plain = cls(w_gate.shape[1], w_gate.shape[0], mlp.num_evolved) if issubclass(cls, EvolvingFFN) \
            else cls(w_gate.shape[1], w_gate.shape[0])
    plain = plain.to_empty(device=w_gate.device).to(w_gate.dtype)
    plain.load_state_dict(full)
    for name, p in plain.named_parameters():
        p.requires_grad_(mlp.get_parameter(name).requires_grad)
    return plain


@torch.no_grad()
def _broadcast_new_replicated(model: nn.Module, state: ParallelState, before: set) -> None:
    group = state.stage_group
    if group is None:
        return
    specs = named_shard_specs(model)
    src = state.group_ranks["stage"][0]
    for name, p in model.named_parameters():
        if id(p) not in before and specs.get(name, REPLICATED).tp_dim is None and not specs.get(name, REPLICATED).expert:
            dist.broadcast(p.data, src=src, group=group)


# --------------------------------------------------------------------------------------------------
# Full (unsharded) state dicts
# --------------------------------------------------------------------------------------------------
def _gather_tensor(t: torch.Tensor, spec: ShardSpec, state: ParallelState) -> torch.Tensor:
    if spec.tp_dim is not None and state.tp_group is not None:
        parts = [torch.empty_like(t) for _ in range(state.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=state.tp_group)
        t = torch.cat(parts, dim=spec.tp_dim).narrow(spec.tp_dim, 0, spec.full_size)
    if spec.ep_dim is not None and state.ep_group is not None:
        parts = [torch.empty_like(t) for _ in range(state.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=state.ep_group)
        t = torch.cat(parts, dim=spec.ep_dim)
    return t


def gather_module_state(module: nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """The full state dict of one module (collective over the TP and EP groups)."""
    specs = named_shard_specs(module)
    return {k: _gather_tensor(v.detach(), specs.get(k, REPLICATED), state) for k, v in module.state_dict().items()}


def full_state_dict(model: nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """The single-process state dict of the whole model, on every rank (collective: all ranks).

    Gathers TP shards (trimming vocabulary padding) and EP shards, then merges the pipeline
    stages. Keys and shapes are those of the plain model.
    """
    out = {k: v.cpu().clone() for k, v in gather_module_state(model, state).items()}  # (CPU: pickled below)
    if state.pp_group is not None:
        parts = [None] * state.pp_size
        dist.all_gather_object(parts, out, group=state.pp_group)
        out = {}
        for part in parts:
            out.update(part)
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], state: ParallelState,
                         strict: bool = True) -> None:
    """Load a single-process state dict into a parallelized model: each rank takes its shard
    (the resharding path: any layout can load what any other layout saved, once consolidated)."""
    specs = named_shard_specs(model)
    local = model.state_dict()
    missing = [k for k in local if k not in full]
    from ..training.checkpoint import CheckpointError
    if strict and missing:
        raise CheckpointError(f"load_full_state_dict: {len(missing)} tensors missing from the checkpoint, "
                              f"e.g. {missing[0]!r}")
    for k, dst in local.items():
        if k not in full:
            continue
        src, spec = full[k], specs.get(k, REPLICATED)
        if spec.ep_dim is not None:
            n = dst.shape[spec.ep_dim]
            src = src.narrow(spec.ep_dim, state.ep_rank * n, n)
        if spec.tp_dim is not None:
            src = take_shard(src, spec.tp_dim, state.tp_size, state.tp_rank)
        if src.shape != dst.shape:
            raise CheckpointError(f"load_full_state_dict: {k}: checkpoint shard {tuple(src.shape)} does not fit "
                                  f"the model's {tuple(dst.shape)}")
        dst.copy_(src)


def local_parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters this rank holds, by kind (for logs and sharding tests)."""
    specs = named_shard_specs(model)
    out = {"total": 0, "tp_sharded": 0, "expert": 0, "replicated": 0}
    for name, p in model.named_parameters():
        s = specs.get(name, REPLICATED)
        out["total"] += p.numel()
        out["expert" if s.expert else "tp_sharded" if s.tp_dim is not None else "replicated"] += p.numel()
    return out



# --------------------------------------------------------------------------------------------------
# What the trainer calls (training/trainer.py: `Trainer(cfg, parallel_state)`)
# --------------------------------------------------------------------------------------------------
class ParallelTraining:
    """The trainer's parallel hooks, in the order a step uses them.

        par = ParallelTraining(model, state, cfg)        # parallelizes the model
        par.apply_stage_structure(stage, gen)            # instead of training.stages.apply_stage_structure
        par.set_trainable(stage, idx)                    # pattern check over all pipeline stages
        zero = par.start_stage(params, lr, wd, betas)    # the stage's gradient reducer, or (parallel.zero1)
                                                         # its ZeRO-1 optimizer, used instead of AdamW
        n = par.global_tokens(n_local)                   # supervised tokens of the global step
        lm, aux = par.forward_backward(micro, n, ...)    # pipeline only (pp > 1): 1F1B
        norm = par.reduce_and_clip(params, max_norm)     # DP/expert-DP all-reduce (ZeRO-1: reduce-scatter),
                                                         # global norm, clip
        lm, aux = par.sum_losses(lm, aux)                # the global step's losses, for the record
    """

    def __init__(self, model, state: ParallelState, cfg, bucket_size_mb: float | None = None):
        self.model, self.state, self.cfg = model, state, cfg
        self.bucket_size_mb = cfg.parallel.bucket_mb if bucket_size_mb is None else bucket_size_mb
        self.reducer: GradientReducer | None = None
        self.zero_optimizer: ZeroAdamW | None = None
        self.param_names: list[str] = []
        parallelize(model, state, cfg)

    @property
    def pipeline(self) -> bool:
        return self.state.pp_size > 1

    @property
    def zero1(self) -> bool:
        """ZeRO-1 in use: `parallel.zero1` and a replica group to shard the optimizer state over
        (with dp == 1 the option is a no-op: the plain optimizer runs; expert-DP <= DP)."""
        return bool(self.cfg.parallel.zero1) and self.state.dp_size > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes logs and metrics (global rank 0; under PP its stage has no
        loss, but `sum_losses` gives every rank the full values)."""
        return self.state.rank == 0

    def checkpoint_dir(self, save_dir):
        """Each rank saves its own shard: <save_dir>/ranks/<layout>/<rank>/checkpoints/... (reshard.py)."""
        from .reshard import rank_checkpoint_dir
        return rank_checkpoint_dir(save_dir, self.state)

    def checkpoint_meta(self) -> dict:
        """Saved with each rank's shard: specs, coordinates, optimizer parameter names (reshard.py)."""
        from .reshard import checkpoint_meta
        return dict(checkpoint_meta(self.model, self.state, self.param_names), zero1=self.zero1)

    def load_state(self, ckpt_state: dict, opt, load_optimizer: bool) -> None:
        """Restore model (and optimizer) from this layout's own shard, or reshard a consolidated
        (single-process) checkpoint to this layout."""
        from ..training.checkpoint import CheckpointError
        from .reshard import layout_name, shard_state_for
        own = ckpt_state.get("parallel", {}).get("layout") == layout_name(self.state)
        saved_zero1 = bool(ckpt_state.get("parallel", {}).get("zero1", False))
        # ZeRO-1 moments are per-replica ranges of the flattened parameters, not per-tensor: they
        # load only into the same layout with the same setting (a stage-end checkpoint, whose
        # optimizer is not loaded, works either way)
        if load_optimizer and (saved_zero1 != self.zero1 if own else self.zero1):
            raise CheckpointError(
                f"parallel.zero1: cannot resume mid-stage from a checkpoint saved with zero1={saved_zero1} "
                f"{'in this layout' if own else '(consolidated or another layout)'} with zero1={self.zero1}; "
                "resume with the setting and layout it was saved with, or from a stage-end checkpoint")
        if own:
            model_sd, opt_sd = ckpt_state["model"], ckpt_state["optimizer"]
        else:
            model_sd, opt_sd = shard_state_for(self.model, self.state, ckpt_state, self.param_names)
        self.model.load_state_dict(model_sd)
        if load_optimizer and self.param_names:  # (a stage holding no trainable tensor has nothing to load)
            opt.load_state_dict(opt_sd)

    def apply_stage_structure(self, stage, generator) -> None:
        apply_stage_structure(self.model, self.cfg, stage, generator, self.state)

    def set_trainable(self, stage, stage_idx: int) -> list[str]:
        """`training.stages.set_trainable`, but a pattern only has to match on *some* pipeline
        stage (the projector lives on the first stage only, for example)."""
        import fnmatch

        from ..config import ConfigError
        from ..training.stages import expand_patterns
        patterns = expand_patterns(stage.trainable, self.cfg)
        used = torch.zeros(len(patterns), dtype=torch.int32)  # on the CPU while filled, then moved
        names = []
        for name, p in self.model.named_parameters():
            hits = [i for i, pat in enumerate(patterns) if fnmatch.fnmatchcase(name, pat)]
            p.requires_grad_(bool(hits))
            used[hits] = 1
            if hits:
                names.append(name)
        if self.state.pp_group is not None:
            used = used.to(comm_device(self.state.pp_group))
            dist.all_reduce(used, op=dist.ReduceOp.MAX, group=self.state.pp_group)
            used = used.cpu()
        unused = [patterns[i] for i in range(len(patterns)) if not used[i]]
        if unused:
            raise ConfigError(f"stages[{stage_idx}].trainable: pattern {unused[0]!r} matches no parameter "
                              f"of the model in stage {stage.name!r}")
        return names

    def start_stage(self, params, lr: float, weight_decay: float, betas: tuple[float, float]) -> ZeroAdamW | None:
        """The stage's gradient reducer; with ZeRO-1 the stage's sharded optimizer instead, returned
        for the trainer to use in place of AdamW (None: the trainer builds its usual optimizer)."""
        self.param_names = [n for n, _ in params]
        self.reducer = self.zero_optimizer = None
        if self.zero1:
            self.zero_optimizer = ZeroAdamW(self.model, params, self.state, lr=lr, betas=betas,
                                            weight_decay=weight_decay)
        else:
            self.reducer = apply_dp(self.model, params, self.state, self.bucket_size_mb)
        return self.zero_optimizer

    def global_tokens(self, num_tokens: int) -> int:
        from .data_parallel import all_reduce_floats
        return int(round(all_reduce_floats([float(num_tokens)], self.state.dp_group)[0]))

    def forward_backward(self, micro, num_tokens: int, device, bf16: bool) -> tuple[float, float]:
        from .pipeline import forward_backward_1f1b
        out = forward_backward_1f1b(self.model, self.state, micro, num_tokens, device,
                                    autocast_dtype=torch.bfloat16 if bf16 else None)
        return out["lm_loss"], out["aux_loss"]

    def reduce_and_clip(self, params, max_norm: float) -> float:
        from .data_parallel import clip_grad_norm_
        if self.zero_optimizer is not None:  # each replica gets the summed gradient of its range only
            self.zero_optimizer.reduce_gradients()
            return self.zero_optimizer.clip_grad_norm_(max_norm)
        self.reducer.reduce()
        return clip_grad_norm_(self.model, params, max_norm, self.state)

    def sum_losses(self, lm: float, aux: float) -> tuple[float, float]:
        """This rank's loss contributions -> the global step's losses (sum over DP; the pipeline
        schedule already summed over its stages)."""
        from .data_parallel import all_reduce_floats
        lm, aux = all_reduce_floats([lm, aux], self.state.dp_group)
        return lm, aux

    def agree_on_step(self, global_step: int) -> None:
        """Resuming: every rank must have found the checkpoint of the same step."""
        if self.state.world_size == 1:
            return
        t = torch.tensor([global_step, -global_step], dtype=torch.int64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.cpu()
        if int(t[0]) != -int(t[1]):
            from ..training.checkpoint import CheckpointError
            raise CheckpointError(f"ranks found checkpoints of different steps (from {-int(t[1])} to {int(t[0])}); "
                                  "delete the newer per-rank checkpoints or restore the missing ones")

"""The tensor-parallel plan: which module of the model becomes which sharded layer, and the hooks
that move activations in and out of the TP region (torchtitan's `parallelize_module` plans, by hand).

    apply_tp(model, state)      # in place, idempotent; a no-op for tp == 1

Per decoder layer: attention q/k/v column-parallel (local heads) and wo row-parallel; the dense
FFN (and FFN1 + its evolved copies in stage II) column/row parallel; MoE experts sharded along
their F dim; the shared expert column/row parallel. Embedding and LM head are split over the
vocabulary; the loss becomes the vocabulary-parallel cross-entropy (`MultimodalLM.loss_fn`).

Activations cross the region boundaries in forward hooks, so the model keeps its one forward:
  * attention / FFN pre-hook: enter the region (a copy, or the sequence all-gather under SP);
    their row-parallel output layer leaves it (all-reduce, or reduce-scatter under SP);
  * MoE layer under SP: the router must see the whole sequence, identical on every TP rank, so
    the input is gathered (backward: a split, since every consumer produces the full gradient)
    and the TP-reduced output split again;
  * decoder (`model.llm`) pre-hook under SP: scatter the sequence when it arrives whole (from the
    embedding; a later pipeline stage receives it already split);
  * top-level pre/post hooks: SP is *active* only inside the model's forward and only when the
    sequence splits evenly, and the LM head leaves its logits vocabulary-sharded when labels are
    given (the loss never needs them whole). Code that calls the decoder directly (KV-cache
    generation) therefore runs plain TP with gathered logits.
Norms on a sequence shard see a partial gradient of their weights: their SP twins pass the
weights through copy-to-region (identity forward, all-reduce of the gradient).
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..model.absent import is_absent
from ..model.llm import FFN, LayerNorm, RMSNorm, layer_norm, rms_norm
from ..moe.evolution import EvolvingFFN
from ..moe.experts import dense_tensors, intermediate_dim
from ..moe.moe_layer import MoELayer
from .expert_parallel import ParallelGroupedExperts
from .state import ParallelState, ShardSpec
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TensorParallelContext,
                              VocabParallelEmbedding, copy_to_tp_region, enter_tp_region,
                              gather_from_sequence_region, scatter_to_sequence_region, shard_shared_expert,
                              take_shard, vocab_parallel_causal_lm_loss_sum)

log = logging.getLogger("megatron_evomoe")


def tp_context(state: ParallelState) -> TensorParallelContext:
    """The one TP context shared by every layer of this process (created on first use)."""
    ctx = getattr(state, "_tp_context", None)
    if ctx is None:
        ctx = TensorParallelContext(state.tp_group, state.tp_size, state.tp_rank, state.sequence_parallel)
        state._tp_context = ctx
    return ctx


def apply_tp(model, state: ParallelState, cfg=None):
    """Shard the model over the TP group in place (no-op for tp == 1); idempotent."""
    if state.tp_size == 1:
        return model
    tp = tp_context(state)
    llm = model.llm
    for layer in llm.layers:
        if is_absent(layer):
            continue
        _tp_attention(layer.attn, tp)
        _tp_mlp(layer.mlp, tp)
        if tp.sequence_parallel:
            sequence_parallel_norm(layer.attn_norm, tp)
            if layer.mlp_norm is not None:  # (none with model.parallel_residual)
                sequence_parallel_norm(layer.mlp_norm, tp)
    if tp.sequence_parallel and not is_absent(llm.norm):
        sequence_parallel_norm(llm.norm, tp)
    if not is_absent(llm.embed) and not isinstance(llm.embed, VocabParallelEmbedding):
        llm.embed = VocabParallelEmbedding.from_embedding(llm.embed, tp)
    if not is_absent(llm.lm_head) and not isinstance(llm.lm_head, ColumnParallelLinear):
        tied = llm.cfg.tie_embeddings
        llm.lm_head = ColumnParallelLinear.from_linear(llm.lm_head, tp, input_mode="enter", gather_output=True)
        if tied:  # same vocabulary partition on both sides: re-tie the shards
            llm.lm_head.weight = llm.embed.weight
        model.loss_fn = functools.partial(vocab_parallel_causal_lm_loss_sum, head=llm.lm_head)
    _hook_once(llm, "pre", functools.partial(_scatter_whole_sequence, tp=tp))
    _hook_once(model, "pre", functools.partial(_enter_model, tp=tp), with_kwargs=True)
    _hook_once(model, "post", functools.partial(_exit_model, tp=tp), always_call=True)
    model.tp = tp
    return model


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
def _hook_once(module: nn.Module, kind: str, hook, **kw) -> None:
    """Register `hook` ("pre" or "post" forward hook) unless this module already has one of that kind
    from the plan (the plan runs again after every stage structure change)."""
    done = module.__dict__.setdefault("_tp_hooks", set())
    if kind in done:
        return
    if kind == "pre":
        module.register_forward_pre_hook(hook, **kw)
    else:
        module.register_forward_hook(hook, **kw)
    done.add(kind)


def _enter_input(module, args, tp: TensorParallelContext):
    """Attention / FFN input [B, S(/tp), C] -> [B, S, C], replicated over TP (one entry for q, k, v)."""
    return (enter_tp_region(args[0], tp), *args[1:])


def _gather_moe_input(module, args, tp: TensorParallelContext):
    if not tp.sp:
        return None
    return (gather_from_sequence_region(args[0], tp.group, dim=1, reduce_grad=False), *args[1:])


def _split_moe_output(module, args, output, tp: TensorParallelContext):
    if not tp.sp:
        return None
    y, aux = output
    return scatter_to_sequence_region(y, tp.group, dim=1), aux


def _scatter_whole_sequence(module, args, tp: TensorParallelContext):
    h, modality = args[0], args[1]
    if not tp.sp or h.shape[1] != modality.shape[1]:  # not SP, or already a shard (a later stage)
        return None
    return (scatter_to_sequence_region(h, tp.group, dim=1), *args[1:])


def _enter_model(model, args, kwargs, tp: TensorParallelContext):
    """For one top-level forward: SP active if configured and the sequence splits evenly; logits
    left vocabulary-sharded when labels are given."""
    seq_len = (args[0] if args else kwargs["input_ids"]).shape[1]
    labels = args[2] if len(args) > 2 else kwargs.get("labels")
    sp = tp.sequence_parallel and seq_len % tp.size == 0
    if tp.sequence_parallel and not sp and not getattr(tp, "_warned_sp", False):
        log.warning("sequence parallelism: a sequence of %d tokens does not split over %d TP ranks; such forwards "
                    "run with plain TP (same numbers, more memory)", seq_len, tp.size)
        tp._warned_sp = True
    tp.__dict__.setdefault("_saved", []).append(tp.sp_active)
    tp.sp_active = sp
    head = model.llm.lm_head
    if isinstance(head, ColumnParallelLinear):
        head.gather_output = labels is None
    return None


def _exit_model(model, args, output, tp: TensorParallelContext):
    tp.sp_active = tp._saved.pop()
    head = model.llm.lm_head
    if isinstance(head, ColumnParallelLinear):
        head.gather_output = True  # what direct callers of the decoder (generation) get
    return None


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def _tp_attention(attn, tp: TensorParallelContext) -> None:
    if isinstance(attn.wq, ColumnParallelLinear):
        return
    for name in ("wq", "wk", "wv"):
        setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), tp, input_mode="none"))
    attn.wo = RowParallelLinear.from_linear(attn.wo, tp)
    _hook_once(attn, "pre", functools.partial(_enter_input, tp=tp))


def is_tp_sharded_ffn(mlp) -> bool:
    """A dense FFN or EvolvingFFN whose weights this plan has sharded."""
    return isinstance(mlp, FFN) and isinstance(mlp.w_up, ColumnParallelLinear)


def _tp_mlp(mlp, tp: TensorParallelContext) -> None:
    if isinstance(mlp, MoELayer):
        _tp_moe(mlp, tp)
    elif isinstance(mlp, FFN):  # FFN and EvolvingFFN
        _tp_ffn(mlp, tp)
    else:
        raise TypeError(f"apply_tp: no tensor-parallel plan for {type(mlp).__name__}")


def _tp_ffn(mlp, tp: TensorParallelContext) -> None:
    if is_tp_sharded_ffn(mlp):
        return
    if getattr(mlp, "w_gate", None) is not None:  # (a GELU FFN has w_up and w_down only)
        mlp.w_gate = ColumnParallelLinear.from_linear(mlp.w_gate, tp, input_mode="none")
    mlp.w_up = ColumnParallelLinear.from_linear(mlp.w_up, tp, input_mode="none")
    mlp.w_down = RowParallelLinear.from_linear(mlp.w_down, tp)
    if isinstance(mlp, EvolvingFFN):  # the evolved copies follow FFN1's sharding: [N, *w.shape]
        mlp._shard_specs = {}
        for key in dense_tensors(mlp):
            if intermediate_dim(key, stacked=False) is None:  # b_down: replicated, as FFN1's
                continue
            buf, dim = f"evolved_{key}", intermediate_dim(key, stacked=False) + 1
            full = getattr(mlp, buf)
            setattr(mlp, buf, take_shard(full, dim, tp.size, tp.rank))
            mlp._shard_specs[buf] = ShardSpec(tp_dim=dim, full_size=full.shape[dim])
    _hook_once(mlp, "pre", functools.partial(_enter_input, tp=tp))


def _tp_moe(mlp: MoELayer, tp: TensorParallelContext) -> None:
    ex = ParallelGroupedExperts.adopt(mlp.experts)
    if ex.tp is None:
        # F is dim 2 of w_gate/w_up [E, C, F], dim 1 of w_down [E, F, C] and b_gate/b_up [E, F];
        # b_down [E, C] stays whole on every TP rank (added after the partial outputs' sum)
        for name in ex.tensor_keys:
            dim = intermediate_dim(name, stacked=True)
            if dim is None:
                continue
            replace_param(ex, name, take_shard(getattr(ex, name), dim, tp.size, tp.rank))
            ex._shard_specs[name] = ShardSpec(tp_dim=dim, full_size=getattr(ex, name).shape[dim] * tp.size,
                                              ep_dim=ex._shard_specs[name].ep_dim, expert=True)
        ex.tp = tp
    if getattr(mlp, "shared_expert", None) is not None:  # a dense FFN: column/row parallel
        shard_shared_expert(mlp.shared_expert, tp)
    _hook_once(mlp, "pre", functools.partial(_gather_moe_input, tp=tp))
    _hook_once(mlp, "post", functools.partial(_split_moe_output, tp=tp))


def replace_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


# --------------------------------------------------------------------------------------------------
# Norms on a sequence shard
# --------------------------------------------------------------------------------------------------
def _sp_param(p: torch.Tensor, tp: TensorParallelContext) -> torch.Tensor:
    return copy_to_tp_region(p, tp.group) if tp.sp else p


class SequenceParallelRMSNorm(RMSNorm):
    tp: TensorParallelContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, _sp_param(self.weight, self.tp), self.eps)


class SequenceParallelLayerNorm(LayerNorm):
    tp: TensorParallelContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, _sp_param(self.weight, self.tp), _sp_param(self.bias, self.tp), self.eps)


_SP_NORMS = {RMSNorm: SequenceParallelRMSNorm, LayerNorm: SequenceParallelLayerNorm}


def sequence_parallel_norm(norm: nn.Module, tp: TensorParallelContext) -> None:
    """Make `norm` its sequence-parallel twin in place (same parameters and names; idempotent)."""
    if type(norm) in _SP_NORMS:
        norm.__class__ = _SP_NORMS[type(norm)]
    assert type(norm) in _SP_NORMS.values(), f"no sequence-parallel norm for {type(norm).__name__}"
    norm.tp = tp

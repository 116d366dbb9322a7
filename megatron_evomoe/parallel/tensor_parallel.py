"""Tensor (and sequence) parallelism: autograd-aware collectives and sharded layers.

Collectives (one autograd.Function, `_Conjugate`: the backward is the conjugate collective):

    copy_to_tp_region          fwd identity          bwd all-reduce      (enter a TP region, replicated input)
    reduce_from_tp_region      fwd all-reduce        bwd identity        (leave it: sum partial outputs)
    gather_from_tp_region      fwd all-gather(dim)   bwd split(dim)
    scatter_to_tp_region       fwd split(dim)        bwd all-gather(dim)
    gather_from_sequence_region fwd all-gather(seq)  bwd reduce-scatter(seq), or split when the
                               consumers are replicated (`reduce_grad=False`)
    reduce_scatter_to_sequence_region fwd reduce-scatter(seq)  bwd all-gather(seq)

Layers: `ColumnParallelLinear` (output features split), `RowParallelLinear` (input features
split, partial outputs summed), `VocabParallelEmbedding` (vocabulary rows split) and the
vocab-parallel cross-entropy (the logits never exist whole on one rank).

Biases: a column-parallel bias is split with the output features; a row-parallel bias is
replicated and added once, after the partial outputs are summed. Under SP that sum is
reduce-scattered, so each rank sees only its sequence shard and holds a partial bias
gradient: the bias enters through copy-to-region (all-reduce of its gradient), as the
norms' weights and biases do (parallel/tensor_parallel_plan.py `SequenceParallelRMSNorm`).

Sequence parallelism (Megatron SP): between blocks the residual stream is split along the
sequence over the TP ranks ([B, S/tp, C]); norms run on the shard; entering attention/FFN
all-gathers the sequence, leaving them reduce-scatters it. SP is configured once
(`TensorParallelContext.sequence_parallel`) and *active* only inside the model's top-level
forward (`sp_active`), so code that calls the decoder directly (KV-cache generation, one
token at a time) runs the same weights in plain TP mode.

A process group of None means "no tensor parallelism": every collective is a no-op.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.recompute import keep_for_recompute
from .flat_collectives import all_gather_single, reduce_scatter_single
from .specialise import specialise
from .state import ShardSpec


class TensorParallelContext:
    """What a TP layer needs: its group, size, rank and whether SP is on (shared by all layers)."""

    def __init__(self, group, size: int, rank: int, sequence_parallel: bool = False):
        self.group, self.size, self.rank = group, size, rank
        self.sequence_parallel = sequence_parallel and size > 1
        self.sp_active = False  # set by the top-level forward for its duration
        keep_for_recompute(self)  # a recomputed layer (backward, after that forward) sees it as it was

    def forward_state(self) -> bool:
        return self.sp_active

    def set_forward_state(self, active: bool) -> None:
        self.sp_active = active

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.sp_active

    @contextlib.contextmanager
    def sequence_parallel_region(self, active: bool):
        prev, self.sp_active = self.sp_active, active
        try:
            yield
        finally:
            self.sp_active = prev


# --------------------------------------------------------------------------------------------------
# Raw collectives (no autograd)
# --------------------------------------------------------------------------------------------------
def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _on_dim0(x: torch.Tensor, group, dim: int, out_rows: int, collective) -> torch.Tensor:
    """Run a dim-0 `collective(out, x, group=...)` along `dim`: move it to the front, then back."""
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((out_rows, *front.shape[1:]))
    collective(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return _on_dim0(x, group, dim, n * x.shape[dim], all_gather_single)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    _check_divisible(x, dim, n, "reduce-scatter")
    return _on_dim0(x, group, dim, x.shape[dim] // n, reduce_scatter_single)


def _check_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise ValueError(f"{what}: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    _check_divisible(x, dim, n, "split")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


# --------------------------------------------------------------------------------------------------
# Autograd-aware collectives
# --------------------------------------------------------------------------------------------------
def _identity(x, group, dim):
    return x.view_as(x)


def _all_reduce_dim(x, group, dim):
    return _all_reduce(x, group)


class _Conjugate(torch.autograd.Function):
    """A collective `fwd(x, group, dim)` whose backward is the conjugate collective `bwd(g, group, dim)`
    (all-reduce <-> identity, all-gather <-> split or reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, dim, fwd, bwd):
        ctx.group, ctx.dim, ctx.bwd = group, dim, bwd
        return fwd(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.group, ctx.dim), None, None, None, None


def copy_to_tp_region(x, group):
    """Identity forward; all-reduce of the gradient (the input is replicated, its users are sharded)."""
    return x if group is None else _Conjugate.apply(x, group, 0, _identity, _all_reduce_dim)


def reduce_from_tp_region(x, group):
    """All-reduce forward (sum the partial results of the shards); identity backward."""
    return x if group is None else _Conjugate.apply(x, group, 0, _all_reduce_dim, _identity)


def gather_from_tp_region(x, group, dim: int = -1):
    return x if group is None else _Conjugate.apply(x, group, dim % x.dim(), _all_gather, _split)


def scatter_to_tp_region(x, group, dim: int = -1):
    return x if group is None else _Conjugate.apply(x, group, dim % x.dim(), _split, _all_gather)


def gather_from_sequence_region(x, group, dim: int = 1, reduce_grad: bool = True):
    """All-gather the sequence shards. Backward: reduce-scatter when the gathered tensor feeds
    sharded weights (each rank holds a partial gradient), a plain split when it feeds
    replicated computations (every rank holds the full gradient)."""
    backward = _reduce_scatter if reduce_grad else _split
    return x if group is None else _Conjugate.apply(x, group, dim, _all_gather, backward)


def reduce_scatter_to_sequence_region(x, group, dim: int = 1):
    return x if group is None else _Conjugate.apply(x, group, dim, _reduce_scatter, _all_gather)


def scatter_to_sequence_region(x, group, dim: int = 1):
    return scatter_to_tp_region(x, group, dim)


def enter_tp_region(x: torch.Tensor, tp: TensorParallelContext) -> torch.Tensor:
    """Input of a block whose first weights are column-parallel: [B, S(/tp), C] -> [B, S, C]."""
    if tp.sp:
        return gather_from_sequence_region(x, tp.group, dim=1, reduce_grad=True)
    return copy_to_tp_region(x, tp.group)


def exit_tp_region(y: torch.Tensor, tp: TensorParallelContext) -> torch.Tensor:
    """Output of a row-parallel weight: sum the partial results (and re-split the sequence under SP)."""
    if tp.sp:
        return reduce_scatter_to_sequence_region(y, tp.group, dim=1)
    return reduce_from_tp_region(y, tp.group)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def shard_range(full: int, size: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, padded local size) of rank's contiguous chunk of `full` rows, padded up to
    a multiple of `size` (only the vocabulary is ever padded; other dims are validated)."""
    local = math.ceil(full / size)
    start = rank * local
    return start, min(start + local, full), local


def take_shard(t: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    """Rank's chunk of `t` along `dim`, zero-padded to the common chunk size; a new tensor."""
    start, stop, local = shard_range(t.shape[dim], size, rank)
    piece = t.narrow(dim, start, max(stop - start, 0))
    if piece.shape[dim] < local:
        pad_shape = list(t.shape)
        pad_shape[dim] = local - piece.shape[dim]
        piece = torch.cat([piece, t.new_zeros(pad_shape)], dim=dim)
    return piece.detach().clone()


def _materialise(module: nn.Module, device) -> nn.Module:
    """A module built on the meta device, given real (uninitialised) storage. Sharded layers are
    built this way because their values are copied from the full layer: drawing an init from the
    global RNG would shift every later draw (e.g. the routers created at a stage change) away
    from what a single-process run draws."""
    return module.to_empty(device=device)


class ColumnParallelLinear(nn.Linear):
    """y = x A^T with A's rows (output features) split: rank r holds rows [r*out/tp, (r+1)*out/tp).

    input_mode: "enter" (the layer itself enters the TP region: copy, or sequence gather
    under SP) or "none" (the caller already did, once for several layers: attention's q/k/v).
    gather_output: all-gather the output features (trimmed to `full_out_features`).
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelContext, bias: bool = False,
                 input_mode: str = "enter", gather_output: bool = False, device=None, dtype=None):
        start, stop, local = shard_range(out_features, tp.size, tp.rank)
        super().__init__(in_features, local, bias=bias, device=device, dtype=dtype)
        self.tp, self.input_mode, self.gather_output = tp, input_mode, gather_output
        self.full_out_features, self.out_start = out_features, start
        self._shard_specs = {"weight": ShardSpec(tp_dim=0, full_size=out_features)}
        if bias:
            self._shard_specs["bias"] = ShardSpec(tp_dim=0, full_size=out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TensorParallelContext, **kw) -> "ColumnParallelLinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, tp, bias=linear.bias is not None,
                  device="meta", dtype=w.dtype, **kw)
        new = _materialise(new, w.device)
        with torch.no_grad():
            new.weight.copy_(take_shard(w, 0, tp.size, tp.rank))
            if linear.bias is not None:
                new.bias.copy_(take_shard(linear.bias, 0, tp.size, tp.rank))
                new.bias.requires_grad_(linear.bias.requires_grad)
        new.weight.requires_grad_(w.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode == "enter":
            x = enter_tp_region(x, self.tp)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tp_region(y, self.tp.group, dim=-1)[..., :self.full_out_features]
        return y


class RowParallelLinear(nn.Linear):
    """y = x A^T with A's columns (input features) split; the input arrives split the same way
    (the output of a column-parallel layer); partial outputs are summed (reduce-scattered under SP).

    output_mode: "exit" (sum, or reduce-scatter along the sequence under SP) or "reduce" (always a
    plain all-reduce: for tokens that are not sequence-split, e.g. the flattened [T, C] tokens
    inside a MoE layer, which gathers the sequence itself).
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelContext, bias: bool = False,
                 output_mode: str = "exit", device=None, dtype=None):
        if in_features % tp.size:
            raise ValueError(f"RowParallelLinear: in_features={in_features} is not divisible by tp={tp.size}")
        super().__init__(in_features // tp.size, out_features, bias=bias, device=device, dtype=dtype)
        self.tp, self.full_in_features, self.output_mode = tp, in_features, output_mode
        self._shard_specs = {"weight": ShardSpec(tp_dim=1, full_size=in_features)}

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: TensorParallelContext, output_mode: str = "exit"
                    ) -> "RowParallelLinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, tp, bias=linear.bias is not None,
                  output_mode=output_mode, device="meta", dtype=w.dtype)
        new = _materialise(new, w.device)
        with torch.no_grad():
            new.weight.copy_(take_shard(w, 1, tp.size, tp.rank))
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
                new.bias.requires_grad_(linear.bias.requires_grad)
        new.weight.requires_grad_(w.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        sequence_split = self.output_mode == "exit" and self.tp.sp
        y = exit_tp_region(y, self.tp) if self.output_mode == "exit" else reduce_from_tp_region(y, self.tp.group)
        if self.bias is None:
            return y
        # added once, after the sum; on a sequence shard its gradient is partial: all-reduce it
        return y + (copy_to_tp_region(self.bias, self.tp.group) if sequence_split else self.bias)


class VocabParallelEmbedding(nn.Embedding):
    """Rows of the embedding table split over TP (padded to a multiple of tp); a rank looks up the
    ids it owns, zeros the others, and the partial rows are summed over the group."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallelContext, device=None, dtype=None):
        start, stop, local = shard_range(num_embeddings, tp.size, tp.rank)
        super().__init__(local, embedding_dim, device=device, dtype=dtype)
        self.tp, self.full_num_embeddings = tp, num_embeddings
        self.vocab_start, self.vocab_end = start, stop
        self._shard_specs = {"weight": ShardSpec(tp_dim=0, full_size=num_embeddings)}

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, tp: TensorParallelContext) -> "VocabParallelEmbedding":
        w = emb.weight
        new = cls(emb.num_embeddings, emb.embedding_dim, tp, device="meta", dtype=w.dtype)
        new = _materialise(new, w.device)
        with torch.no_grad():
            new.weight.copy_(take_shard(w, 0, tp.size, tp.rank))
        new.weight.requires_grad_(w.requires_grad)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        h = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(h, self.tp.group)


# --------------------------------------------------------------------------------------------------
# The shared expert of a MoE layer (moe/shared_expert.py)
# --------------------------------------------------------------------------------------------------
class _TPSharedExpertMixin:
    """SharedExpert whose FFN is column/row parallel and whose sigmoid gate stays replicated.

    It runs inside the MoE layer on the flattened tokens [T, C], which are whole on every TP rank
    (under SP the MoE layer has gathered the sequence already): so the FFN enters with a plain
    copy-to-region and its w_down all-reduces ("reduce"), never the sequence collectives. The gate
    reads x outside that region: its input gradient is already complete on every rank.
    """
    tp: TensorParallelContext

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return super().ffn(copy_to_tp_region(x, self.tp.group))


def shard_shared_expert(shared: nn.Module, tp: TensorParallelContext) -> nn.Module:
    """Shard a SharedExpert over TP in place (same parameter names; idempotent)."""
    if isinstance(shared, _TPSharedExpertMixin):
        return shared
    shared.w_gate = ColumnParallelLinear.from_linear(shared.w_gate, tp, input_mode="none")
    shared.w_up = ColumnParallelLinear.from_linear(shared.w_up, tp, input_mode="none")
    shared.w_down = RowParallelLinear.from_linear(shared.w_down, tp, output_mode="reduce")
    return specialise(shared, _TPSharedExpertMixin, "TensorParallel", tp=tp)


# --------------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy
# --------------------------------------------------------------------------------------------------
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from vocab-sharded logits: three all-reduces of [N] (max, target logit,
    sum of exp); the backward (softmax - onehot) is purely local."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, num_valid, ignore_index, group):
        # logits: [N, Vl] (this rank's vocabulary columns [vocab_start, vocab_start + Vl)), target: [N]
        logits = logits.float()
        if num_valid < logits.shape[1]:  # padded columns past the real vocabulary never win
            logits = logits.clone()
            logits[:, num_valid:] = float("-inf")
        row_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        ignored = target == ignore_index
        mine = (target >= vocab_start) & (target < vocab_start + num_valid) & ~ignored
        local_idx = (target - vocab_start).masked_fill(~mine, 0)
        rows = torch.arange(target.shape[0], device=target.device)
        picked = torch.where(mine, shifted[rows, local_idx], torch.zeros((), device=logits.device))
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        if group is not None:
            both = torch.stack([picked, sum_exp])  # one all-reduce for the two [N] vectors
            dist.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), mine, local_idx, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, mine, local_idx, ignored = ctx.saved_tensors
        grad = softmax.clone()  # keep the saved tensor intact (retain_graph)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_idx] -= mine.to(grad.dtype)
        grad.mul_((grad_loss * (~ignored).to(grad_loss.dtype)).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, num_valid: int,
                                 group, ignore_index: int = -100) -> torch.Tensor:
    """logits: [N, Vl] local vocabulary shard, target: [N] global ids -> per-token loss [N] (0 if ignored)."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, num_valid, ignore_index, group)


def vocab_parallel_causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, head: ColumnParallelLinear,
                                      ignore_index: int = -100):
    """The vocab-parallel twin of `model.mllm.causal_lm_loss_sum`: (sum of next-token losses, count).

    logits: [B, S, V/tp] from the column-parallel LM head (not gathered); labels: [B, S].
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    num_valid = max(0, min(head.full_out_features - head.out_start, logits.shape[-1]))
    loss = vocab_parallel_cross_entropy(shift_logits, shift_labels, head.out_start, num_valid, head.tp.group,
                                        ignore_index)
    return loss.sum(), (shift_labels != ignore_index).sum()

"""Expert parallelism: the all-to-all token dispatcher, expert-sharded experts, global-batch aux loss.

Each EP rank holds E/ep consecutive experts (rank j: experts [j*E/ep, (j+1)*E/ep)). A MoE
layer routes its local tokens over all E experts, then the dispatcher

  1. permutes the local tokens by global expert id (so they are grouped by destination rank),
  2. exchanges the per-(rank, local expert) counts with one all-to-all (the counts are needed
     to size the token buffers: dropless routing has data-dependent shapes); the split sizes are
     the layer's only host read (one transfer of both; nothing else in the MoE forward or
     backward waits on the device),
  3. exchanges the tokens with `all_to_all_single` (uneven splits, autograd through it),
  4. reorders the received rows from (source rank, local expert) to (local expert, source rank)
     so that the local experts' grouped GEMM sees each expert's rows contiguous;

`combine` undoes 4, 3 and 1 (weighting by the gates). The interface is the one of
`moe.token_dispatcher.LocalTokenDispatcher`, so `MoELayer` is unchanged.

The load-balancing loss must not depend on how the global batch is split over ranks, so
under data parallelism (EP included) the router's statistics (per-expert counts, token
count) are all-reduced over the DP group: see `GlobalBatchRouterMixin`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.experts import GroupedExperts
from ..moe.router import RoutingOutput
from ..ops.permute import expert_counts, permute, unpermute
from .specialise import specialise
from .state import ShardSpec
from .tensor_parallel import TensorParallelContext, copy_to_tp_region, reduce_from_tp_region
from .watchdog import collective


class _AllToAll(torch.autograd.Function):
    """Rows of x split by input_splits go to the ranks of the group; receives output_splits rows.
    Backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        with collective("all_to_all(tokens to their experts) on the expert-parallel group", group):
            dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((sum(ctx.input_splits), *g.shape[1:]))
        with collective("all_to_all(token gradients, backward) on the expert-parallel group", ctx.group):
            dist.all_to_all_single(out, g.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


class AllToAllTokenDispatcher:
    """Dropless expert-parallel dispatcher: `dispatch(x, topk_idx)` / `combine(y_perm, gates, handle)`.

    num_experts: E, the global number of experts; ep_group: the EP process group.
    `last_bytes_sent` / `bytes_sent` count the token bytes this rank sent to *other* ranks in the
    last forward / in total (dispatch + combine; `last_dispatch_bytes`: the dispatch alone),
    for tests and logs.
    """

    def __init__(self, num_experts: int, ep_group, backend: str = "auto"):
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"parallel.ep: {self.ep_size} does not divide moe.num_experts={num_experts}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.backend = backend
        self.bytes_sent = 0
        self.last_bytes_sent = 0
        self.last_dispatch_bytes = 0

    def _count_sent(self, splits: list[int], row_bytes: int) -> None:
        n = sum(s for j, s in enumerate(splits) if j != self.ep_rank) * row_bytes
        self.last_bytes_sent += n
        self.bytes_sent += n

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor):
        """x: [T, C], topk_idx: [T, K] global expert ids -> (x_local [N, C] sorted by local expert,
        tokens_per_local_expert [E/ep], handle)."""
        ep, El = self.ep_size, self.num_local_experts
        x_perm, row_map, counts = permute(x, topk_idx, self.num_experts, backend=self.backend)  # by dest rank
        # 1) counts: send[j, e] = my tokens for expert e of rank j; recv[s, e] = rank s's for my expert e
        send_counts = counts.view(ep, El).contiguous()
        recv_counts = torch.empty_like(send_counts)
        with collective("all_to_all(token counts per expert) on the expert-parallel group", self.group):
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The layer's one host read: all_to_all_single needs the split sizes on the host (dropless
        # routing: the buffer sizes depend on the data); both come back in a single transfer.
        input_splits, output_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        # 2) tokens
        self.last_bytes_sent = 0
        self._count_sent(input_splits, x.shape[1] * x.element_size())
        self.last_dispatch_bytes = self.last_bytes_sent
        x_recv = all_to_all(x_perm, output_splits, input_splits, self.group)  # [N, C], (source, expert) order
        # 3) (source, expert) chunks -> (expert, source): a stable sort of the rows by chunk key
        flat = recv_counts.reshape(-1)  # chunk c = s * El + e
        chunk = torch.repeat_interleave(torch.arange(ep * El, device=flat.device), flat,
                                        output_size=sum(output_splits))  # known size: no second read
        order = torch.sort((chunk % El) * ep + chunk // El, stable=True).indices  # [N]
        x_local = x_recv.index_select(0, order)
        tokens_per_local_expert = recv_counts.sum(0)  # [El]
        return x_local, tokens_per_local_expert, (row_map, input_splits, output_splits, order)

    def combine(self, y_local: torch.Tensor, gates: torch.Tensor, handle) -> torch.Tensor:
        """y_local: [N, C] in dispatch's output order, gates: [T, K] -> y [T, C]."""
        row_map, input_splits, output_splits, order = handle
        y_recv = y_local.index_select(0, torch.argsort(order))  # back to (source, expert) order
        self._count_sent(output_splits, y_local.shape[1] * y_local.element_size())
        y_perm = all_to_all(y_recv, input_splits, output_splits, self.group)  # back home, expert-sorted
        return unpermute(y_perm, row_map, gates, backend=self.backend)


class ParallelGroupedExperts(GroupedExperts):
    """GroupedExperts holding a shard: experts [expert_offset, expert_offset + E_local) (EP) and/or
    a slice of the F dimension (TP).

    Under TP the input rows are replicated over the TP group and each rank computes a partial
    expert output over its F slice (b_gate / b_up split with it, b_down replicated and added after the
    sum); the partial outputs are summed here (before `combine`) so
    that the gates' gradients, computed from the full expert outputs, are exact on every rank.
    `num_experts` is the *global* count (the layer's logical size, what routing ids index);
    `num_local_experts` is what this rank holds.
    """

    tp: TensorParallelContext | None = None
    num_global_experts: int = 0
    expert_offset: int = 0

    @classmethod
    def adopt(cls, experts: GroupedExperts) -> "ParallelGroupedExperts":
        """Turn a plain GroupedExperts into this class in place (same parameters and names)."""
        if not isinstance(experts, ParallelGroupedExperts):
            n = experts.w_up.shape[0]
            experts.__class__ = cls
            experts.tp, experts.num_global_experts, experts.expert_offset = None, n, 0
            experts._shard_specs = {k: ShardSpec(expert=True) for k in experts.tensor_keys}
        return experts

    @property
    def num_experts(self) -> int:
        return self.num_global_experts

    @property
    def num_local_experts(self) -> int:
        return self.w_up.shape[0]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return super().forward(x, tokens_per_expert)
        y = self.partial_output(copy_to_tp_region(x, self.tp.group), tokens_per_expert)
        # b_down (replicated over TP) once, after the sum, as RowParallelLinear's bias; the rows are
        # whole on every TP rank, so its gradient is complete on each
        return self.add_down_bias(reduce_from_tp_region(y, self.tp.group), tokens_per_expert)


# --------------------------------------------------------------------------------------------------
# Load-balancing statistics over the global batch
# --------------------------------------------------------------------------------------------------
class GlobalBatchRouterMixin:
    """Router tail whose aux and z losses are this rank's *contribution* to the global-batch losses.

    Single process: L_aux = E * sum_i f_i * P_i with f_i = n_i / (T*K) and P_i = mean_t p_ti over
    the T tokens of the micro-batch. With the micro-batch split over the DP group (T = sum_r T_r),
    each rank all-reduces [n_i, T_r] (no gradient flows through counts) and returns
    E * sum_i f_i * (sum_{t in r} p_ti) / T: the values summed over the DP ranks give exactly the
    single-process loss, and so do the gradients once the DP gradient reduction sums them.
    The z-loss (a mean over tokens) is split the same way. `tokens_per_expert` stays local.
    """

    stats_group = None

    def _finish(self, logits, probs, topk_idx, gates, counts=None) -> RoutingOutput:
        E, K = self.num_experts, self.top_k
        topk_idx, gates, counts = self.biased_choice(probs, topk_idx, gates, counts)
        if counts is None:
            counts = expert_counts(topk_idx, E)
        stats = torch.cat([counts.double(), counts.new_tensor([probs.shape[0]]).double()])
        dist.all_reduce(stats, group=self.stats_group)
        global_counts, global_tokens = stats[:E].float(), stats[E].clamp_min(1).float()
        f = global_counts / (global_tokens * K)
        aux = E * (f * (probs.float().sum(0) / global_tokens)).sum()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).sum() / global_tokens
        return RoutingOutput(logits, probs, topk_idx, gates, counts, aux, z)


def use_global_batch_aux_loss(router, dp_group) -> None:
    """Make `router` compute its losses over the DP group's global batch (in place; same parameters)."""
    specialise(router, GlobalBatchRouterMixin, "GlobalBatch", stats_group=dp_group)

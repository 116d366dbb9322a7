"""Data parallelism: bucketed gradient all-reduce (DP for dense, expert-DP for expert parameters),
the global gradient norm over all shards, and scalar reductions for logging.

Loss scaling convention. The trainer divides the LM loss of every micro-batch by the number
of supervised tokens of the *global* step (all-reduced over DP), and the MoE aux losses are
each rank's contribution to the global-batch loss (`expert_parallel.GlobalBatchRouterMixin`).
Each rank's loss is therefore its share of the single-process loss, so the gradients are
*summed* over the replicas (`average=False`, the default): the result equals the
single-process gradient of the global batch. `average=True` divides by the group size, for
callers whose per-rank loss is a mean over their own samples (the usual DDP convention).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .state import REPLICATED, ParallelState, named_shard_specs, replicas


class GradientReducer:
    """All-reduces the gradients of `params` in flat buckets of about `bucket_size_mb` MiB.

    params: [(name, parameter)] as the optimizer sees them. Expert parameters (ShardSpec.expert)
    go to the expert-DP group, the others to the DP group. A parameter whose gradient is None on
    some ranks (it received no gradient there) is reduced as zeros, and stays None only if it
    is None on every rank of its group, as in a single-process run.
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], state: ParallelState,
                 bucket_size_mb: float = 25.0, average: bool = False):
        specs = named_shard_specs(model)
        self.state, self.average = state, average
        self.bucket_bytes = max(1, int(bucket_size_mb * 2 ** 20))
        by_group: dict[str, list[tuple[str, nn.Parameter]]] = {"dp": [], "expert_dp": []}
        for name, p in params:
            by_group["expert_dp" if specs.get(name, REPLICATED).expert else "dp"].append((name, p))
        self.groups = {"dp": state.dp_group, "expert_dp": state.expert_dp_group}
        # buckets: lists of params of one dtype, filled in order up to bucket_bytes
        self.buckets: dict[str, list[list[tuple[str, nn.Parameter]]]] = {}
        for kind, items in by_group.items():
            buckets, current, size, dtype = [], [], 0, None
            for name, p in items:
                nbytes = p.numel() * p.element_size()
                if current and (p.dtype != dtype or size + nbytes > self.bucket_bytes):
                    buckets.append(current)
                    current, size = [], 0
                current.append((name, p))
                size, dtype = size + nbytes, p.dtype
            if current:
                buckets.append(current)
            self.buckets[kind] = buckets
        self.bytes_reduced = 0  # last reduce(): bytes this rank all-reduced

    def num_buckets(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.buckets.items()}

    @torch.no_grad()
    def reduce(self) -> None:
        """Call after backward, before clipping and the optimizer step."""
        self.bytes_reduced = 0
        for kind, buckets in self.buckets.items():
            group = self.groups[kind]
            if group is None:
                continue
            n = dist.get_world_size(group)
            for bucket in buckets:
                self._reduce_bucket(bucket, group, n)

    def _reduce_bucket(self, bucket, group, n: int) -> None:
        params = [p for _, p in bucket]
        # which params have a gradient anywhere in the group (one tiny all-reduce per bucket)
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
        live = [p for p, has in zip(params, present.tolist()) if has]
        if not live:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
        dist.all_reduce(flat, group=group)
        self.bytes_reduced += flat.numel() * flat.element_size()
        if self.average:
            flat.div_(n)
        offset = 0
        for p in live:
            chunk = flat[offset:offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += p.numel()


def global_grad_norm(model: nn.Module, params: list[tuple[str, nn.Parameter]], state: ParallelState) -> torch.Tensor:
    """L2 norm of the full gradient (every element of the unsharded model counted once).

    Call after the gradient reduction (DP replicas then hold identical gradients). Each rank sums
    the squares of its local gradients, each tensor divided by the number of ranks that hold an
    identical copy of it (`state.replicas`), and one all-reduce over the world adds them up.
    """
    specs = named_shard_specs(model)
    total = torch.zeros((), dtype=torch.float64)
    for name, p in params:
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum().cpu()
            total += sq / replicas(specs.get(name, REPLICATED), state)
    if state.world_size > 1:
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, params: list[tuple[str, nn.Parameter]], max_norm: float,
                    state: ParallelState) -> float:
    """Like torch.nn.utils.clip_grad_norm_, over all shards of all ranks; returns the total norm."""
    norm = float(global_grad_norm(model, params, state))
    if max_norm and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for _, p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def all_reduce_floats(values: list[float], group) -> list[float]:
    """Sum a few Python floats over a group (for logging / token counts)."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()

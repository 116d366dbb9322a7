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

from ..moe.experts import is_weight_matrix
from .flat_collectives import all_gather_single, reduce_scatter_single
from .state import REPLICATED, ParallelState, comm_device, named_shard_specs, replicas
from .watchdog import collective


class GradientReducer:
    """All-reduces the gradients of `params` in flat buckets of about `bucket_size_mb` MiB, each
    bucket starting during the backward pass as soon as its gradients are final.

    params: [(name, parameter)] as the optimizer sees them. Expert parameters (ShardSpec.expert)
    go to the expert-DP group, the others to the DP group. A parameter whose gradient is None on
    some ranks (it received no gradient there) is reduced as zeros, and stays None only if it
    is None on every rank of its group, as in a single-process run: each bucket carries one
    presence flag per tensor after its gradients, summed with them.

    Overlap (as DDP): call `final_backward()` before the backward of a step's LAST micro-batch (the
    trainer's loop; the 1F1B schedule before its last backward). During that backward each
    parameter's post-accumulate hook marks it ready, and a bucket whose parameters are all ready
    is all-reduced asynchronously. Buckets are filled from the last parameter to the first (the
    order in which backward finishes them) and launched strictly in bucket order, so every rank of
    a group issues the same collectives in the same order (NCCL matches them by issue order; a
    bucket that is ready early waits for its predecessors). `reduce()` launches what is left
    (buckets with a tensor that got no gradient on this rank, or everything when `final_backward`
    was not called) and waits for all. Earlier micro-batches only accumulate: nothing is sent.
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
        # buckets: lists of params of one dtype, filled up to bucket_bytes from the LAST parameter
        # (its gradient is final first in backward), so bucket 0 can start first
        self.buckets: dict[str, list[list[tuple[str, nn.Parameter]]]] = {}
        for kind, items in by_group.items():
            buckets, current, size, dtype = [], [], 0, None
            for name, p in reversed(items):
                nbytes = p.numel() * p.element_size()
                if current and (p.dtype != dtype or size + nbytes > self.bucket_bytes):
                    buckets.append(current)
                    current, size = [], 0
                current.append((name, p))
                size, dtype = size + nbytes, p.dtype
            if current:
                buckets.append(current)
            self.buckets[kind] = buckets
        self.bytes_reduced = 0  # last step: gradient bytes this rank all-reduced (flags not counted)
        self.launch_log: list[tuple[str, int, bool]] = []  # last step: (kind, bucket, launched in backward)
        self._pending: dict[str, list] = {}  # kind -> [(bucket index, work, flat)] in launch order
        self._num_ready: dict[tuple[str, int], int] = {}
        self._where: dict[int, tuple[str, int]] = {}
        self._hooks = []
        for kind, buckets in self.buckets.items():
            if self.groups[kind] is None:
                continue
            for b, bucket in enumerate(buckets):
                for _, p in bucket:
                    self._where[id(p)] = (kind, b)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        self._reset()

    def num_buckets(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.buckets.items()}

    def _reset(self) -> None:
        self._armed = False
        self._pending = {kind: [] for kind in self.buckets}
        self._num_ready = {}
        self._fresh = True  # the next launch is the step's first (it clears the last step's record)

    def final_backward(self) -> None:
        """The next backward is the step's last: start each bucket's all-reduce when it is ready."""
        self._armed = True

    def remove_hooks(self) -> None:
        """Detach from the parameters (a new stage builds a new reducer)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        kind, b = self._where[id(p)]
        self._num_ready[(kind, b)] = self._num_ready.get((kind, b), 0) + 1
        self._launch_ready(kind, in_backward=True)

    def _launch_ready(self, kind: str, in_backward: bool) -> None:
        """Launch, in bucket order, every next bucket all of whose tensors are ready."""
        buckets = self.buckets[kind]
        while (b := len(self._pending[kind])) < len(buckets) and (
                not in_backward or self._num_ready.get((kind, b), 0) == len(buckets[b])):
            self._launch(kind, b, in_backward)

    @torch.no_grad()
    def _launch(self, kind: str, b: int, in_backward: bool) -> None:
        if self._fresh:
            self.launch_log, self.bytes_reduced, self._fresh = [], 0, False
        bucket = [p for _, p in self.buckets[kind][b]]
        # [gradients..., one presence flag per tensor]: the flags' sum says where any rank had one
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
                         + [torch.tensor([float(p.grad is not None) for p in bucket], dtype=bucket[0].dtype,
                                         device=bucket[0].device)])
        work = dist.all_reduce(flat, group=self.groups[kind], async_op=True)
        self._pending[kind].append((b, work, flat))
        self.launch_log.append((kind, b, in_backward))
        self.bytes_reduced += (flat.numel() - len(bucket)) * flat.element_size()

    @torch.no_grad()
    def reduce(self) -> None:
        """Call after backward, before clipping and the optimizer step: launch the buckets not yet
        started, wait for all, and write the summed gradients back."""
        for kind, buckets in self.buckets.items():
            group = self.groups[kind]
            if group is None:
                continue
            n = dist.get_world_size(group)
            label = "data-parallel" if kind == "dp" else "expert-data-parallel"
            with collective(f"all_reduce(gradients) on the {label} group", group):
                self._launch_ready(kind, in_backward=False)
                for b, work, flat in self._pending[kind]:
                    work.wait()
                    self._write_back([p for _, p in buckets[b]], flat, n)
        self._reset()

    def _write_back(self, bucket: list[nn.Parameter], flat: torch.Tensor, n: int) -> None:
        numel = flat.numel() - len(bucket)
        present = (flat[numel:] > 0).tolist()  # one host read per bucket
        if self.average:
            flat.div_(n)
        offset = 0
        for p, has in zip(bucket, present):
            chunk = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if not has:  # no rank had a gradient: None, as in one process
                p.grad = None
            elif p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)


def global_grad_norm(model: nn.Module, params: list[tuple[str, nn.Parameter]], state: ParallelState) -> torch.Tensor:
    """L2 norm of the full gradient (every element of the unsharded model counted once).

    Call after the gradient reduction (DP replicas then hold identical gradients). Each rank sums
    the squares of its local gradients, each tensor divided by the number of ranks that hold an
    identical copy of it (`state.replicas`), and one all-reduce over the world adds them up.
    """
    specs = named_shard_specs(model)
    device = comm_device() if state.world_size > 1 else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for name, p in params:
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum().to(device)
            total += sq / replicas(specs.get(name, REPLICATED), state)
    if state.world_size > 1:
        with collective("all_reduce(gradient norm) over all ranks"):
            dist.all_reduce(total)
    return total.sqrt().cpu()


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
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(t, group=group)
    return t.cpu().tolist()


# --------------------------------------------------------------------------------------------------
# ZeRO-1: optimizer state sharded over the data-parallel replicas
# --------------------------------------------------------------------------------------------------
class ZeroAdamW:
    """AdamW whose state (moments, and the master copy it updates) is sharded over DP (ZeRO stage 1).

    Dense parameters are partitioned over the DP group and expert parameters over the expert-DP
    group: the concatenation of a group's parameters is cut into equal contiguous ranges, one
    per replica. A step is: reduce-scatter the gradients (each replica receives the summed
    gradient of its range only: the same bytes as an all-reduce's first half), `clip_grad_norm_`
    over the ranges, AdamW on the range, all-gather the updated values into every replica's
    parameters. Each replica keeps 1/dp of the optimizer state. Weight decay applies to the
    ranges cut from matrices only, as in `training/optim.py`. Same numbers as the unsharded
    `GradientReducer` + `torch.optim.AdamW` (tests/parallel/test_zero.py).

    Use instead of (reducer, optimizer): `opt.zero_grad(); backward...; opt.reduce_gradients();
    norm = opt.clip_grad_norm_(max_norm); opt.step()`. `param_groups` exposes the inner
    optimizer's groups (set the LR there).
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], state: ParallelState,
                 lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        specs = named_shard_specs(model)
        self.state = state
        self.parts = []  # per group kind: dict(group, params, offsets, total, shard, segments)
        decay, no_decay = [], []
        for kind, group in (("dp", state.dp_group), ("expert_dp", state.expert_dp_group)):
            items = [(n, p) for n, p in params if specs.get(n, REPLICATED).expert == (kind == "expert_dp")]
            if not items:
                continue
            n = 1 if group is None else dist.get_world_size(group)
            r = 0 if group is None else dist.get_rank(group)
            total = sum(p.numel() for _, p in items)
            shard = -(-total // n)
            lo_mine, hi_mine = r * shard, (r + 1) * shard
            segments, offset = [], 0
            for name, p in items:
                lo, hi = max(offset, lo_mine), min(offset + p.numel(), hi_mine)
                if lo < hi:  # this replica owns p.view(-1)[lo - offset: hi - offset]
                    master = nn.Parameter(p.detach().reshape(-1)[lo - offset:hi - offset].clone())
                    scale = replicas(specs.get(name, REPLICATED), state) / n  # copies outside this group
                    segments.append((p, lo - offset, hi - offset, master, scale))
                    (decay if is_weight_matrix(name, p) else no_decay).append(master)
                offset += p.numel()
            self.parts.append(dict(group=group, n=n, params=[p for _, p in items], total=total, shard=shard,
                                   lo=lo_mine, segments=segments))
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]] or [{"params": [nn.Parameter(torch.zeros(0))]}]
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
        self.bytes_reduced = 0
        self._gathers = []  # [(part, work, gathered flat)]: the last step's all-gathers in flight
        # every reader of the parameters through the model waits for them first
        self._hooks = [model.register_forward_pre_hook(lambda *_: self.wait_params()),
                       model.register_state_dict_pre_hook(lambda *_: self.wait_params())]

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            for p in part["params"]:
                p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter: each replica gets the summed gradient of the range it owns."""
        self.bytes_reduced = 0
        for part in self.parts:
            params, n, shard = part["params"], part["n"], part["shard"]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            flat = torch.cat([flat, flat.new_zeros(n * shard - flat.numel())])  # pad to n equal ranges
            mine = flat.new_empty(shard)
            if part["group"] is None:
                mine.copy_(flat)
            else:
                reduce_scatter_single(mine, flat, group=part["group"])
                self.bytes_reduced += flat.numel() * flat.element_size()
            for p, lo, hi, master, _ in part["segments"]:
                master.grad = mine[_range_in_shard(part, params, p, lo, hi)].clone()

    def clip_grad_norm_(self, max_norm: float) -> float:
        device = comm_device() if self.state.world_size > 1 else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for part in self.parts:
            for _, _, _, master, scale in part["segments"]:
                if master.grad is not None:
                    total += master.grad.double().pow(2).sum().to(device) / scale
        if self.state.world_size > 1:
            dist.all_reduce(total)
        norm = float(total.sqrt())
        if max_norm and math.isfinite(norm) and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for part in self.parts:
                for *_, master, _ in part["segments"]:
                    if master.grad is not None:
                        master.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this replica's ranges, then the all-gather of the updated ranges into every
        replica's parameters, launched asynchronously: it overlaps whatever runs before the
        parameters are next read (the step's logging, the next step's data and token count), and
        `wait_params()` completes it. The model's forward and state_dict call it themselves
        (hooks), so no reader sees stale parameters."""
        self.wait_params()
        self.inner.step()
        for part in self.parts:
            params, n, shard = part["params"], part["n"], part["shard"]
            mine = params[0].new_zeros(shard)
            for p, lo, hi, master, _ in part["segments"]:
                mine[_range_in_shard(part, params, p, lo, hi)] = master
            full = mine.new_empty(n * shard)
            if part["group"] is None:
                full.copy_(mine)
                work = None
            else:
                work = all_gather_single(full, mine, group=part["group"], async_op=True)
            self._gathers.append((part, work, full))

    @torch.no_grad()
    def wait_params(self) -> None:
        """Finish the last step's parameter all-gathers (no-op when none is outstanding)."""
        gathers, self._gathers = self._gathers, []
        if not gathers:
            return
        with collective("all_gather(parameters) of ZeRO-1 on the data-parallel groups"):
            for part, work, full in gathers:
                if work is not None:
                    work.wait()
                offset = 0
                for p in part["params"]:
                    p.copy_(full[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def remove_hooks(self) -> None:
        """Finish any all-gather and detach from the model (a new stage builds a new optimizer)."""
        self.wait_params()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        self.wait_params()
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Load the moments; the master ranges are re-read from the parameters (same dtype, so
        exactly what they held when saved): load the model's weights first."""
        self.wait_params()
        self.inner.load_state_dict(sd)
        with torch.no_grad():
            for part in self.parts:
                for p, lo, hi, master, _ in part["segments"]:
                    master.copy_(p.detach().reshape(-1)[lo:hi])

    def state_numel(self) -> int:
        """Elements of optimizer state this replica holds (moments + master ranges)."""
        return sum(t.numel() for s in self.inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())


def _offset_of(params, p) -> int:
    offset = 0
    for q in params:
        if q is p:
            return offset
        offset += q.numel()
    raise KeyError("parameter not in this partition")


def _range_in_shard(part, params, p, lo, hi) -> slice:
    """The slice of this replica's range that holds p.view(-1)[lo:hi]."""
    start = _offset_of(params, p) + lo - part["lo"]
    return slice(start, start + hi - lo)

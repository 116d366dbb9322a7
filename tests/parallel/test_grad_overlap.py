"""The DP gradient all-reduce overlaps the backward pass, and ZeRO-1's all-gather the next step.

Two gloo processes (DP2), a 4-layer MLP with 2 micro-batches per step, one tensor per bucket:
- the overlapped reducer gives bitwise the gradients of the plain one (all buckets in `reduce()`);
- the first micro-batch's backward sends nothing; in the last, bucket 0 (the last layer's bias)
  starts before the first layer's gradient exists;
- a rank on which a tensor gets no gradient launches that bucket later (in `reduce()`) but every
  rank issues the buckets in the same order (what NCCL needs), and the tensor's gradient is the sum;
- ZeroAdamW's all-gather is still in flight after `step()` and done before the next forward reads
  the parameters, with the same parameters as a blocking all-gather.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_evomoe.parallel.data_parallel import GradientReducer, ZeroAdamW
from megatron_evomoe.parallel.state import ParallelState, RankLayout

from .dist_utils import run_distributed


def _state(world, group):
    import torch.distributed as dist
    st = ParallelState.single()
    st.layout, st.rank = RankLayout(world), dist.get_rank()
    st.groups = {k: None for k in st.groups}
    st.groups.update(dp=group, expert_dp=None)
    return st


class _Net(nn.Module):
    """4 linear layers; `skip` leaves the third unused (its tensors then get no gradient)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x, skip=False):
        for i, layer in enumerate(self.layers):
            if not (skip and i == 2):
                x = torch.tanh(layer(x))
        return x.pow(2).sum()


def _step(model, reducer, rank, overlap, skip=False, events=None):
    """Two micro-batches, the reducer armed (overlap) before the second's backward."""
    for p in model.parameters():
        p.grad = None
    after_first = None
    for i in range(2):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(10 * rank + i))
        if overlap and i == 1:
            reducer.final_backward()
        model(x, skip=skip).backward()
        if i == 0:
            after_first = list(reducer.launch_log) if reducer.launch_log else []
    if events is not None:
        events.append("backward done")
    reducer.reduce()
    return after_first


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _check_reducer(rank, world, group):
    st = _state(world, group)
    torch.manual_seed(0)
    model = _Net()
    params = list(model.named_parameters())
    plain = GradientReducer(model, params, st, bucket_size_mb=1e-6)
    _step(model, plain, rank, overlap=False)
    want = _grads(model)
    plain.remove_hooks()
    assert all(not b for _, _, b in plain.launch_log)  # everything started in reduce()

    events = []
    red = GradientReducer(model, params, st, bucket_size_mb=1e-6)
    red._launch = _recording(red._launch, events)
    model.layers[0].weight.register_post_accumulate_grad_hook(lambda p: events.append("first layer grad"))
    after_first = _step(model, red, rank, overlap=True, events=events)
    got = _grads(model)
    assert after_first == [], after_first  # the first micro-batch's backward sent nothing
    for n in want:
        assert torch.equal(got[n], want[n]), n  # bitwise: the same sums
    # bucket 0 holds the last parameter: it went out during backward, before the first layer's gradient
    last_first_grad = len(events) - 1 - events[::-1].index("first layer grad")  # (micro-batch 2's)
    assert events.index(("launch", 0)) < last_first_grad < events.index("backward done"), events
    launched_in_backward = sum(b for _, _, b in red.launch_log)
    assert launched_in_backward == len(params), red.launch_log  # every tensor had its gradient: all overlapped

    # rank 1 skips layer 2: its buckets wait there (in order) and start in reduce(); layer 2's gradient is
    # rank 0's alone, and a tensor without a gradient anywhere would stay None
    red.remove_hooks()
    red = GradientReducer(model, params, st, bucket_size_mb=1e-6)
    _step(model, red, rank, overlap=True, skip=(rank == 1))
    skipped = _grads(model)
    red.remove_hooks()
    order = [(kind, b) for kind, b, _ in red.launch_log]
    overlapped = [b for _, b, in_bwd in red.launch_log if in_bwd]
    return {"want": want, "skipped": skipped, "order": order, "overlapped": overlapped}


def _recording(launch, events):
    def wrapped(kind, b, in_backward):
        events.append(("launch", b))
        return launch(kind, b, in_backward)
    return wrapped


def _check_zero(rank, world, group):
    st = _state(world, group)
    out = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        model = _Net()
        params = list(model.named_parameters())
        opt = ZeroAdamW(model, params, st, lr=1e-2, weight_decay=0.1)
        for step in range(2):
            opt.zero_grad()
            model(torch.randn(3, 6, generator=torch.Generator().manual_seed(rank + step))).backward()
            opt.reduce_gradients()
            opt.clip_grad_norm_(1.0)
            opt.step()
            if overlap:
                assert opt._gathers, "the all-gather should still be outstanding after step()"
                model(torch.zeros(1, 6))  # the next forward waits first
                assert not opt._gathers
            else:
                opt.wait_params()
        out[overlap] = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.remove_hooks()
    for n in out[False]:
        assert torch.equal(out[False][n], out[True][n]), n
    return out[True]


def _worker(rank, world):
    import torch.distributed as dist
    group = dist.new_group([0, 1])
    return {"reducer": _check_reducer(rank, world, group), "zero": _check_zero(rank, world, group)}


def test_overlapped_reduction_is_exact_ordered_and_early():
    res = run_distributed(_worker, 2)
    r0, r1 = res[0]["reducer"], res[1]["reducer"]
    for n in r0["want"]:  # replicas agree, and the gradient is the sum over both ranks
        assert torch.equal(r0["want"][n], r1["want"][n]), n
    assert r0["order"] == r1["order"] == [("dp", b) for b in range(8)]  # same issue order on both ranks
    # rank 1 lacks layer 2's gradients: buckets 2, 3 (layer 2's bias, weight; bucket 0 is the last bias) and
    # after them wait for reduce() there; rank 0 had all of them ready in backward
    assert r0["overlapped"] == list(range(8)) and r1["overlapped"] == [0, 1], (r0["overlapped"], r1["overlapped"])
    for n in r0["skipped"]:
        assert torch.equal(r0["skipped"][n], r1["skipped"][n]), n
    assert all(g is not None for g in r1["skipped"].values())  # rank 1 got layer 2's gradient from rank 0
    for n in res[0]["zero"]:
        assert torch.equal(res[0]["zero"][n], res[1]["zero"][n]), n

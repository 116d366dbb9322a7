"""The building blocks against their single-process definitions, in one 2-process gloo run:
TP layers and vocab-parallel cross-entropy, SP collectives, the all-to-all dispatcher (uneven,
empty and one-sided routing), the layout-independent aux loss, the bucketed gradient reducer
and the global gradient norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_evomoe.moe.experts import GroupedExperts
from megatron_evomoe.moe.router import TopKRouter
from megatron_evomoe.moe.token_dispatcher import LocalTokenDispatcher
from megatron_evomoe.parallel.data_parallel import GradientReducer, global_grad_norm
from megatron_evomoe.parallel.expert_parallel import AllToAllTokenDispatcher, use_global_batch_aux_loss
from megatron_evomoe.parallel.state import ParallelState, RankLayout, ShardSpec
from megatron_evomoe.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TensorParallelContext,
                                                      VocabParallelEmbedding, gather_from_sequence_region,
                                                      reduce_scatter_to_sequence_region, vocab_parallel_cross_entropy)

from .dist_utils import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


def _state(world, tp=1, ep=1):
    import torch.distributed as dist
    st = ParallelState.single()
    st.layout, st.rank = RankLayout(world, tp=tp, ep=ep), dist.get_rank()
    st.groups = {k: None for k in st.groups}
    return st


def _check_tp_layers(rank, world, group):
    tp = TensorParallelContext(group, world, rank)
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 8, bias=False), nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 4, 6, requires_grad=True)
    ref = lin2(F.gelu(lin1(x)))
    ref.square().sum().backward()
    col = ColumnParallelLinear.from_linear(lin1, tp)
    row = RowParallelLinear.from_linear(lin2, tp)
    assert col.weight.shape == (4, 6) and row.weight.shape == (5, 4)
    x2 = x.detach().clone().requires_grad_()
    y = row(F.gelu(col(x2)))
    y.square().sum().backward()
    torch.testing.assert_close(y, ref, **TOL)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    torch.testing.assert_close(col.weight.grad, lin1.weight.grad.chunk(2, 0)[rank], **TOL)
    torch.testing.assert_close(row.weight.grad, lin2.weight.grad.chunk(2, 1)[rank], **TOL)
    # gather_output with an odd number of output features (padded shards, trimmed result)
    head = nn.Linear(6, 7, bias=False)
    col_head = ColumnParallelLinear.from_linear(head, tp, gather_output=True)
    assert col_head.weight.shape == (4, 6)
    torch.testing.assert_close(col_head(x.detach()), head(x.detach()), **TOL)


def _check_vocab(rank, world, group):
    tp = TensorParallelContext(group, world, rank)
    torch.manual_seed(1)
    V, C = 7, 5
    emb = nn.Embedding(V, C)
    ids = torch.randint(0, V, (3, 6))
    vemb = VocabParallelEmbedding.from_embedding(emb, tp)
    assert vemb.weight.shape == (4, C)  # ceil(7 / 2), the last row of rank 1 is padding
    out = vemb(ids)
    torch.testing.assert_close(out, emb(ids), **TOL)
    out.sum().backward()
    emb(ids).sum().backward()
    torch.testing.assert_close(vemb.weight.grad[:vemb.vocab_end - vemb.vocab_start],
                               emb.weight.grad[vemb.vocab_start:vemb.vocab_end], **TOL)
    # cross-entropy from vocabulary shards, with ignored targets and a padded column
    logits = torch.randn(10, V) * 3
    target = torch.randint(0, V, (10,))
    target[[2, 7]] = -100
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full, target, ignore_index=-100, reduction="none")
    ref.backward(torch.arange(10.0))
    start, local = rank * 4, 4
    shard = torch.cat([logits, torch.zeros(10, 1)], 1)[:, start:start + local].clone().requires_grad_()
    num_valid = min(V - start, local)
    loss = vocab_parallel_cross_entropy(shard, target, start, num_valid, group)
    loss.backward(torch.arange(10.0))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(shard.grad[:, :num_valid], full.grad[:, start:start + num_valid], **TOL)
    assert shard.grad[:, num_valid:].abs().max() == 0 if num_valid < local else True


def _check_sequence(rank, world, group):
    torch.manual_seed(2)
    full = torch.randn(2, 6, 3)
    mine = full.chunk(2, 1)[rank].clone().requires_grad_()
    g = gather_from_sequence_region(mine, group, dim=1)
    torch.testing.assert_close(g, full)
    (g * (rank + 1)).sum().backward()  # each rank's loss weights the gathered tensor differently
    torch.testing.assert_close(mine.grad, torch.full_like(mine, 3.0))  # reduce-scattered: 1 + 2
    y = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    rs = reduce_scatter_to_sequence_region(y, group, dim=1)
    ys = [torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    torch.testing.assert_close(rs, (ys[0] + ys[1]).chunk(2, 1)[rank], **TOL)


def _check_dispatcher(rank, world, group):
    """Each rank routes its own tokens over 4 experts (2 per rank); expert 3 gets nothing and
    rank 1 sends nothing to rank 0's experts in layer-like case B."""
    E, C, Fh = 4, 6, 8
    torch.manual_seed(3)
    bank = GroupedExperts(E, C, Fh, backend="torch", init_std=0.3)  # same full bank on both ranks
    for case in ("A", "B"):
        g = torch.Generator().manual_seed(10 + rank)
        T, K = (9, 2) if rank == 0 else (5, 2)
        x = torch.randn(T, C, generator=g, requires_grad=True)
        topk = torch.stack([torch.randperm(3, generator=g)[:K] for _ in range(T)])  # expert 3 starved
        if case == "B" and rank == 1:
            topk = torch.full((T, K), 2)  # rank 1 only uses rank 1's expert 2
            topk[:, 1] = 2
        gates = torch.rand(T, K, generator=g, requires_grad=True)
        # reference: this rank's tokens through the full bank locally
        ref_bank = GroupedExperts(E, C, Fh, backend="torch")
        ref_bank.load_state_dict(bank.state_dict())
        local = LocalTokenDispatcher(E, "torch")
        xr, gr = x.detach().clone().requires_grad_(), gates.detach().clone().requires_grad_()
        xp, cnt, h = local.dispatch(xr, topk)
        ref = local.combine(ref_bank(xp, cnt), gr, h)
        ref.square().sum().backward()
        # expert-parallel: this rank holds experts [2*rank, 2*rank + 2)
        mine = GroupedExperts(2, C, Fh, backend="torch")
        with torch.no_grad():
            for n in ("w_gate", "w_up", "w_down"):
                getattr(mine, n).copy_(getattr(bank, n)[2 * rank:2 * rank + 2])
        d = AllToAllTokenDispatcher(E, group, backend="torch")
        xl, cnt_l, handle = d.dispatch(x, topk)
        y = d.combine(mine(xl, cnt_l), gates, handle)
        y.square().sum().backward()
        torch.testing.assert_close(y, ref, **TOL)
        torch.testing.assert_close(x.grad, xr.grad, **TOL)
        torch.testing.assert_close(gates.grad, gr.grad, **TOL)
        remote = int((topk // 2 != rank).sum())
        assert d.last_dispatch_bytes == remote * C * 4
        if case == "B" and rank == 1:
            assert d.last_dispatch_bytes == 0
        # expert weight grads, summed over the ranks' tokens, arrive on the owning rank
        yield case, {n: getattr(mine, n).grad.clone() for n in ("w_gate", "w_up", "w_down")}, \
            {n: getattr(ref_bank, n).grad.clone() for n in ("w_gate", "w_up", "w_down")}


def _check_aux(rank, world, group):
    """Global-batch aux/z losses: per-rank contributions sum to the single-process losses of the
    union batch, and so do the router gradients."""
    torch.manual_seed(4)
    router = TopKRouter(6, 4, 2, backend="torch", init_std=0.5)
    z_all = torch.randn(12, 6)
    ref = TopKRouter(6, 4, 2, backend="torch")
    ref.load_state_dict(router.state_dict())
    out_ref = ref(z_all, torch.zeros(12, dtype=torch.long))
    (out_ref.aux_loss + out_ref.z_loss).backward()
    use_global_batch_aux_loss(router, group)
    rows = slice(0, 7) if rank == 0 else slice(7, 12)  # uneven split
    out = router(z_all[rows], torch.zeros(rows.stop - rows.start, dtype=torch.long))
    (out.aux_loss + out.z_loss).backward()
    return float(out.aux_loss), float(out.z_loss), router.weight.grad.clone(), \
        float(out_ref.aux_loss), float(out_ref.z_loss), ref.weight.grad.clone()


def _check_reducer(rank, world, group):
    st = _state(world)
    st.groups.update(dp=group, expert_dp=group)
    st.layout = RankLayout(world)  # dp = 2
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 2))
    params = list(model.named_parameters())
    out = []
    for bucket_mb in (1e-5, 1.0):  # one tensor per bucket vs everything in one bucket
        for i, (_, p) in enumerate(params):
            p.grad = None if (i == 4 and rank == 1) or i == 5 else torch.full_like(p, float(rank + i))
        red = GradientReducer(model, params, st, bucket_size_mb=bucket_mb)
        red.reduce()
        out.append(({n: None if p.grad is None else p.grad.clone() for n, p in params}, red.num_buckets()))
    (a, nb_small), (b, nb_big) = out
    assert nb_small["dp"] == 6 - 0 and nb_big["dp"] == 1
    for n, _ in params:
        assert (a[n] is None) == (b[n] is None)
        if a[n] is not None:
            torch.testing.assert_close(a[n], b[n])
    assert a["2.bias"] is None  # no rank had a gradient: stays None, as in one process
    torch.testing.assert_close(a["2.weight"], torch.full((2, 3), 4.0))  # rank 1 had none: 4 + 0
    torch.testing.assert_close(a["0.weight"], torch.full((7, 5), 1.0))  # 0 + 1
    # global norm: a TP-sharded tensor counts its shards, a replicated one once
    st2 = _state(world, tp=2)
    m = nn.Linear(4, 4, bias=True)
    m._shard_specs = {"weight": ShardSpec(tp_dim=0)}
    m.weight.grad = torch.full_like(m.weight, float(rank + 1))  # shards differ
    m.bias.grad = torch.full_like(m.bias, 2.0)  # replicated, same everywhere
    norm = float(global_grad_norm(m, list(m.named_parameters()), st2))
    want = (16 * 1.0 + 16 * 4.0 + 4 * 4.0) ** 0.5
    assert abs(norm - want) < 1e-9, (norm, want)


def _worker(rank, world):
    import torch.distributed as dist
    group = dist.new_group([0, 1])
    _check_tp_layers(rank, world, group)
    _check_vocab(rank, world, group)
    _check_sequence(rank, world, group)
    expert_grads = list(_check_dispatcher(rank, world, group))
    aux = _check_aux(rank, world, group)
    _check_reducer(rank, world, group)
    return {"expert_grads": expert_grads, "aux": aux}


def test_primitives_against_single_process():
    res = run_distributed(_worker, 2)
    # expert weight gradients: rank r's local experts == (sum over both ranks' reference grads)[2r:2r+2]
    for case_idx in range(2):
        for r in range(2):
            case, mine, _ = res[r]["expert_grads"][case_idx]
            for n in ("w_gate", "w_up", "w_down"):
                total = res[0]["expert_grads"][case_idx][2][n] + res[1]["expert_grads"][case_idx][2][n]
                torch.testing.assert_close(mine[n], total[2 * r:2 * r + 2], **TOL, msg=f"case {case} {n}")
    a0, z0, g0, ref_aux, ref_z, ref_g = res[0]["aux"]
    a1, z1, g1, *_ = res[1]["aux"]
    assert abs((a0 + a1) - ref_aux) < 1e-6 * ref_aux and abs((z0 + z1) - ref_z) < 1e-6 * ref_z
    torch.testing.assert_close(g0 + g1, ref_g, **TOL)

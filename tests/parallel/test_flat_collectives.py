"""parallel/flat_collectives.py: the one-tensor all-gather / reduce-scatter under this torch's name.

Which name is picked (torch 2.13's, else the 1.13 .. 2.12 one; none: an error at the call), and
both names computing the same numbers in 2 gloo processes.
"""
import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_evomoe.parallel import flat_collectives
from megatron_evomoe.parallel.flat_collectives import newest_collective
from tests.parallel.dist_utils import run_distributed


def test_the_newest_name_is_picked_and_the_old_one_without_it(monkeypatch):
    assert flat_collectives.all_gather_single is getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    assert flat_collectives.reduce_scatter_single is getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    monkeypatch.delattr(dist, "all_gather_single", raising=False)  # a torch before 2.13
    assert newest_collective("all_gather_single", "all_gather_into_tensor") is dist.all_gather_into_tensor


def test_a_torch_without_either_name_fails_at_the_call_not_at_import():
    collective = newest_collective("no_such_collective", "nor_this_one")
    with pytest.raises(RuntimeError, match="torch.distributed has none of no_such_collective, nor_this_one"):
        collective(torch.zeros(2), torch.zeros(1))


def _both_names(rank, world_size):
    x = torch.arange(3, dtype=torch.float32) + 10 * rank  # rank r: [10r, 10r + 1, 10r + 2]
    full = torch.arange(2 * world_size, dtype=torch.float32) * (rank + 1)

    def run(gather, scatter):
        out, mine = x.new_empty(world_size * 3), x.new_empty(2)
        gather(out, x, group=dist.group.WORLD)
        scatter(mine, full, group=dist.group.WORLD)
        return out, mine

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the picked ones are not 2.13's deprecated wrappers
        picked = run(flat_collectives.all_gather_single, flat_collectives.reduce_scatter_single)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = run(dist.all_gather_into_tensor, dist.reduce_scatter_tensor)
    return [picked, old]


def test_both_names_gather_and_reduce_scatter_the_same_numbers():
    per_rank = run_distributed(_both_names, 2)
    for rank, results in enumerate(per_rank):
        for out, mine in results:
            assert torch.equal(out, torch.tensor([0.0, 1, 2, 10, 11, 12]))
            # sum over ranks of arange(4) * (r + 1) = 3 * arange(4); rank r keeps elements [2r, 2r + 2)
            assert torch.equal(mine, 3 * torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32))

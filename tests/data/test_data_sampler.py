"""ResumableSampler: epochs, determinism, exact resume, disjoint DP shards covering each global batch."""
from itertools import islice

import pytest
import torch

from megatron_evomoe.data.sampler import ResumableSampler


def take(sampler, n):
    return list(islice(sampler, n))


def test_epochs_are_seeded_permutations():
    s = ResumableSampler(10, seed=7)
    e0, e1 = take(s, 10), take(s, 10)
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1 and e0 != list(range(10))
    assert s.epoch == 2 and s.state_dict()["epoch"] == 2 and s.state_dict()["position"] == 0
    assert take(ResumableSampler(10, seed=7), 20) == e0 + e1
    assert take(ResumableSampler(10, seed=8), 10) != e0
    assert take(ResumableSampler(10, seed=7, shuffle=False), 15) == list(range(10)) + list(range(5))


@pytest.mark.parametrize("world_size, rank, drawn", [(1, 0, 37), (2, 1, 8), (3, 2, 5)])
def test_resume_continues_identically(world_size, rank, drawn):
    s = ResumableSampler(13, seed=3, rank=rank, world_size=world_size)
    take(s, drawn)  # crosses epoch boundaries for every case
    state = s.state_dict()
    expected = take(s, 50)
    resumed = ResumableSampler(13, seed=3, rank=rank, world_size=world_size)
    resumed.load_state_dict(state)
    assert take(resumed, 50) == expected
    # The state is the same on every rank, so rank 0's copy resumes the others.
    other = ResumableSampler(13, seed=3, rank=0, world_size=world_size)
    take(other, drawn)
    assert other.state_dict() == state


def test_seek_matches_state():
    a = ResumableSampler(11, seed=1, world_size=2, rank=1)
    take(a, 9)
    b = ResumableSampler(11, seed=1, world_size=2, rank=1)
    b.seek(a.consumed_samples)
    assert a.consumed_samples == 18 and take(a, 20) == take(b, 20)
    with pytest.raises(ValueError, match="multiple of world_size=2"):
        b.seek(5)


@pytest.mark.parametrize("num_samples", [48, 50])
def test_dp_shards_are_disjoint_and_cover_each_global_batch(num_samples):
    world, micro = 4, 3
    stream = take(ResumableSampler(num_samples, seed=5), 20 * world * micro)
    ranks = [ResumableSampler(num_samples, seed=5, rank=r, world_size=world) for r in range(world)]
    for step in range(20):
        batches = [take(s, micro) for s in ranks]
        global_batch = stream[step * world * micro:(step + 1) * world * micro]
        assert sorted(sum(batches, [])) == sorted(global_batch)
        if num_samples == 48:  # global batches never straddle an epoch: indices are distinct
            for a in range(world):
                for b in range(a + 1, world):
                    assert not set(batches[a]) & set(batches[b])


def test_resume_under_a_different_world_size():
    micro = 2
    old = [ResumableSampler(30, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        for s in old:
            take(s, micro * 2)  # 5 global batches of 8
    state = old[0].state_dict()
    stream = take(ResumableSampler(30, seed=2), 80)
    new = [ResumableSampler(30, seed=2, rank=r, world_size=4) for r in range(4)]
    for s in new:
        s.load_state_dict(state)
    batch = sum((take(s, micro) for s in new), [])
    assert sorted(batch) == sorted(stream[40:48])


def test_state_mismatch_and_bad_args():
    s = ResumableSampler(10, seed=1)
    with pytest.raises(ValueError, match="seed=2"):
        s.load_state_dict(ResumableSampler(10, seed=2).state_dict())
    with pytest.raises(ValueError, match="num_samples"):
        s.load_state_dict(ResumableSampler(11, seed=1).state_dict())
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, seed=1, rank=2, world_size=2)


def test_works_as_a_dataloader_sampler():
    s = ResumableSampler(10, seed=4)
    expected = take(ResumableSampler(10, seed=4), 6)
    loader = torch.utils.data.DataLoader(list(range(100, 110)), batch_size=3, sampler=s)
    it = iter(loader)
    got = next(it).tolist() + next(it).tolist()
    assert got == [100 + i for i in expected]

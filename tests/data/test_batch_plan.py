"""BatchPlan: the unpacked plan is today's sampler order; the packed plan's global rows do not depend on
dp; both resume exactly from any micro-batch's state_after (and from a sampler state of earlier versions)."""
from itertools import islice

import numpy as np
import pytest

from megatron_evomoe.data.batch_plan import BatchPlan
from megatron_evomoe.data.mixture import SampleStream
from megatron_evomoe.data.sampler import ResumableSampler

SEQ = 10


def first_fit(lengths, seq_len):
    """A stand-in for packing.pack_rows (same contract): first fit in stream order."""
    rows, room = [], []
    for p, n in enumerate(lengths):
        k = next((k for k, r in enumerate(room) if r >= n), None)
        if k is None:
            rows.append([]), room.append(seq_len)
            k = len(rows) - 1
        rows[k].append(p)
        room[k] -= int(n)
    return rows


def plan(num_samples=13, mb=2, rank=0, dp=1, packed=False, lengths=None, seed=5):
    lengths = np.arange(num_samples) % 7 + 2 if lengths is None else lengths  # 2..8 tokens
    return BatchPlan(SampleStream([num_samples], seed), lengths, SEQ, mb, rank, dp, packed=packed, pack_window=6,
                     packer=first_fit)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_unpacked_plan_is_the_sampler_order(dp):
    for rank in range(dp):
        expected = list(islice(ResumableSampler(13, seed=5, rank=rank, world_size=dp), 3 * 10))
        got = [row[0] for p in islice(plan(mb=3, rank=rank, dp=dp), 10) for row in p.rows]
        assert got == expected
        last = list(islice(plan(mb=3, rank=rank, dp=dp), 10))[-1].state_after
        assert {k: last[k] for k in ("epoch", "position")} == dict(zip(("epoch", "position"), divmod(30 * dp, 13)))


def test_unpacked_stats_count_rows_samples_and_padding():
    lengths = np.arange(13) % 7 + 2
    p = list(islice(plan(mb=4), 3))[-1]
    ids = [ResumableSampler(13, seed=5).global_index(k) for k in range(12)]
    assert p.state_after["stats"] == {"rows": 12, "samples": 12, "padding_tokens": int(sum(SEQ - lengths[ids])),
                                      "component_samples": [12]}


def test_packed_global_rows_do_not_depend_on_dp():
    # micro-step k of dp ranks: union of the ranks' rows (interleaved) == the one-process micro-step
    single = [p.rows for p in islice(plan(mb=4, packed=True), 8)]
    for dp in (2, 4):
        ranks = [[p.rows for p in islice(plan(mb=4 // dp, rank=r, dp=dp, packed=True), 8)] for r in range(dp)]
        for k in range(8):
            merged = [ranks[r][k][j] for j in range(4 // dp) for r in range(dp)]
            assert merged == single[k]
    rows = [row for step in single for row in step]
    lengths = np.arange(13) % 7 + 2
    assert all(sum(lengths[i] for i in row) <= SEQ for row in rows) and max(len(r) for r in rows) >= 2
    # the row stream is the windows of 6 stream samples, each packed on its own, in order
    stream = SampleStream([13], 5).take(6 * 12)
    windows = [[[int(w[p]) for p in row] for row in first_fit(lengths[w], SEQ)] for w in np.split(stream, 12)]
    expected = [row for window in windows for row in window]
    assert rows == expected[:len(rows)]


@pytest.mark.parametrize("packed", [False, True])
def test_resumes_exactly_from_any_state_after(packed):
    ref = list(islice(plan(mb=3, rank=1, dp=2, packed=packed), 12))
    for k in range(len(ref) - 1):
        resumed = plan(mb=3, rank=1, dp=2, packed=packed)
        resumed.load_state_dict(ref[k].state_after)
        assert list(islice(resumed, len(ref) - k - 1)) == ref[k + 1:]


def test_resumes_from_a_sampler_state_of_earlier_versions():
    old = {"epoch": 1, "position": 4, "seed": 5, "num_samples": 13, "shuffle": True}  # ResumableSampler's
    resumed = plan(mb=2)
    resumed.load_state_dict(old)
    sampler = ResumableSampler(13, seed=5)
    sampler.load_state_dict(old)
    assert [p.rows[0][0] for p in islice(resumed, 4)] == [next(sampler) for _ in range(8)][::2]
    with pytest.raises(ValueError, match="num_samples"):
        plan(num_samples=12).load_state_dict(old)

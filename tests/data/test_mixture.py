"""SampleStream: a mixture draws components with the configured frequencies, walks each component's own
shuffled epochs, and resumes exactly from a mid-stream state."""
import numpy as np
import pytest

from megatron_evomoe.data.mixture import SampleStream
from megatron_evomoe.data.sampler import ResumableSampler


def test_component_frequencies_match_the_weights():
    sizes, weights, n = [5, 7, 3], [3.0, 1.0, 1.0], 10_000
    ids = SampleStream(sizes, seed=11, weights=weights).take(n)
    got = np.bincount(np.searchsorted(np.cumsum(sizes), ids, side="right"), minlength=3)
    for k, w in enumerate(weights):
        p = w / sum(weights)
        assert abs(got[k] - n * p) <= 4 * np.sqrt(n * p * (1 - p)), (k, got)  # 4 binomial sigmas


def test_each_component_walks_its_own_epochs():
    stream = SampleStream([4, 6], seed=2, weights=[1, 1])
    ids = stream.take(200)
    second = ids[ids >= 4] - 4
    # every run of 6 draws of the second file is a permutation of it (its epochs), and epochs differ
    epochs = [sorted(second[k:k + 6]) for k in range(0, len(second) - 5, 6)]
    assert all(e == list(range(6)) for e in epochs)
    assert len({tuple(second[k:k + 6]) for k in range(0, 24, 6)}) > 1
    assert stream.counts == [int((ids < 4).sum()), len(second)] and stream.position == 200


def test_mixture_resumes_exactly_mid_stream():
    ref = SampleStream([5, 7, 3], seed=11, weights=[3, 1, 1])
    ref.take(4100)  # past the first block of component draws
    state = ref.state_dict()
    expected = ref.take(300)
    resumed = SampleStream([5, 7, 3], seed=11, weights=[3, 1, 1])
    resumed.load_state_dict(state)
    assert (resumed.take(300) == expected).all()
    assert state["position"] == 4100 and sum(state["counts"]) == 4100
    with pytest.raises(ValueError, match="weights"):
        SampleStream([5, 7, 3], seed=11, weights=[1, 1, 1]).load_state_dict(state)


def test_one_file_is_the_plain_sampler():
    stream = SampleStream([9], seed=42)
    assert list(stream.take(20)) == [ResumableSampler(9, seed=42).global_index(k) for k in range(20)]
    assert stream.state_dict() == {"epoch": 2, "position": 2, "seed": 42, "num_samples": 9, "shuffle": True}

"""The packed-sequence index: C++ helper (megatron_evomoe._C_data) == Python fallback, and its invariants.

The C++ helper must be built here (CI runs `pip install --no-build-isolation -e .` first): the
tests that need it fail, not skip, when it is missing.
"""
import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megatron_evomoe.data import packing
from megatron_evomoe.data.packing import (
    build_packing_index,
    build_packing_index_python,
    document_attention_mask,
    pack_samples,
    splitmix64_keys,
    visiting_order,
)
from megatron_evomoe.ops import _ext

SEEDS = (0, 1, 2, 12345, 2**63 + 5, 2**64 - 1)


def _cpp():
    module = _ext.load_data_helpers()
    if module is None:
        pytest.fail(
            "megatron_evomoe._C_data is not built or not loadable "
            f"({_ext.describe_data_helpers()}). Build it with "
            "`pip install --no-build-isolation -e .` (needs a C++ compiler and pybind11, and "
            "EVOMOE_SKIP_CPP_BUILD unset)."
        )
    return module


def _both(lengths, seq_len, seed, **kw):
    """(cpp index, python index), asserting they are identical."""
    _cpp()
    a = build_packing_index(lengths, seq_len, seed, backend="cpp", **kw)
    b = build_packing_index(lengths, seq_len, seed, backend="python", **kw)
    assert a.backend == "cpp" and b.backend == "python"
    assert a.bin_offsets.dtype == np.int64 and a.sample_order.dtype == np.int32
    assert b.bin_offsets.dtype == np.int64 and b.sample_order.dtype == np.int32
    np.testing.assert_array_equal(a.bin_offsets, b.bin_offsets)
    np.testing.assert_array_equal(a.sample_order, b.sample_order)
    return a, b


def _check_invariants(index, lengths, seq_len, seed, mode, on_overlong="error", shuffle=True):
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    overlong = np.flatnonzero(lengths > seq_len)
    expected = np.setdiff1d(np.arange(n), overlong) if on_overlong == "skip" else np.arange(n)
    # Every kept sample exactly once, no skipped one.
    np.testing.assert_array_equal(np.sort(index.sample_order), expected)
    assert index.bin_offsets[0] == 0 and index.bin_offsets[-1] == len(expected)
    assert np.all(np.diff(index.bin_offsets) >= 1), "empty bin"
    tokens = index.bin_tokens()
    assert np.all(tokens <= seq_len)
    assert tokens.sum() == np.minimum(lengths[expected], seq_len).sum()
    # Recompute the greedy rule from the visiting order with a dumb loop.
    order = visiting_order(n, seed, shuffle)
    if on_overlong == "skip":
        order = order[lengths[order] <= seq_len]
    sizes = np.minimum(lengths[order], seq_len)
    bins: list[list[int]] = []
    loads: list[int] = []
    for i, size in zip(order.tolist(), sizes.tolist()):
        if mode == "next_fit":
            target = len(bins) - 1 if bins and loads[-1] + size <= seq_len else None
        else:
            target = next((b for b, load in enumerate(loads) if load + size <= seq_len), None)
        if target is None:
            bins.append([])
            loads.append(0)
            target = len(bins) - 1
        bins[target].append(i)
        loads[target] += size
    assert index.num_bins == len(bins)
    for b, expected_bin in enumerate(bins):
        np.testing.assert_array_equal(index.bin(b), expected_bin)


def _built(lengths, seq_len, seed, mode, **kw):
    """The (checked identical) index, also checked against a dumb re-implementation."""
    a, _ = _both(lengths, seq_len, seed, mode=mode, **kw)
    _check_invariants(a, lengths, seq_len, seed, mode, kw.get("on_overlong", "error"), kw.get("shuffle", True))
    return a


def test_cpp_helper_is_built():
    module = _cpp()
    assert module.INDEX_FORMAT_VERSION == packing.INDEX_FORMAT_VERSION
    assert "data_ext: built" in _ext.describe()


def test_splitmix64_matches_the_reference_stream():
    # splitmix64 seeded with 0: first outputs of the published reference generator.
    keys = splitmix64_keys(0, 3)
    assert [int(k) for k in keys] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    # A key depends only on (seed, index): a dataset's prefix keeps its relative order.
    full = visiting_order(1000, seed=9)
    prefix = visiting_order(400, seed=9)
    np.testing.assert_array_equal(full[full < 400], prefix)


@pytest.mark.parametrize("mode", packing.MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_equals_python_on_random_lengths(mode, seed):
    rng = np.random.default_rng(seed % 2**32)
    seq_len = int(rng.choice([64, 100, 2048]))
    for n in (0, 1, 2, 7, 300, 3000):
        lengths = rng.integers(0, seq_len + 1, n).astype(np.int32)
        _built(lengths, seq_len, seed, mode)


@pytest.mark.parametrize("mode", packing.MODES)
def test_heavy_tailed_lengths_and_no_shuffle(mode):
    rng = np.random.default_rng(3)
    lengths = np.minimum(rng.pareto(1.2, 5000) * 40 + 1, 4096).astype(np.int32)
    _built(lengths, 4096, 11, mode)
    a = _built(lengths, 4096, 11, mode, shuffle=False)
    if mode == "next_fit":  # next-fit without shuffle keeps the dataset order
        np.testing.assert_array_equal(a.sample_order, np.arange(len(lengths)))


def test_cpp_and_python_agree_on_a_larger_dataset():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 2049, 40_000).astype(np.int32)
    a, _ = _both(lengths, 2048, 123, mode="first_fit")
    tokens = a.bin_tokens()
    assert tokens.sum() / (a.num_bins * 2048) > 0.9  # first-fit on shuffled data packs tightly


@pytest.mark.parametrize("mode", packing.MODES)
def test_edge_cases(mode):
    # Empty input.
    a, _ = _both(np.zeros(0, np.int32), 16, 0, mode=mode)
    assert a.num_bins == 0 and len(a.sample_order) == 0
    np.testing.assert_array_equal(a.bin_offsets, [0])
    # One sample.
    a, _ = _both([5], 16, 0, mode=mode)
    np.testing.assert_array_equal(a.bin_offsets, [0, 1])
    np.testing.assert_array_equal(a.sample_order, [0])
    # Exact fits: samples of exactly seq_len take one bin each.
    a = _built(np.full(9, 16, np.int32), 16, 4, mode)
    assert a.num_bins == 9 and np.all(a.bin_tokens() == 16)
    # Halves pair up exactly.
    a = _built(np.full(10, 8, np.int32), 16, 4, mode)
    assert a.num_bins == 5 and np.all(a.bin_tokens() == 16)
    # Zero-length samples are packed like others; all-zero input is one bin.
    a = _built(np.zeros(6, np.int32), 16, 1, mode)
    assert a.num_bins == 1 and len(a.bin(0)) == 6
    _built(np.array([0, 16, 0, 3, 13, 0], np.int32), 16, 2, mode)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_overlong_sample_raises_naming_the_index(backend):
    _cpp()
    lengths = np.array([3, 4, 5, 40, 2, 50], np.int32)
    with pytest.raises(ValueError, match=r"sample 3 has 40 tokens, more than seq_len=16 \(2 over-long"):
        build_packing_index(lengths, 16, 0, backend=backend)


def test_overlong_raises_in_the_cpp_module_itself():
    module = _cpp()
    with pytest.raises(ValueError, match="sample 1 has 17 tokens"):
        module.build_packing_index(np.array([1, 17], np.int32), 16, 0, "first_fit", "error", True)
    with pytest.raises(ValueError, match="sample 2 has negative length -1"):
        module.build_packing_index(np.array([1, 2, -1], np.int32), 16, 0, "first_fit", "error", True)
    with pytest.raises(ValueError, match="mode must be"):
        module.build_packing_index(np.array([1], np.int32), 16, 0, "best_fit", "error", True)


@pytest.mark.parametrize("mode", packing.MODES)
def test_overlong_truncate_and_skip(mode):
    rng = np.random.default_rng(8)
    lengths = rng.integers(1, 40, 500).astype(np.int32)  # seq_len 32: some are over-long
    overlong = np.flatnonzero(lengths > 32)
    assert len(overlong) > 5
    a = _built(lengths, 32, 6, mode, on_overlong="truncate")
    np.testing.assert_array_equal(a.truncated, overlong)
    assert len(a.skipped) == 0
    a = _built(lengths, 32, 6, mode, on_overlong="skip")
    np.testing.assert_array_equal(a.skipped, overlong)
    assert not np.isin(a.sample_order, overlong).any()


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="sample 1 has negative length"):
        build_packing_index([3, -2], 8)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        build_packing_index([3], 0)
    with pytest.raises(ValueError, match="seed must be in"):
        build_packing_index([3], 8, seed=-1)
    with pytest.raises(ValueError, match="lengths must be integers"):
        build_packing_index([3.5], 8)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        build_packing_index([[3]], 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        build_packing_index([3], 8, mode="best_fit")
    with pytest.raises(ValueError, match="on_overlong must be one of"):
        build_packing_index([3], 8, on_overlong="drop")


def test_same_seed_same_index_other_seed_other_order():
    lengths = np.random.default_rng(0).integers(1, 64, 200).astype(np.int32)
    a = build_packing_index(lengths, 128, 5)
    b = build_packing_index(lengths, 128, 5)
    c = build_packing_index(lengths, 128, 6)
    np.testing.assert_array_equal(a.sample_order, b.sample_order)
    assert not np.array_equal(a.sample_order, c.sample_order)


def test_fallback_warns_once_and_explicit_cpp_fails(monkeypatch):
    monkeypatch.setattr(packing, "_cpp_helpers", lambda: None)
    monkeypatch.setattr(packing, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = build_packing_index([3, 4, 5], 8, 1)
        build_packing_index([3, 4, 5], 8, 2)
    fallback = [w for w in caught if "pure Python" in str(w.message)]
    assert len(fallback) == 1 and a.backend == "python"
    with pytest.raises(RuntimeError, match="backend='cpp' but megatron_evomoe._C_data is not built"):
        build_packing_index([3], 8, backend="cpp")


def test_loader_says_why_not(monkeypatch):
    try:
        monkeypatch.setattr(packing, "DATA_MODULE", "megatron_evomoe._C_data_absent")
        packing.load_cpp_helpers.cache_clear()
        module, why = packing.load_cpp_helpers()
        assert module is None and why.startswith("not built (no megatron_evomoe._C_data_absent")
        monkeypatch.setattr(packing, "DATA_MODULE", "megatron_evomoe._C_data")
        monkeypatch.setattr(packing, "INDEX_FORMAT_VERSION", 999)
        packing.load_cpp_helpers.cache_clear()
        module, why = packing.load_cpp_helpers()
        assert module is None and why.startswith("stale build (index format 1, the Python code expects 999")
    finally:
        monkeypatch.undo()
        packing.load_cpp_helpers.cache_clear()
    assert _ext.load_data_helpers() is not None


def test_data_path_does_not_import_the_ops_package():
    code = (
        "import sys; from megatron_evomoe.data.packing import build_packing_index as b; "
        "assert b([1, 2, 3], 4).backend == 'cpp'; "
        "assert 'megatron_evomoe.ops' not in sys.modules, 'packing imported megatron_evomoe.ops'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_auto_uses_the_cpp_helper():
    _cpp()
    assert build_packing_index([3, 4, 5], 8, 1).backend == "cpp"


def test_python_twin_function_directly():
    lengths = np.array([5, 8, 2, 1], np.int32)
    offsets, order = build_packing_index_python(lengths, 8, 0, mode="next_fit", shuffle=False)
    np.testing.assert_array_equal(offsets, [0, 1, 2, 4])  # [5] [8] [2, 1]
    np.testing.assert_array_equal(order, [0, 1, 2, 3])
    offsets, order = build_packing_index_python(lengths, 8, 0, mode="first_fit", shuffle=False)
    np.testing.assert_array_equal(offsets, [0, 3, 4])  # [5, 2, 1] [8]: 2 and 1 go back to the first bin
    np.testing.assert_array_equal(order, [0, 2, 3, 1])


# ---------------------------------------------------------------------------------------------
# pack_samples / document_attention_mask
# ---------------------------------------------------------------------------------------------
def _dataset(lengths, start=1000):
    out, nxt = [], start
    for n in lengths:
        out.append(np.arange(nxt, nxt + n))
        nxt += n
    return out


def test_pack_samples_rows_labels_positions_documents():
    lengths = np.array([3, 5, 2, 6, 4], np.int32)
    ids = _dataset(lengths)
    index = build_packing_index(lengths, 8, 0, mode="next_fit", shuffle=False)
    # next_fit, no shuffle, seq_len 8: [0, 1], [2, 3], [4]
    np.testing.assert_array_equal(index.bin_offsets, [0, 2, 4, 5])
    batch = pack_samples(index, [0, 2], ids, pad_id=-1, ignore_index=-100)
    np.testing.assert_array_equal(batch.input_ids[0], np.concatenate([ids[0], ids[1]]))
    np.testing.assert_array_equal(batch.input_ids[1], np.concatenate([ids[4], [-1] * 4]))
    # Next-token targets within each sample; ignore at each sample's end and on padding.
    np.testing.assert_array_equal(batch.labels[0], [1001, 1002, -100, 1004, 1005, 1006, 1007, -100])
    np.testing.assert_array_equal(batch.labels[1], [1017, 1018, 1019, -100, -100, -100, -100, -100])
    np.testing.assert_array_equal(batch.position_ids[0], [0, 1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(batch.position_ids[1], [0, 1, 2, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch.document_ids[0], [0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(batch.document_ids[1], [0, 0, 0, 0, -1, -1, -1, -1])
    np.testing.assert_array_equal(batch.sample_ids[1], [4, 4, 4, 4, -1, -1, -1, -1])
    unshifted = pack_samples(index, [0], ids, shift_labels=False)
    np.testing.assert_array_equal(unshifted.labels[0], batch.input_ids[0])


def test_pack_samples_custom_labels_truncation_and_errors():
    lengths = np.array([4, 12], np.int32)
    ids = _dataset(lengths)
    labels = [np.array([-100, -100, 7, 8]), np.arange(12) + 50]
    index = build_packing_index(lengths, 8, 0, mode="next_fit", shuffle=False, on_overlong="truncate")
    np.testing.assert_array_equal(index.truncated, [1])
    batch = pack_samples(index, [0, 1], ids, labels)
    np.testing.assert_array_equal(batch.labels[0, :4], [-100, 7, 8, -100])
    np.testing.assert_array_equal(batch.input_ids[1], ids[1][:8])
    np.testing.assert_array_equal(batch.labels[1], np.arange(1, 9) + 50)  # last target is the real next token
    with pytest.raises(ValueError, match="sample 0 has 3 tokens but the packing index"):
        pack_samples(index, [0], [ids[0][:3], ids[1]])


def test_pack_samples_over_a_shuffled_first_fit_index():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, 200).astype(np.int32)
    ids = _dataset(lengths)
    index = build_packing_index(lengths, 32, 3)
    batch = pack_samples(index, np.arange(index.num_bins), ids)
    real = batch.document_ids >= 0
    assert real.sum() == lengths.sum()
    for row, b in itertools.islice(enumerate(range(index.num_bins)), 0, None, 7):
        expected = np.concatenate([ids[i] for i in index.bin(b)])
        np.testing.assert_array_equal(batch.input_ids[row, : len(expected)], expected)


def test_document_attention_mask():
    doc = np.array([[0, 0, 1, 1, 1, -1]])
    mask = document_attention_mask(doc)
    expected = np.zeros((1, 6, 6), bool)
    expected[0, 0, 0] = True
    expected[0, 1, :2] = True
    expected[0, 2, 2] = True
    expected[0, 3, 2:4] = True
    expected[0, 4, 2:5] = True
    expected[0, 5, 5] = True  # padding attends to itself only
    np.testing.assert_array_equal(mask, expected)

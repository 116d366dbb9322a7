"""Sequence packing: the packed-sequence index and packed batches.

``build_packing_index`` decides which tokenised samples share a row of
``seq_len`` tokens. It runs in C++ (``megatron_evomoe._C_data``, built from
``csrc/packing_index.cpp`` at install time) when that is built, and in
NumPy/Python otherwise, with a one-time warning. Both give identical results
(tests/csrc/test_packing_index.py checks it).

The algorithm, which the two implementations share exactly:

1. **Visiting order.** Sample ``i`` gets the key ``splitmix64(seed, i)``: the
   ``i``-th output of a splitmix64 stream seeded with ``seed``, computed as a
   function of the counter (so NumPy can vectorise it). Samples are visited
   in increasing ``(key, i)`` order (a stable argsort of the keys). Keys
   depend only on ``(seed, i)``, so appending samples to a dataset does not
   reorder the old ones relative to each other. ``shuffle=False`` visits in
   index order. For a new order per epoch pass e.g. ``seed = base_seed + epoch``.
2. **Over-long samples** (``length > seq_len``): ``on_overlong="error"``
   raises ``ValueError`` naming the first such sample index; ``"truncate"``
   keeps the first ``seq_len`` tokens (the sample fills a row on its own);
   ``"skip"`` leaves it out of ``sample_order`` and records it in
   ``PackingIndex.skipped`` (a counted skip, never a silent drop).
3. **Packing**, in visiting order:
   ``mode="first_fit"`` (default): each sample goes into the lowest-numbered
   bin that still has room, opening a new bin when none has (a max segment
   tree over bin capacities makes this O(n log bins)); bins are therefore
   more than half full on average, and every bin but possibly one is.
   ``mode="next_fit"``: each sample goes into the most recent bin, or opens a
   new one when it does not fit; this keeps the visiting order intact
   (useful with ``shuffle=False`` for streams of documents).
4. **Output.** ``sample_order`` lists sample indices bin by bin, each bin's
   samples in the order they were placed; bin ``b`` is
   ``sample_order[bin_offsets[b]:bin_offsets[b + 1]]``. Zero-length samples are
   allowed and packed like any other.

``pack_samples`` materialises rows from the index: ``input_ids``, ``labels``
(next-token targets within each sample), ``position_ids`` that restart at 0
per sample, and ``document_ids`` so that attention can be made
document-causal (``document_attention_mask``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1  # must equal kIndexFormatVersion in csrc/packing_index.cpp
DATA_MODULE = "megatron_evomoe._C_data"
_REBUILD_HINT = "build it with `pip install --no-build-isolation -e .`"
MODES = ("first_fit", "next_fit")
ON_OVERLONG = ("error", "truncate", "skip")
BACKENDS = ("auto", "cpp", "python")

_INT32_MAX = np.iinfo(np.int32).max
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

_warned_fallback = False


@dataclass(frozen=True, eq=False)
class PackingIndex:
    """Which samples share which packed row.

    bin_offsets: int64 [num_bins + 1]; sample_order: int32 [num_kept];
    lengths: int32 [N] (the input); skipped / truncated: int64 indices of the
    over-long samples that were skipped / truncated; backend: "cpp" or "python".
    """

    bin_offsets: np.ndarray
    sample_order: np.ndarray
    lengths: np.ndarray
    seq_len: int
    skipped: np.ndarray
    truncated: np.ndarray
    backend: str

    @property
    def num_bins(self) -> int:
        return len(self.bin_offsets) - 1

    def bin(self, b: int) -> np.ndarray:
        """Sample indices of bin ``b``, in packing order: int32 [n_b]."""
        if not 0 <= b < self.num_bins:
            raise IndexError(f"bin {b} out of range for an index with {self.num_bins} bins")
        return self.sample_order[self.bin_offsets[b] : self.bin_offsets[b + 1]]

    def bin_tokens(self) -> np.ndarray:
        """Tokens per bin after truncation: int64 [num_bins]."""
        sizes = np.minimum(self.lengths[self.sample_order].astype(np.int64), self.seq_len)
        totals = np.concatenate([[0], np.cumsum(sizes)])
        return totals[self.bin_offsets[1:]] - totals[self.bin_offsets[:-1]]


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Packed rows, NumPy arrays of shape [B, S] (B bins, S = seq_len).

    input_ids: int64, pad_id on padding.
    labels: int64 targets for each position, ignore_index on padding (and, with
      shift_labels, on each sample's last token, whose next token is in another
      sample or absent).
    position_ids: int64, restarting at 0 for every sample; 0 on padding.
    document_ids: int32, the sample's slot within its row (0, 1, ...); -1 on padding.
    sample_ids: int64, the dataset index of the sample at each position; -1 on padding.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    sample_ids: np.ndarray


def splitmix64_keys(seed: int, num_samples: int) -> np.ndarray:
    """Shuffle keys: output ``i`` of the splitmix64 stream seeded with ``seed``, uint64 [N]."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2**64, as in C++
        z = np.uint64(seed) + np.arange(1, num_samples + 1, dtype=np.uint64) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def visiting_order(num_samples: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The order in which samples are packed: int64 [N] (step 1 of the module doc)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.argsort(splitmix64_keys(seed, num_samples), kind="stable")


def build_packing_index(
    lengths: Any,
    seq_len: int,
    seed: int = 0,
    *,
    mode: str = "first_fit",
    on_overlong: str = "error",
    shuffle: bool = True,
    backend: str = "auto",
) -> PackingIndex:
    """Build the packed-sequence index (algorithm in the module docstring).

    lengths: integer array-like [N] of tokenised sample lengths (>= 0).
    backend: "auto" (C++ when built, else Python with a one-time warning),
      "cpp" (raise RuntimeError when the helper is not built) or "python".
    """
    lengths = _check_lengths(lengths)
    seq_len, seed = _check_scalars(seq_len, seed)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if on_overlong not in ON_OVERLONG:
        raise ValueError(f"on_overlong must be one of {ON_OVERLONG}, got {on_overlong!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    helpers = None if backend == "python" else _cpp_helpers()
    if backend == "cpp" and helpers is None:
        raise RuntimeError(
            "backend='cpp' but megatron_evomoe._C_data is not built; "
            "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler and pybind11)"
        )
    if helpers is not None:
        bin_offsets, sample_order = helpers.build_packing_index(
            lengths, seq_len, seed, mode, on_overlong, shuffle
        )
        used = "cpp"
    else:
        if backend == "auto":
            _warn_fallback_once()
        bin_offsets, sample_order = build_packing_index_python(
            lengths, seq_len, seed, mode=mode, on_overlong=on_overlong, shuffle=shuffle
        )
        used = "python"

    overlong = np.flatnonzero(lengths > seq_len).astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    skipped = overlong if on_overlong == "skip" else empty
    truncated = overlong if on_overlong == "truncate" else empty
    if len(overlong):
        logger.warning(
            "packing: %s %d over-long sample(s) (> seq_len=%d tokens), first: sample %d",
            "skipped" if on_overlong == "skip" else "truncated", len(overlong), seq_len, overlong[0],
        )
    return PackingIndex(
        bin_offsets=bin_offsets,
        sample_order=sample_order,
        lengths=lengths,
        seq_len=seq_len,
        skipped=skipped,
        truncated=truncated,
        backend=used,
    )


def build_packing_index_python(
    lengths: np.ndarray,
    seq_len: int,
    seed: int = 0,
    *,
    mode: str = "first_fit",
    on_overlong: str = "error",
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The pure-Python twin of ``_C_data.build_packing_index``.

    lengths: int32 [N] (already checked). Returns (bin_offsets int64 [num_bins + 1],
    sample_order int32 [num_kept]).
    """
    overlong = np.flatnonzero(lengths > seq_len)
    if len(overlong) and on_overlong == "error":
        first = int(overlong[0])
        raise ValueError(
            f"sample {first} has {int(lengths[first])} tokens, more than seq_len={seq_len} "
            f"({len(overlong)} over-long sample(s) in all); pass on_overlong='truncate' or "
            "'skip' to keep going"
        )
    order = visiting_order(len(lengths), seed, shuffle)
    sizes = lengths[order].astype(np.int64)
    if on_overlong == "skip":
        keep = sizes <= seq_len
        order, sizes = order[keep], sizes[keep]
    sizes = np.minimum(sizes, seq_len)  # on_overlong == "truncate"

    size_list = sizes.tolist()  # Python ints: the loops below are much faster on lists
    if mode == "first_fit":
        bin_of, num_bins = _first_fit(size_list, seq_len, sum(size_list))
    else:
        bin_of, num_bins = _next_fit(size_list, seq_len)

    bin_of_arr = np.asarray(bin_of, dtype=np.int64)
    counts = np.bincount(bin_of_arr, minlength=num_bins)
    bin_offsets = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(counts, out=bin_offsets[1:])
    # A stable sort by bin keeps each bin's samples in placement order.
    sample_order = order[np.argsort(bin_of_arr, kind="stable")].astype(np.int32)
    return bin_offsets, sample_order


def _first_fit(sizes: list[int], seq_len: int, total: int) -> tuple[list[int], int]:
    """First-fit over a max segment tree; see _first_fit in csrc/packing_index.cpp."""
    n = len(sizes)
    if n == 0:
        return [], 0
    # First-fit leaves any two bins holding more than seq_len together,
    # so bins < 2 * total / seq_len + 1: that bounds the tree.
    leaves = max(1, min(n, 2 * (total // seq_len) + 2))
    width = 1
    while width < leaves:
        width <<= 1
    tree = [-1] * (2 * width)  # padding leaves (-1) never fit
    tree[width : width + leaves] = [seq_len] * leaves
    for node in range(width - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])

    bin_of = [0] * n
    num_bins = 0
    for i, size in enumerate(sizes):
        assert tree[1] >= size, "first-fit bin bound violated"
        node = 1
        while node < width:
            node = 2 * node if tree[2 * node] >= size else 2 * node + 1
        b = node - width
        bin_of[i] = b
        if b >= num_bins:
            num_bins = b + 1
        tree[node] -= size
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left >= right else right
            node >>= 1
    return bin_of, num_bins


def _next_fit(sizes: list[int], seq_len: int) -> tuple[list[int], int]:
    bin_of = [0] * len(sizes)
    num_bins = 0
    used = 0
    for i, size in enumerate(sizes):
        if num_bins == 0 or used + size > seq_len:
            num_bins += 1
            used = 0
        bin_of[i] = num_bins - 1
        used += size
    return bin_of, num_bins


def pack_samples(
    index: PackingIndex,
    bins: Sequence[int] | np.ndarray,
    input_ids: Any,
    labels: Any = None,
    *,
    pad_id: int = 0,
    ignore_index: int = -100,
    shift_labels: bool = True,
) -> PackedBatch:
    """Materialise the rows ``bins`` of ``index`` as a PackedBatch of [len(bins), seq_len].

    input_ids / labels: indexable by sample index (a list, or a dataset with
      ``__getitem__``), each item a 1-D integer array of that sample's length.
      labels=None uses input_ids; pass labels with ignore_index on prompt
      tokens for instruction data.
    shift_labels: True puts the next token of the same sample at each position
      (so the loss must not shift again, and no sample predicts its neighbour's
      first token); False copies the labels aligned with input_ids.
    Truncated samples keep their first seq_len tokens (their last target is the
    next real token).
    """
    bins = np.asarray(bins, dtype=np.int64).reshape(-1)
    shape = (len(bins), index.seq_len)
    out_ids = np.full(shape, pad_id, dtype=np.int64)
    out_labels = np.full(shape, ignore_index, dtype=np.int64)
    out_pos = np.zeros(shape, dtype=np.int64)
    out_doc = np.full(shape, -1, dtype=np.int32)
    out_sample = np.full(shape, -1, dtype=np.int64)
    for row, b in enumerate(bins.tolist()):
        start = 0
        for slot, i in enumerate(index.bin(b).tolist()):
            ids, targets = _sample_tokens(index, i, input_ids, labels, ignore_index, shift_labels)
            n = min(len(ids), index.seq_len)
            end = start + n
            assert end <= index.seq_len, f"bin {b} holds more than seq_len tokens"
            out_ids[row, start:end] = ids[:n]
            out_labels[row, start:end] = targets[:n]
            out_pos[row, start:end] = np.arange(n)
            out_doc[row, start:end] = slot
            out_sample[row, start:end] = i
            start = end
    return PackedBatch(out_ids, out_labels, out_pos, out_doc, out_sample)


def _sample_tokens(index, i, input_ids, labels, ignore_index, shift_labels):
    ids = np.asarray(input_ids[i]).reshape(-1)
    if len(ids) != index.lengths[i]:
        raise ValueError(
            f"sample {i} has {len(ids)} tokens but the packing index was built with "
            f"length {int(index.lengths[i])}; rebuild the index from the same tokenisation"
        )
    lab = ids if labels is None else np.asarray(labels[i]).reshape(-1)
    if len(lab) != len(ids):
        raise ValueError(f"sample {i} has {len(ids)} input_ids but {len(lab)} labels")
    if shift_labels:
        lab = np.concatenate([lab[1:], np.array([ignore_index], dtype=lab.dtype)]) if len(lab) else lab
    return ids, lab


def document_attention_mask(document_ids: np.ndarray) -> np.ndarray:
    """Document-causal attention mask from PackedBatch.document_ids.

    document_ids: [B, S] -> bool [B, S(query), S(key)], True where the query may
    attend to the key: same document and key <= query. Padding queries attend
    only to themselves, so that a softmax over a row is never empty.
    """
    doc = np.asarray(document_ids)
    seq = doc.shape[-1]
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    same = doc[:, :, None] == doc[:, None, :]
    real = doc[:, :, None] >= 0
    mask = same & causal & real
    pad_self = (~real[:, :, 0])[:, :, None] & np.eye(seq, dtype=bool)
    return mask | pad_self


def _check_lengths(lengths: Any) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    negative = np.flatnonzero(arr < 0)
    if len(negative):
        i = int(negative[0])
        raise ValueError(f"sample {i} has negative length {int(arr[i])}")
    too_big = np.flatnonzero(arr > _INT32_MAX)
    if len(too_big):
        i = int(too_big[0])
        raise ValueError(f"sample {i} has length {int(arr[i])}, more than the int32 limit")
    if len(arr) > _INT32_MAX:
        raise ValueError(f"lengths has {len(arr)} samples, more than the int32 limit")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _check_scalars(seq_len: Any, seed: Any) -> tuple[int, int]:
    if isinstance(seq_len, (bool, np.bool_)) or not isinstance(seq_len, (int, np.integer)):
        raise ValueError(f"seq_len must be an int, got {seq_len!r}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seq_len), int(seed)


def _cpp_helpers():
    """The built C++ module, or None (not built, not importable, or stale)."""
    return load_cpp_helpers()[0]


@functools.lru_cache(maxsize=None)
def load_cpp_helpers() -> tuple[ModuleType | None, str]:
    """(megatron_evomoe._C_data or None, "built" or why not); never raises.

    Lives here rather than in megatron_evomoe.ops (whose ``_ext.load_data_helpers``
    calls this) so that data loading does not import torch and the ops package.
    """
    try:
        module = importlib.import_module(DATA_MODULE)
    except Exception as exc:  # noqa: BLE001 -- ImportError, or OSError from a bad .so
        try:
            missing = importlib.util.find_spec(DATA_MODULE) is None
        except Exception:  # noqa: BLE001
            missing = True
        if missing:
            return None, (
                f"not built (no {DATA_MODULE}: no C++ compiler or pybind11 at install time, or "
                f"EVOMOE_SKIP_CPP_BUILD was set; {_REBUILD_HINT})"
            )
        return None, f"built but not importable ({type(exc).__name__}: {exc}; {_REBUILD_HINT})"
    built = getattr(module, "INDEX_FORMAT_VERSION", None)
    if built != INDEX_FORMAT_VERSION:
        return None, (
            f"stale build (index format {built}, the Python code expects {INDEX_FORMAT_VERSION}; "
            f"{_REBUILD_HINT})"
        )
    return module, "built"


def _warn_fallback_once() -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    warnings.warn(
        f"megatron_evomoe: packing index built in pure Python (data_ext: {load_cpp_helpers()[1]}); "
        "this is slower on large datasets",
        RuntimeWarning,
        stacklevel=3,
    )

"""Compact tables of the token index: many short strings as one UTF-8 blob and their end offsets,
and list-like views of them and of integer arrays that build no Python object per entry.

Strings are stored as the blob and each one's byte length (in the smallest unsigned dtype, often
one byte); the end offsets are their cumulative sum, computed when the table is opened.  Record
ids keep their JSON type (a string id and an integer id are different ids): when every id is a
string they are stored as they are, else each as its JSON text (`"r1"`, `7`, `null`), decoded on
access.  Image paths repeat (many records
per image): `dedup` stores each distinct path once and one small index per record.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np


def smallest_uint(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds 0..max_value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def encode_strings(strings: Iterable[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(blob uint8 [total bytes], lengths [N]: byte length of each string)."""
    encoded = [s.encode("utf-8") for s in strings]
    lengths = [len(b) for b in encoded]
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.asarray(lengths, smallest_uint(max(lengths, default=0)))


def ends_of(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths, dtype=np.int64)  # [N]


class ListView(Sequence):
    """What the views share: a list's indexing (negative, slices, IndexError), equality with lists."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} entries")
        return self._get(int(i) % len(self))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        head = ", ".join(repr(x) for x in self[:5])
        return f"[{head}{', ...' if len(self) > 5 else ''}] ({len(self)} entries)"


class StringView(ListView):
    """The strings of a table, decoded on access (`decode` turns each text into its value)."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray, decode: Callable[[str], Any] = str):
        self._blob, self._ends, self._decode = blob, ends, decode

    def __len__(self) -> int:
        return len(self._ends)

    def _get(self, i: int):
        start = int(self._ends[i - 1]) if i else 0
        return self._decode(bytes(self._blob[start:int(self._ends[i])]).decode("utf-8"))


def encode_ids(ids: List[Any]) -> Tuple[str, List[str]]:
    """("str", the ids) when all are strings, else ("json", their JSON texts)."""
    if all(isinstance(i, str) for i in ids):
        return "str", ids
    return "json", [json.dumps(i) for i in ids]


def id_view(kind: str, blob: np.ndarray, lengths: np.ndarray) -> StringView:
    """The record ids (str, int or None) of a table that `encode_ids` wrote."""
    return StringView(blob, ends_of(lengths), json.loads if kind == "json" else str)


class IndexedView(ListView):
    """table[codes[i] - base] for every i.  base 1: code 0 is None (a record without an image);
    base 0: a plain gather (the ids of the truncated records)."""

    def __init__(self, table: Sequence, codes: np.ndarray, base: int = 1):
        self._table, self._codes, self._base = table, codes, base

    def __len__(self) -> int:
        return len(self._codes)

    def _get(self, i: int):
        code = int(self._codes[i])
        return None if self._base and code == 0 else self._table[code - self._base]


class PathView(ListView):
    """root / dirs[dir_codes[i]] / names[i]: image paths with their folders stored once (a LLaVA mix has
    hundreds of thousands of images in a few folders)."""

    def __init__(self, root: str, dirs: StringView, dir_codes: np.ndarray, names: StringView):
        self._root, self._dirs, self._dir_codes, self._names = root, dirs, dir_codes, names

    def __len__(self) -> int:
        return len(self._names)

    def _get(self, i: int) -> str:
        return os.path.join(self._root, self._dirs[int(self._dir_codes[i])], self._names[i])


def split_paths(paths: Sequence[str]) -> Tuple[List[str], List[int], List[str]]:
    """(distinct folders, each path's folder code, each path's file name): what PathView reads."""
    dirs = Dedup()
    codes = [dirs.code(os.path.dirname(p)) - 1 for p in paths]
    return dirs.table(), codes, [os.path.basename(p) for p in paths]


class Dedup:
    """Codes for strings as they come: 0 for None, 1 + position in the table of distinct strings."""

    def __init__(self):
        self.codes: Dict[str, int] = {}

    def code(self, s: Optional[str]) -> int:
        if s is None:
            return 0
        return self.codes.setdefault(s, len(self.codes) + 1)

    def table(self) -> List[str]:
        return list(self.codes)  # dicts keep insertion order: position k has code k + 1


class IntView(ListView):
    """Python ints of a numpy array (a memory map)."""

    def __init__(self, values: np.ndarray):
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def _get(self, i: int) -> int:
        return int(self._values[i])

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._values, dtype=dtype)

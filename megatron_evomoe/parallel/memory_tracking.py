"""Live tensor bytes and their peak over a region of code, on any device (a measurement tool).

    with LiveTensorBytes() as mem:
        ...                                  # e.g. build and materialise a model
    mem.peak, mem.live                       # bytes of tensor storage created inside and alive

Every storage that an op inside the region returns and did not receive (not a view, not an
in-place result) counts from then until it is freed (a weakref finalizer on the storage, whose
Python object torch keeps unique while the storage lives: views and nn.Parameter wrappers do not
count twice). Not counted: storages made before the region or outside ops (the file mapping of
`torch.load(mmap=True)`: the page cache, not the process's memory; slicing it makes views) and
meta tensors. The peak is what the allocator had to hold for these tensors at once; its caching
and fragmentation are not included. Works under FakeTensorMode too (enter it inside the fake mode):
the memory plan's measurement (stages/memory_plan.py). Used by tests/parallel/test_sharded_construction.py.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_id(x) -> int | None:
    """The identity of x's storage: torch keeps one Python storage object per live storage (real or
    fake: a FakeTensor's storage has no data pointer, so pointers cannot tell storages apart)."""
    if isinstance(x, torch.Tensor) and not x.is_meta:
        return id(x.untyped_storage())
    if isinstance(x, torch.UntypedStorage):
        return id(x)
    return None


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0  # bytes of counted storages alive now
        self.peak = 0  # the most `live` has been
        self._seen: weakref.WeakSet = weakref.WeakSet()  # storages counted (weak: they still get freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_id(x) for x in tree_flatten((args, kwargs))[0]}  # views and in-place ops alias these
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and _storage_id(t) not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, s: torch.UntypedStorage) -> None:
        if s in self._seen or s.nbytes() == 0:
            return
        nbytes = s.nbytes()
        self._seen.add(s)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(s, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

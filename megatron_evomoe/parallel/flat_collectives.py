"""The one-tensor all-gather and reduce-scatter, under whichever name this torch gives them.

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (torch 1.13 .. 2.12) to
``all_gather_single`` / ``reduce_scatter_single`` and made the old names deprecated wrappers that
warn on every call. Picking the new name when present and the old one otherwise keeps one code
path, no warning on 2.13, and the package's torch floor where its other APIs put it (setup.py).
Both take ``(output, input, group=...)``: output is [world * n, ...] / [n, ...] for an input of
[n, ...] / [world * n, ...].
"""
from __future__ import annotations

import torch.distributed as dist


def newest_collective(*names: str):
    """The first of `names` (newest first) that torch.distributed has."""
    for name in names:
        collective = getattr(dist, name, None)
        if collective is not None:
            return collective

    def missing(*args, **kwargs):
        # Raised at the call, not at import: one-process runs never call it (their groups are None).
        raise RuntimeError(f"torch.distributed has none of {', '.join(names)} (a torch built without distributed?)")
    return missing


all_gather_single = newest_collective("all_gather_single", "all_gather_into_tensor")
reduce_scatter_single = newest_collective("reduce_scatter_single", "reduce_scatter_tensor")

"""A resumable, data-parallel-sharded, infinite sampler.

The global stream.  All ranks agree on one infinite sequence of sample indices: the
concatenation of epoch 0's order, epoch 1's order, ...  Epoch e's order is a
permutation of range(num_samples) drawn from (seed, e) (or the identity when
shuffle=False).  Epoch boundaries do not interrupt the stream: a global batch that
straddles one simply takes its tail from the next epoch.

Sharding.  Rank r of W takes the stream positions r, r + W, r + 2W, ...: its k-th
index is global position k*W + r.  A global batch of B*W samples is a run of B*W
consecutive stream positions, [g, g + B*W) with g a multiple of W, and every rank's
next B indices land exactly in it: rank r takes the positions of the run congruent to
r mod W.  The ranks' slices are therefore disjoint and together cover the global
batch, for any per-rank batch size B and without the sampler knowing B.

Resuming.  The position of the stream is a single global counter (a multiple of W,
the same on every rank), saved as (epoch, position within the epoch).  `state_dict()`
is identical on all ranks, so saving it from rank 0 suffices, and loading it continues
the exact same stream, also under a different world size (each rank then takes the
same global batches as before, split W' ways).

Prefetching DataLoaders draw indices ahead of the training step; the sampler's own
position is then ahead of what was trained on.  A trainer that counts the samples it
consumed (globally, Megatron's `consumed_samples`) should resume with
`sampler.seek(consumed_samples)` rather than with a state saved from a sampler that a
DataLoader was prefetching from.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._group_start = 0  # global stream position of this rank's next stride group; multiple of W
        self._cached_epoch: Optional[int] = None
        self._cached_order: Optional[np.ndarray] = None

    # The order of one epoch, cached: consecutive draws almost always hit the same epoch.
    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def global_index(self, position: int) -> int:
        """Sample index at global stream position `position`."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self.epoch_order(epoch)[offset])

    @property
    def epoch(self) -> int:
        return self._group_start // self.num_samples

    @property
    def consumed_samples(self) -> int:
        """Global stream positions consumed so far (all ranks together)."""
        return self._group_start

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        index = self.global_index(self._group_start + self.rank)
        self._group_start += self.world_size
        return index

    def seek(self, consumed_samples: int) -> None:
        """Continue after `consumed_samples` global samples (must be a multiple of world_size)."""
        if consumed_samples < 0 or consumed_samples % self.world_size:
            raise ValueError(f"consumed_samples must be a non-negative multiple of world_size={self.world_size}, "
                             f"got {consumed_samples}")
        self._group_start = int(consumed_samples)

    def state_dict(self) -> Dict[str, Any]:
        epoch, position = divmod(self._group_start, self.num_samples)
        return {"epoch": epoch, "position": position, "seed": self.seed, "num_samples": self.num_samples,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; resuming would change the data order")
        for key in ("epoch", "position"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"sampler state field '{key}' must be a non-negative int, got {state.get(key)!r}")
        self.seek(state["epoch"] * self.num_samples + state["position"])

"""The global sample stream of a stage: one file's shuffled epochs, or a weighted mixture of files.

Samples are named by a global id over the stage's files laid end to end (component c's sample i is
`offsets[c] + i`), so a micro-batch plan stays a list of ints whatever the number of files.

One file: position p of the stream is exactly `ResumableSampler`'s (epoch p // N, drawn from
(seed, epoch)), so a single-file stage keeps today's order and its checkpoints.

A mixture of K files: the component of global position p is drawn counter-based, from
`default_rng([seed, MIXTURE_TAG, p // BLOCK])`, a pure function of the seed and the position, with
probability weight_c / sum(weights); component c's j-th draw is position j of its own shuffled
epochs (its own `ResumableSampler` seeded from (seed, c)). The stream's state is the position and the
per-component counts, so it resumes exactly at any position, under any world size.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .sampler import ResumableSampler

MIXTURE_TAG = 0x4D495854  # keeps the component draws' generator apart from the epochs' ([seed, epoch])
BLOCK = 4096  # positions whose components one generator call draws


class SampleStream:
    """A resumable iterator of global sample ids (`take(n)`), shared by every rank."""

    def __init__(self, sizes: Sequence[int], seed: int, weights: Optional[Sequence[float]] = None,
                 shuffle: bool = True):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every component needs at least one sample, got sizes {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])  # [K + 1]
        self.seed = int(seed)
        weights = [1.0] * len(self.sizes) if weights is None else [float(w) for w in weights]
        assert len(weights) == len(self.sizes) and min(weights) > 0, weights
        self.probs = np.asarray(weights) / sum(weights)  # [K]
        self.weights = weights
        if len(self.sizes) == 1:  # the plain stream: today's sampler, seed and all
            self.components = [ResumableSampler(self.sizes[0], seed=self.seed, shuffle=shuffle)]
        else:
            self.components = [ResumableSampler(n, seed=int(np.random.SeedSequence([self.seed, c]).generate_state(1)[0]),
                                                 shuffle=shuffle) for c, n in enumerate(self.sizes)]
        self.position = 0  # global stream positions consumed
        self.counts = [0] * len(self.sizes)  # per component: draws consumed
        self._block: Optional[int] = None
        self._block_draws: Optional[np.ndarray] = None

    @property
    def num_components(self) -> int:
        return len(self.sizes)

    def component_of(self, ids: np.ndarray) -> np.ndarray:
        """Component of each global id."""
        return np.searchsorted(self.offsets, ids, side="right") - 1

    def _component_at(self, position: int) -> int:
        if self.num_components == 1:
            return 0
        block, offset = divmod(position, BLOCK)
        if self._block != block:
            rng = np.random.default_rng([self.seed, MIXTURE_TAG, block])
            self._block, self._block_draws = block, rng.choice(self.num_components, size=BLOCK, p=self.probs)
        return int(self._block_draws[offset])

    def take(self, n: int) -> np.ndarray:
        """The next `n` global ids of the stream [n]."""
        out = np.empty(n, dtype=np.int64)
        for k in range(n):
            c = self._component_at(self.position)
            out[k] = self.offsets[c] + self.components[c].global_index(self.counts[c])
            self.counts[c] += 1
            self.position += 1
        return out

    # ---- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """One file: today's sampler state ({epoch, position, seed, num_samples, shuffle}); a mixture:
        the global position, the per-component counts and what they are counts of."""
        if self.num_components == 1:
            sampler = self.components[0]
            sampler.seek(self.position)
            return sampler.state_dict()
        return {"position": self.position, "counts": list(self.counts), "seed": self.seed,
                "num_samples": list(self.sizes), "weights": list(self.weights),
                "shuffle": self.components[0].shuffle}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.num_components == 1:
            sampler = self.components[0]
            sampler.load_state_dict(state)
            self.position, self.counts = sampler.consumed_samples, [sampler.consumed_samples]
            return
        for key, mine in (("seed", self.seed), ("num_samples", self.sizes), ("weights", self.weights),
                          ("shuffle", self.components[0].shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this mixture has {key}={mine!r}; "
                                 "resuming would change the data order")
        counts: List[int] = state.get("counts")
        if (not isinstance(state.get("position"), int) or not isinstance(counts, list)
                or len(counts) != self.num_components or sum(counts) != state["position"]):
            raise ValueError(f"sampler state of a mixture needs position and per-component counts that add up "
                             f"to it, got position={state.get('position')!r} counts={counts!r}")
        self.position, self.counts = int(state["position"]), [int(c) for c in counts]

"""Every rank must train the configuration the others train.

Each rank of a job resolves its own config (YAML + command-line overrides, the vocabulary size
from its tokenizer). A launcher script that gives one node another override, or a node with an
older copy of the YAML, makes ranks build different models or schedules: the run then hangs in a
collective of mismatched sizes, or, worse, trains on with each rank doing something else.
`agree_on_config` compares a hash of `cfg.to_dict()` (as canonical JSON) over the world with one
all-gather; when they differ, the configs themselves are gathered and every rank raises the same
ConfigError naming the first field that differs and each rank's value.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from .state import ParallelState, comm_device
from .watchdog import collective

_MISSING = "<absent>"
_MAX_VALUE_CHARS = 80


def canonical_json(cfg: Config) -> str:
    """The resolved config as JSON with sorted keys: equal configs give equal text on every rank."""
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))


def agree_on_config(state: ParallelState, cfg: Config) -> None:
    """Collective over all ranks (a no-op for one process): ConfigError unless every rank's config is equal."""
    if state.world_size == 1:
        return
    text = canonical_json(cfg)
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)  # [32]
    with collective("config agreement: all_gather of the config hashes over all ranks"):
        digests = _all_gather(digest, state.world_size)
    if all(torch.equal(d, digests[0]) for d in digests):
        return
    with collective("config agreement: all_gather of the differing configs over all ranks"):
        texts = _all_gather_text(json.dumps(cfg.to_dict()), state.world_size)  # schema order, for the message
    trees = [json.loads(t) for t in texts]
    raise ConfigError(describe_difference(trees))


def describe_difference(trees: list[dict]) -> str:
    """'<dotted field>: differs between ranks (1 on rank 0; 2 on ranks 1, 3); ...' for the first field
    whose value is not the same on every rank (in the order of rank 0's config: model, vision, ...)."""
    flat = [flatten(t) for t in trees]
    fields = list(flat[0]) + [k for f in flat[1:] for k in f if k not in flat[0]]
    for name in fields:
        values = [json.dumps(f.get(name, _MISSING)) for f in flat]
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            parts = [f"{_short(v)} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                     for v, r in groups.items()]
            return (f"{name}: differs between ranks ({'; '.join(parts)}); launch every rank with the same config "
                    "file and overrides")
    raise AssertionError("config hashes differ but no field does")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.seed': 1, 'stages[0].name': 'a', ...}; a list of values (adam_betas) is one field."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {f"len({prefix})": len(tree)}  # different stage counts: named before their contents
        for i, item in enumerate(tree):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def _short(value: str) -> str:
    return value if len(value) <= _MAX_VALUE_CHARS else value[:_MAX_VALUE_CHARS - 3] + "..."


def _all_gather(t: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    device = comm_device()
    out = [torch.empty_like(t, device=device) for _ in range(world_size)]
    dist.all_gather(out, t.to(device))
    return [o.cpu() for o in out]


def _all_gather_text(text: str, world_size: int) -> list[str]:
    """Strings of different lengths: gather the lengths, then the UTF-8 bytes padded to the longest."""
    data = text.encode()
    lengths = [int(n) for n in _all_gather(torch.tensor([len(data)], dtype=torch.int64), world_size)]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return [bytes(g[:n].tolist()).decode() for g, n in zip(_all_gather(padded, world_size), lengths)]

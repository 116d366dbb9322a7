"""Initial values per tensor, the same for every parallel layout.

A tensor's initial values depend only on (seed, its global parameter name, its FULL shape), never on
which rank builds it or how the model is split, so a rank can materialise just its shard of a model
built on the meta device (parallel/sharded_construction.py) and hold exactly the values that the
one-process model holds in the same place.

    rules = init_rules(model, cfg)                     # name -> InitRule (the distribution)
    fill_box(out, rules[name], seed, name, full_shape, starts)

The stream: the full tensor, viewed row-major as [R, last] (last = its last dim, R = the rest), is
cut into chunks of `rows_per_chunk(last)` whole rows (<= CHUNK_ELEMENTS, 64 MiB of fp32); chunk j is
drawn on the CPU in fp32 from its own generator, seeded by hash(seed, name, j). A rank draws only the
chunks that hold rows of its box and keeps the box's columns, so its peak is its shard + one chunk.
The distributions are those of `DecoderLM.reset_parameters` (normal, std / depth-scaled std for the
residual outputs), the vision tower's torch defaults (U(+-1/sqrt(fan_in)) for Linear/Conv2d) and
its 0.02 position embeddings; norms and biases are constants.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .llm import llm_init_rule

CHUNK_ELEMENTS = 1 << 24  # elements per drawn chunk (64 MiB in fp32); part of the stream's definition


@dataclass(frozen=True)
class InitRule:
    """normal: N(0, scale^2); uniform: U(-scale, scale); constant: every element = scale."""
    kind: Literal["normal", "uniform", "constant"]
    scale: float


def init_rules(model: nn.Module, cfg) -> dict[str, InitRule]:
    """The rule of every parameter (by its first name: a tied weight once) of a `MultimodalLM`,
    sharded or not (the rules read names, module types and dims, not the values)."""
    rules = {}
    for name, p in model.named_parameters():
        if name.startswith("llm."):
            kind, scale = llm_init_rule(name, p.dim(), cfg.model)
        else:
            kind, scale = _vision_rule(model, name)
        rules[name] = InitRule(kind, scale)
    return rules


def _vision_rule(model: nn.Module, name: str) -> tuple[str, float]:
    """The vision tower and projector keep torch's default inits (what they always had)."""
    owner_name, _, local = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if local in ("pos_embed", "cls_embed"):
        return "normal", 0.02
    if isinstance(owner, nn.LayerNorm):
        return "constant", 1.0 if local == "weight" else 0.0
    if isinstance(owner, (nn.Linear, nn.Conv2d)):  # kaiming_uniform(a=sqrt(5)) and its bias rule
        return "uniform", 1.0 / math.sqrt(owner.weight[0].numel())
    raise AssertionError(f"no init rule for {name} ({type(owner).__name__})")


def rows_per_chunk(last: int) -> int:
    return max(1, CHUNK_ELEMENTS // last)


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_chunk(rule: InitRule, seed: int, name: str, chunk: int, num_rows: int, last: int) -> torch.Tensor:
    """Rows [chunk*rows_per_chunk, +num_rows) of the full tensor [R, last], fp32 on the CPU."""
    g = torch.Generator().manual_seed(_chunk_seed(seed, name, chunk))
    out = torch.empty(num_rows, last)
    if rule.kind == "normal":
        return out.normal_(0.0, rule.scale, generator=g)
    return out.uniform_(-rule.scale, rule.scale, generator=g)


@torch.no_grad()
def fill_box(out: torch.Tensor, rule: InitRule, seed: int, name: str, full_shape: tuple[int, ...],
             starts: tuple[int, ...]) -> None:
    """out[i] = full[starts + i] for the full tensor of `name`; elements past `full_shape` (the
    vocabulary padding of a TP shard) are zero. out: any contiguous tensor, [*local]."""
    assert out.is_contiguous() and out.dim() == len(full_shape) == len(starts) >= 1, (name, out.shape)
    out.zero_()
    ends = [min(s + n, f) for s, n, f in zip(starts, out.shape, full_shape)]
    if any(e <= s for s, e in zip(starts, ends)):
        return  # nothing of the full tensor in this box (a padding-only shard)
    inside = out[tuple(slice(0, e - s) for s, e in zip(starts, ends))]  # [*box]: the real elements
    if rule.kind == "constant":
        inside.fill_(rule.scale)
        return
    last = full_shape[-1]
    c0, c1 = starts[-1], ends[-1]
    # the global row (of [R, last]) of each of the box's rows, row-major over the leading dims
    rows = torch.zeros((), dtype=torch.int64)
    for d in range(len(full_shape) - 1):
        rows = rows[..., None] * full_shape[d] + torch.arange(starts[d], ends[d])
    rows = rows.reshape(-1)  # [box rows]
    # (slicing off dim-0 padding keeps the box contiguous; any other box is filled through a copy)
    box = inside if inside.is_contiguous() else torch.empty(inside.shape, dtype=out.dtype, device=out.device)
    dst = box.view(-1, c1 - c0)  # [box rows, box cols]
    per = rows_per_chunk(last)
    num_rows = math.prod(full_shape[:-1])
    for chunk in torch.unique(rows // per).tolist():
        r0 = chunk * per
        vals = draw_chunk(rule, seed, name, chunk, min(per, num_rows - r0), last)  # [n, last]
        sel = (rows >= r0) & (rows < r0 + per)  # [box rows], on the CPU like the drawn chunk
        dst[sel.to(out.device)] = vals[rows[sel] - r0, c0:c1].to(device=out.device, dtype=out.dtype)
        del vals
    if box is not inside:
        inside.copy_(box)


def full_tensor(rule: InitRule, seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole tensor of `name` (fp32, CPU): the one-process values, for tests and small models."""
    out = torch.empty(shape)
    fill_box(out, rule, seed, name, tuple(shape), (0,) * len(shape))
    return out

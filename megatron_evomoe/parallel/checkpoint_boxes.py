"""This rank's part of every checkpointed tensor, as boxes of the full (one-process) tensor.

A distributed checkpoint (distributed_checkpoint.py) stores each tensor once, under its one-process
name and full shape, as the union of the boxes the ranks hold. A `Box` is a view into a live tensor
plus where it sits in the full one; the same boxes serve saving (DCP reads the views) and loading
(DCP copies straight into them: the parameter, the AdamW moment). Because the checkpoint is
addressed by full-tensor coordinates, a box of any other layout reads from it: that is resharding.

    model/<name>                 a parameter or buffer: the rank's TP/EP shard, vocabulary padding cut off
    optim/<name>/exp_avg         AdamW's moments, boxed like the parameter; under ZeRO-1 a replica holds a
    optim/<name>/exp_avg_sq      flat range of the parameter, which is cut into row-major boxes
    optim/<name>/step            the parameter's step count (a scalar)

Replicas (DP, and TP for replicated tensors) hold boxes with the same coordinates: DCP's planner
keeps one of them, so nothing is written twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .state import REPLICATED, ParallelState, named_shard_specs
from .sharded_construction import shard_box

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Box:
    data: torch.Tensor  # [*sizes]: a view of the live tensor (or its staged copy)
    offsets: tuple[int, ...]  # where data[0, ..., 0] sits in the full tensor


@dataclass
class Boxes:
    """The boxes of one full tensor that this rank holds (several under ZeRO-1, else one)."""
    shape: tuple[int, ...]  # the full (one-process) shape
    boxes: list[Box] = field(default_factory=list)

    def staged(self) -> "Boxes":
        """A copy that training cannot change any more (an asynchronous save writes it later)."""
        return Boxes(self.shape, [Box(b.data.detach().to("cpu", copy=True), b.offsets) for b in self.boxes])


def staged_copy(tree):
    """A copy of a state's tensors on the host (and of the containers holding them): what they held at
    the step boundary, for a save that writes later (train.async_save)."""
    from torch.utils._pytree import tree_map
    return tree_map(lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, tree)


def clipped(data: torch.Tensor, offsets, shape) -> Box | None:
    """The part of a box inside the full tensor (a TP shard of the vocabulary may reach into the
    padding past its end); None when nothing is inside."""
    sizes = [min(n, f - o) for n, o, f in zip(data.shape, offsets, shape)]
    if any(s <= 0 for s in sizes):
        return None
    return Box(data[tuple(slice(0, s) for s in sizes)], tuple(offsets))


def flat_range_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple, tuple, int, int]]:
    """Elements [lo, hi) of a row-major tensor of `shape`, as boxes that are each contiguous in that
    order: [(offsets, sizes, first, end)] with first/end the box's flat range. At most 2 * ndim - 1
    boxes: a partial first row, whole rows, a partial last row (recursively inside the rows)."""
    if lo >= hi:
        return []
    if not shape:
        return [((), (), lo, hi)]
    row = math.prod(shape[1:])
    out = []

    def within(r: int, a: int, b: int):  # part of row r, as boxes one row high
        return [((r, *o), (1, *s), r * row + x, r * row + y) for o, s, x, y in flat_range_boxes(shape[1:], a, b)]

    if lo % row:
        r = lo // row
        end = min(hi, (r + 1) * row)
        out += within(r, lo - r * row, end - r * row)
        lo = end
    if hi // row > lo // row:
        r0, r1 = lo // row, hi // row
        out.append(((r0, *[0] * (len(shape) - 1)), (r1 - r0, *shape[1:]), r0 * row, r1 * row))
        lo = r1 * row
    if lo < hi:
        r = lo // row
        out += within(r, lo - r * row, hi - r * row)
    return out


def model_boxes(model: nn.Module, state: ParallelState) -> dict[str, Boxes]:
    """'model/<name>' -> this rank's box of every tensor of the model's state dict (views)."""
    specs = named_shard_specs(model)
    out = {}
    for name, t in model.state_dict().items():
        shape, starts = shard_box(specs.get(name, REPLICATED), tuple(t.shape), state)
        box = clipped(t, starts, shape)
        out[f"model/{name}"] = Boxes(shape, [box] if box is not None else [])
    return out


@dataclass
class Slot:
    """What the optimizer steps for one parameter on this rank: the flat range [lo, hi) of the local
    parameter (all of it, or ZeRO-1's segment), keyed in the inner AdamW by `owner`."""
    name: str
    param: nn.Parameter  # the local parameter (its shard)
    lo: int
    hi: int
    owner: torch.Tensor  # the tensor AdamW keeps the state of: the parameter, or ZeRO-1's master range


def optimizer_slots(opt, params: list[tuple[str, nn.Parameter]]) -> tuple[torch.optim.Optimizer, list[Slot]]:
    """(the AdamW that holds the state, its slots) of a plain AdamW or a ZeroAdamW (data_parallel.py)."""
    if hasattr(opt, "parts"):  # ZeRO-1: each replica steps its segments of the flattened parameters
        names = {id(p): n for n, p in params}
        return opt.inner, [Slot(names[id(p)], p, lo, hi, master)
                           for part in opt.parts for p, lo, hi, master, _ in part["segments"]]
    return opt, [Slot(n, p, 0, p.numel(), p) for n, p in params]


def live_entries(inner: torch.optim.Optimizer, slots: list[Slot]) -> dict[str, dict]:
    """name -> {"step", "exp_avg" [hi - lo], "exp_avg_sq" [hi - lo]}: the optimizer's own tensors
    (flat views), zeros where it has not stepped yet."""
    out = {}
    for s in slots:
        st = inner.state.get(s.owner) or {}
        out[s.name] = ({"step": st["step"], **{k: st[k].view(-1) for k in MOMENTS}}
                       if all(k in st for k in (*MOMENTS, "step")) else fresh_entry(s))
    return out


def fresh_entry(s: Slot) -> dict:
    """Zeros to load a checkpoint's state into."""
    flat = torch.zeros(s.hi - s.lo, dtype=s.param.dtype, device=s.param.device)
    return {"step": torch.zeros((), dtype=torch.float32), "exp_avg": flat, "exp_avg_sq": flat.clone()}


def optimizer_boxes(model: nn.Module, slots: list[Slot], entries: dict[str, dict],
                    state: ParallelState) -> dict[str, Boxes]:
    """'optim/<name>/<key>' -> this rank's boxes of the entries: a slot's flat range [lo, hi) of its
    local parameter is cut into row-major boxes, placed in the full tensor by the shard's offsets."""
    specs = named_shard_specs(model)
    out: dict[str, Boxes] = {}
    for s in slots:
        shape, starts = shard_box(specs.get(s.name, REPLICATED), tuple(s.param.shape), state)
        entry = entries[s.name]
        for key in MOMENTS:
            boxes = out.setdefault(f"optim/{s.name}/{key}", Boxes(shape))
            for offsets, sizes, first, end in flat_range_boxes(tuple(s.param.shape), s.lo, s.hi):
                data = entry[key][first - s.lo:end - s.lo].view(sizes)
                box = clipped(data, [a + b for a, b in zip(starts, offsets)], shape)
                if box is not None:
                    boxes.boxes.append(box)
        out[f"optim/{s.name}/step"] = Boxes((), [Box(entry["step"], ())])
    return out


def install_entries(opt, inner: torch.optim.Optimizer, slots: list[Slot], entries: dict[str, dict]) -> None:
    """Hand loaded entries to the optimizer (its own load_state_dict: dtype and device as it wants
    them; ZeroAdamW also re-reads its master ranges from the loaded parameters)."""
    index = {id(t): i for i, t in enumerate(t for g in inner.param_groups for t in g["params"])}
    sd = opt.state_dict()
    sd["state"] = {index[id(s.owner)]: {"step": entries[s.name]["step"],
                                        **{k: entries[s.name][k].view_as(s.owner) for k in MOMENTS}}
                   for s in slots}
    opt.load_state_dict(sd)

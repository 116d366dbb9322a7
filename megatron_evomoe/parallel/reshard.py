"""The converter for the earlier per-rank checkpoint format, into one that every layout resumes from.

Before distributed checkpoints (distributed_checkpoint.py), every rank of a parallel run saved its
own shard under

    <save_dir>/ranks/<layout>/<rank>/checkpoints/<name>/state.pt      layout = tp2-pp1-ep2-dp2

with, next to its tensors, how each relates to the full tensor (`ShardSpec`), its coordinates in
the layout and the names of its optimizer's parameters. That is enough to rebuild the
single-process checkpoint offline, without processes:

    python -m megatron_evomoe.parallel.reshard RUN_DIR [--layout tp2-pp1-ep2-dp2] [--name NAME]

writes it to RUN_DIR/checkpoints/<name> (the one-process location; model, AdamW moments, step,
sampler, RNG and evolution state), from which a one-process run and a run under any layout
resume (each rank keeps its shard of every tensor and moment). ZeRO-1 per-rank checkpoints cannot
be converted (their moments are flat ranges without per-tensor bounds); resume them with a
version before distributed checkpoints.

The global batch of each stage does not depend on the layout, so the data stream and the loss
continue unchanged across a layout change; only the derived accumulation changes.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from .. import checkpointing as ckpt
from ..cli import USER_ERRORS, ArgumentParser, user_error
from .sharded_state import load_full_state_dict
from .state import REPLICATED, ShardSpec, named_shard_specs
from .tensor_parallel import take_shard


def layout_name(state) -> str:
    return f"tp{state.tp_size}-pp{state.pp_size}-ep{state.ep_size}-dp{state.dp_size}"


def refuse_per_rank_checkpoints(save_dir) -> None:
    """CheckpointError when a run folder holds per-rank checkpoints of the earlier format and no
    checkpoint it can resume from: resuming would silently start over."""
    root = Path(save_dir) / "ranks"
    if root.is_dir() and any(root.iterdir()):
        raise ckpt.CheckpointError(f"{save_dir}: holds per-rank checkpoints of the earlier format ({root}); convert "
                                   f"them once with `python -m megatron_evomoe.parallel.reshard {save_dir}`, then rerun")


def _spec(meta: dict, name: str) -> ShardSpec:
    s = meta["specs"].get(name)
    return ShardSpec() if s is None else ShardSpec(tp_dim=s[0], full_size=s[1], ep_dim=s[2], expert=bool(s[3]))


def _merge(name: str, pieces: list[tuple[dict, torch.Tensor]], spec: ShardSpec) -> torch.Tensor:
    """pieces: (coords, local tensor) from every rank that holds `name` -> the full tensor."""
    by_slot = {}
    for coords, t in pieces:
        key = (coords["tp"] if spec.tp_dim is not None else 0, coords["ep"] if spec.ep_dim is not None else 0)
        by_slot.setdefault(key, t)
    tp_n = 1 + max(k[0] for k in by_slot)
    ep_n = 1 + max(k[1] for k in by_slot)
    missing = [(a, b) for a in range(tp_n) for b in range(ep_n) if (a, b) not in by_slot]
    if missing:
        raise ckpt.CheckpointError(f"consolidate: {name}: no rank holds shard (tp, ep) = {missing[0]}")
    rows = []
    for b in range(ep_n):
        parts = [by_slot[(a, b)] for a in range(tp_n)]
        t = parts[0] if tp_n == 1 else torch.cat(parts, dim=spec.tp_dim)
        if spec.tp_dim is not None and spec.full_size is not None:
            t = t.narrow(spec.tp_dim, 0, spec.full_size)  # drop vocabulary padding
        rows.append(t)
    return rows[0] if ep_n == 1 else torch.cat(rows, dim=spec.ep_dim)


def _groups(template: dict, num_decay: int, num_params: int, weight_decay: float) -> list[dict]:
    """training/optim.py's param groups (decay, no-decay; empty ones left out) over indices."""
    groups = [dict(template, params=list(range(num_decay)), weight_decay=weight_decay),
              dict(template, params=list(range(num_decay, num_params)), weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def _optimizer_order(names: list[str], shapes: dict[str, torch.Size]) -> list[str]:
    """training/optim.py's grouping: matrices (weight decay) first, then the rest, each in order."""
    return [n for n in names if len(shapes[n]) >= 2] + [n for n in names if len(shapes[n]) < 2]


def consolidate_states(states: list[dict]) -> dict:
    """Per-rank trainer states (all ranks of one layout, one checkpoint) -> one single-process state."""
    states = sorted(states, key=lambda s: s["parallel"]["rank"])
    world = states[0]["parallel"]["world_size"]
    if len(states) != world or [s["parallel"]["rank"] for s in states] != list(range(world)):
        raise ckpt.CheckpointError(f"consolidate: found {len(states)} of {world} ranks' checkpoints")
    # Not supported: ZeRO-1 optimizer state is a per-replica range of the flattened parameters, not
    # per-tensor moments sharded like the weights (such checkpoints resume in their own layout only).
    if any(s["parallel"].get("zero1") for s in states):
        raise ckpt.CheckpointError(f"consolidate: {states[0]['parallel']['layout']} was trained with "
                                   "parallel.zero1=true; consolidating a ZeRO-1 checkpoint is not supported "
                                   "(resume it in the same layout with parallel.zero1=true)")
    # ---- model
    holders: dict[str, list] = {}
    for s in states:
        for k, t in s["model"].items():
            holders.setdefault(k, []).append((s["parallel"], t))
    order = []
    for s in states:  # pipeline stages in rank order = the plain model's order
        order += [k for k in s["model"] if k not in order]
    model = {k: _merge(k, [(m["coords"], t) for m, t in holders[k]], _spec(holders[k][0][0], k)) for k in order}
    # ---- optimizer (AdamW moments are sharded like their parameters)
    names = []
    for s in states:
        names += [n for n in s["parallel"]["param_names"] if n not in names]
    opt_order = _optimizer_order(names, {k: v.shape for k, v in model.items()})
    moments: dict[str, dict] = {}
    for n in opt_order:
        pieces = {}
        for s in states:
            local_order = _optimizer_order(s["parallel"]["param_names"], {k: v.shape for k, v in s["model"].items()})
            if n in local_order:
                st = s["optimizer"]["state"].get(local_order.index(n))
                if st is not None:
                    pieces.setdefault("_coords", []).append(s["parallel"])
                    for key, val in st.items():
                        pieces.setdefault(key, []).append(val)
        if not pieces:
            continue
        spec = _spec(pieces["_coords"][0], n)
        moments[n] = {key: (_merge(f"{n}.{key}", list(zip([c["coords"] for c in pieces["_coords"]], vals)), spec)
                            if vals[0].dim() > 0 else vals[0])
                      for key, vals in pieces.items() if key != "_coords"}
    num_decay = sum(1 for n in opt_order if model[n].dim() >= 2)
    weight_decay = states[0].get("config", {}).get("train", {}).get("weight_decay", 0.0)
    groups = _groups(states[0]["optimizer"]["param_groups"][0], num_decay, len(opt_order), weight_decay)
    optimizer = {"state": {i: moments[n] for i, n in enumerate(opt_order) if n in moments}, "param_groups": groups}
    out = {k: v for k, v in states[0].items() if k not in ("model", "optimizer", "parallel")}
    out.update(model=model, optimizer=optimizer, param_names=opt_order,
               consolidated_from=states[0]["parallel"]["layout"])
    return out


def shard_state_for(model, state, full: dict, param_names: list[str]) -> tuple[dict, dict]:
    """A consolidated state -> (this rank's model state dict, its optimizer state dict), by slicing
    every tensor (and AdamW moment) as this rank's module holds it."""
    load_full_state_dict(model, full["model"], state)
    local_model = model.state_dict()
    specs = named_shard_specs(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    local_order = _optimizer_order(param_names, shapes)
    full_order = full.get("param_names") or []
    full_state = full["optimizer"]["state"]
    opt_state = {}
    for i, n in enumerate(local_order):
        if n not in full_order or full_order.index(n) not in full_state:
            continue
        spec = specs.get(n, REPLICATED)
        entry = {}
        for key, val in full_state[full_order.index(n)].items():
            if val.dim() > 0:
                if spec.ep_dim is not None:
                    k = shapes[n][spec.ep_dim]
                    val = val.narrow(spec.ep_dim, state.ep_rank * k, k)
                if spec.tp_dim is not None:
                    val = take_shard(val, spec.tp_dim, state.tp_size, state.tp_rank)
            entry[key] = val.clone()
        opt_state[i] = entry
    num_decay = sum(1 for n in local_order if len(shapes[n]) >= 2)
    weight_decay = full.get("config", {}).get("train", {}).get("weight_decay", 0.0)
    groups = _groups(full["optimizer"]["param_groups"][0], num_decay, len(local_order), weight_decay)
    return local_model, {"state": opt_state, "param_groups": groups}


def find_layout_checkpoint(save_dir, layout: str | None = None, name: str | None = None) -> tuple[str, str]:
    """(layout, checkpoint name) to consolidate: the given ones, else the newest complete checkpoint
    that every rank of its layout has."""
    root = Path(save_dir) / "ranks"
    if layout and not (root / layout).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ckpt.CheckpointError(f"{save_dir}: no per-rank checkpoints of layout {layout} (layouts found: "
                                   f"{', '.join(found) or 'none'})")
    layouts = [layout] if layout else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    best = None
    for lay in layouts:
        rank_dirs = sorted(p for p in (root / lay).iterdir() if p.is_dir())
        common = None
        for rd in rank_dirs:
            found = {p.name: json.loads((p / "meta.json").read_text()).get("global_step", -1)
                     for p in ckpt.list_checkpoints(rd)}
            common = found if common is None else {k: v for k, v in common.items() if k in found}
        for ck, step in (common or {}).items():
            if (name is None or ck == name) and (best is None or step > best[2]):
                best = (lay, ck, step)
    if best is None:
        raise ckpt.CheckpointError(f"{save_dir}: no per-rank checkpoint complete on every rank"
                                   + (f" for layout {layout}" if layout else "") + (f" named {name}" if name else ""))
    return best[0], best[1]


def consolidate(save_dir, layout: str | None = None, name: str | None = None, keep: int = 100) -> Path:
    """Merge the per-rank checkpoint into RUN_DIR/checkpoints/<name> (single-process format)."""
    layout, name = find_layout_checkpoint(save_dir, layout, name)
    rank_dirs = sorted(p for p in (Path(save_dir) / "ranks" / layout).iterdir() if p.is_dir())
    states = [ckpt.load_checkpoint(ckpt.checkpoint_root(rd) / name) for rd in rank_dirs]
    merged = consolidate_states(states)
    meta = json.loads((ckpt.checkpoint_root(rank_dirs[0]) / name / "meta.json").read_text())
    meta.pop("complete", None)
    meta["consolidated_from"] = layout
    return ckpt.save_checkpoint(save_dir, name, merged, meta, keep)


def _layout_arg(text: str) -> str:
    """argparse type of --layout: a name as `layout_name` writes it."""
    if not re.fullmatch(r"tp[1-9]\d*-pp[1-9]\d*-ep[1-9]\d*-dp[1-9]\d*", text):
        raise argparse.ArgumentTypeError(f"expected a layout name such as tp2-pp1-ep2-dp2, got {text!r}")
    return text


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m megatron_evomoe.parallel.reshard",
                            description="Consolidate a per-rank (parallel) checkpoint into one file "
                                        "that a one-process run or any other layout resumes from.")
    parser.add_argument("run_dir", help="the run's train.save_dir")
    parser.add_argument("--layout", type=_layout_arg,
                        help="e.g. tp2-pp1-ep2-dp2 (default: the newest complete checkpoint's)")
    parser.add_argument("--name", help="checkpoint name (default: the newest complete one)")
    args = parser.parse_args(argv)
    try:
        path = consolidate(args.run_dir, args.layout, args.name)
    except USER_ERRORS as e:  # no such run or layout, an incomplete or unreadable per-rank checkpoint
        return user_error(e)
    print(f"consolidated checkpoint: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

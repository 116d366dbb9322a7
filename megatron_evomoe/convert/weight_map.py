"""How each of our tensors is read from (and written to) Hugging Face tensors.

A weight map is `{our state-dict name: Src}`; `read_mapped` reads a checkpoint through it
(checking every HF tensor's shape) and `write_mapped` writes our tensors back through the same
map, so an export re-imports exactly. A `Src` may name a second layout of the same tensor
(`alt`, e.g. transformers 5's fused experts), read when the first is absent; a tensor in neither
is an error naming both. The family-specific maps are built in hf_llm.py and hf_qwen.py
(decoders) and hf_vision.py (vision towers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .errors import ConversionError
from .hf_checkpoint import HFCheckpoint


@dataclass(frozen=True)
class Src:
    """Where one of our tensors comes from: HF tensor names and how they combine.

    op: ``copy`` (one tensor, same layout) | ``stack_t`` (one [out, in] matrix per
    expert, transposed and stacked into [E, in, out]) | ``fused_t`` (all experts in one
    [E, out, in] tensor, transposed to [E, in, out]) | ``cat0`` (equal parts concatenated
    along dim 0, e.g. q, k, v into a fused qkv) | ``zeros`` (no source: the HF model has no
    such tensor, ours must be zero, e.g. CLIP's bias-free patch embedding).
    part: (index, count): ours is part `index` of `count` equal slices of the HF tensor along
    its output dim (dim 0 for ``copy``, e.g. q of Qwen-1's fused c_attn; dim 1 for ``fused_t``,
    e.g. the gate half of a fused gate_up_proj).
    alt: the same tensor in another checkpoint layout (e.g. transformers-5 fused experts), read
    when the first of `names` is absent; `alt_label` names that layout in error messages.
    Export writes the primary layout.
    """
    names: Tuple[str, ...]
    op: str = "copy"
    part: Tuple[int, int] = (0, 1)
    alt: Optional["Src"] = None
    alt_label: str = ""


def _resolve(ck: HFCheckpoint, src: Src, our_name: str) -> Src:
    """The layout `ck` holds `src` in; a missing tensor names every layout looked for."""
    if src.alt is None or not src.names or ck.has(src.names[0]):
        return src
    if ck.has(src.alt.names[0]):
        return src.alt
    raise ConversionError(f"{ck.dir}: tensor {src.names[0]!r} not found, nor {src.alt.names[0]!r} "
                          f"({src.alt_label or 'the other layout'}), in {', '.join(ck.files)} (for our {our_name})")


def _hf_shape(src: Src, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The HF tensor's shape for our `shape` (a part of it is `count` times as wide)."""
    count = src.part[1]
    if src.op == "fused_t":  # ours [E, in, out] <- HF [E, out * count, in]
        return (shape[0], shape[2] * count, shape[1])
    return (shape[0] * count,) + shape[1:]


def _slice(t: torch.Tensor, part: Tuple[int, int], dim: int) -> torch.Tensor:
    index, count = part
    return t.chunk(count, dim=dim)[index] if count > 1 else t


def read_mapped(ck: HFCheckpoint, wmap: Dict[str, Src], expected: Dict[str, Tuple[int, ...]],
                why: str = "") -> Dict[str, torch.Tensor]:
    """Read every mapped tensor, checking each HF tensor's shape against what `expected` implies."""
    out = {}
    for our_name, src in wmap.items():
        shape = tuple(expected[our_name])
        src = _resolve(ck, src, our_name)
        if src.op == "copy":
            out[our_name] = _slice(ck.get(src.names[0], _hf_shape(src, shape), why), src.part, 0).contiguous()
        elif src.op == "fused_t":
            fused = ck.get(src.names[0], _hf_shape(src, shape), why)
            out[our_name] = _slice(fused, src.part, 1).transpose(1, 2).contiguous()
        elif src.op == "stack_t":
            per = (shape[2], shape[1])  # [out, in] of one expert
            out[our_name] = torch.stack([ck.get(n, per, why).t() for n in src.names]).contiguous()
        elif src.op == "cat0":
            part = (shape[0] // len(src.names),) + shape[1:]
            out[our_name] = torch.cat([ck.get(n, part, why) for n in src.names])
        elif src.op == "zeros":
            out[our_name] = torch.zeros(shape)
        else:  # pragma: no cover
            raise AssertionError(src.op)
    return out


def write_mapped(state: Dict[str, torch.Tensor], wmap: Dict[str, Src]) -> Dict[str, torch.Tensor]:
    """Inverse of `read_mapped`: our tensors -> HF-named tensors (tied ones written once, parts joined)."""
    out: Dict[str, torch.Tensor] = {}
    parts: Dict[str, Dict[int, torch.Tensor]] = {}  # HF name -> {part index: its slice}
    for our_name, src in wmap.items():
        t = state[our_name].detach()
        if src.part[1] > 1:  # one slice of a fused HF tensor: joined once every part is there
            parts.setdefault(src.names[0], {})[src.part[0]] = t.transpose(1, 2) if src.op == "fused_t" else t
            if len(parts[src.names[0]]) == src.part[1]:
                pieces = parts.pop(src.names[0])
                out[src.names[0]] = torch.cat([pieces[i] for i in range(src.part[1])],
                                              dim=1 if src.op == "fused_t" else 0).contiguous()
        elif src.op == "copy":
            if src.names[0] in out:  # tied lm_head -> embed_tokens: already written
                continue
            out[src.names[0]] = t.contiguous()
        elif src.op == "fused_t":
            out[src.names[0]] = t.transpose(1, 2).contiguous()
        elif src.op == "stack_t":
            for e, n in enumerate(src.names):
                out[n] = t[e].t().contiguous()
        elif src.op == "cat0":
            for n, part in zip(src.names, t.chunk(len(src.names))):
                out[n] = part.contiguous()
        elif src.op == "zeros":
            if bool(t.ne(0).any()):
                raise ConversionError(f"{our_name} is non-zero, but the target format has no such tensor "
                                      "(export would change the model)")
        else:  # pragma: no cover
            raise AssertionError(src.op)
    assert not parts, f"fused tensors with missing parts: {sorted(parts)}"  # a weight-map bug
    return out

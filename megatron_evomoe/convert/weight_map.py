"""How each of our tensors is read from (and written to) Hugging Face tensors.

A weight map is `{our state-dict name: Src}`; `read_mapped` reads a checkpoint through it
(checking every HF tensor's shape) and `write_mapped` writes our tensors back through the same
map, so an export re-imports exactly. The family-specific maps are built in hf_llm.py
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
    expert, transposed and stacked into [E, in, out]) | ``cat0`` (equal parts concatenated
    along dim 0, e.g. q, k, v into a fused qkv) | ``zeros`` (no source: the HF model has no
    such tensor, ours must be zero, e.g. CLIP's bias-free patch embedding).
    """
    names: Tuple[str, ...]
    op: str = "copy"


def _fused_experts(ck: HFCheckpoint, src: Src, our_name: str, expected) -> Optional[torch.Tensor]:
    """Transformers >= 5 in-memory layout (experts.gate_up_proj [E, 2F, C], experts.down_proj [E, C, F])."""
    block = src.names[0].split("experts.")[0]
    if block.endswith("block_sparse_moe."):  # v5 renames Mixtral's block to mlp
        block = block[: -len("block_sparse_moe.")] + "mlp."
    E, a, b = expected
    if our_name.endswith("w_down"):
        name = block + "experts.down_proj"
        if not ck.has(name):
            return None
        return ck.get(name, (E, b, a)).transpose(1, 2)
    name = block + "experts.gate_up_proj"
    if not ck.has(name):
        return None
    fused = ck.get(name, (E, 2 * b, a))
    half = fused[:, :b] if our_name.endswith("w_gate") else fused[:, b:]
    return half.transpose(1, 2)


def read_mapped(ck: HFCheckpoint, wmap: Dict[str, Src], expected: Dict[str, Tuple[int, ...]],
                why: str = "") -> Dict[str, torch.Tensor]:
    """Read every mapped tensor, checking each HF tensor's shape against what `expected` implies."""
    out = {}
    for our_name, src in wmap.items():
        shape = tuple(expected[our_name])
        if src.op == "copy":
            out[our_name] = ck.get(src.names[0], shape, why)
        elif src.op == "stack_t":
            if not ck.has(src.names[0]):
                fused = _fused_experts(ck, src, our_name, shape)
                if fused is not None:
                    out[our_name] = fused.contiguous()
                    continue
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
    """Inverse of `read_mapped`: our tensors -> HF-named tensors (tied ones written once)."""
    out: Dict[str, torch.Tensor] = {}
    for our_name, src in wmap.items():
        t = state[our_name]
        if src.op == "copy":
            if src.names[0] in out:  # tied lm_head -> embed_tokens: already written
                continue
            out[src.names[0]] = t.detach().contiguous()
        elif src.op == "stack_t":
            for e, n in enumerate(src.names):
                out[n] = t[e].detach().t().contiguous()
        elif src.op == "cat0":
            for n, part in zip(src.names, t.detach().chunk(len(src.names))):
                out[n] = part.contiguous()
        elif src.op == "zeros":
            if bool(t.detach().ne(0).any()):
                raise ConversionError(f"{our_name} is non-zero, but the target format has no such tensor "
                                      "(export would change the model)")
        else:  # pragma: no cover
            raise AssertionError(src.op)
    return out

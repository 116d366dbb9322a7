"""Greedy and sampled decoding with a KV cache, for evaluation and the generate CLI.

One decoding loop (`decode`) for every layout. What one step computes is a seam: a step function
`step(model, ids, images, positions, caches, choose) -> next ids [B]` runs the model on the new ids
and applies `choose` to the last position's logits. One process uses `one_process_step`; under
pipeline parallelism `parallel/pipeline_generation.py::PipelineDecodeStep` runs the same step split
over the stages (each with the KV caches of its own layers) and gives every stage the same ids, so
every rank runs this loop in step and ends it at the same token.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

from .model.absent import is_absent


class KVCache:
    """Preallocated keys/values of one attention layer: [B, n_kv, S_max, hd]."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        S = k.shape[2]
        if self.pos + S > self.k.shape[2]:
            raise ValueError(f"sequence of {self.pos + S} tokens exceeds model.max_seq_len={self.k.shape[2]}")
        self.k[:, :, self.pos:self.pos + S] = k
        self.v[:, :, self.pos:self.pos + S] = v
        self.pos += S
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


def new_caches(llm, batch: int) -> list[Optional[KVCache]]:
    """One cache per decoder layer this process holds (None for a layer of another pipeline stage),
    in the layer's own dtype and device, with its local KV heads (TP-aware)."""
    cfg = llm.cfg
    hd = cfg.hidden_size // cfg.num_heads
    caches = []
    for layer in llm.layers:
        if is_absent(layer):
            caches.append(None)
            continue
        w = layer.attn.wk.weight
        caches.append(KVCache(batch, w.shape[0] // hd, cfg.max_seq_len, hd, w.dtype, w.device))
    return caches


def pick_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] fp32 -> next ids [B]: argmax at temperature 0, else a sample (nucleus `top_p`)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_ids(model, logits: torch.Tensor, choose: Callable) -> torch.Tensor:
    """logits [B, T, V] -> the next ids [B] by `choose` on the last position (fp32); image slots come
    only from images, so the image token is never chosen. Runs where the logits are (the last stage)."""
    last = logits[:, -1].float()
    last[:, model.image_token_id] = float("-inf")
    return choose(last)


def one_process_step(model, ids: torch.Tensor, images, positions: torch.Tensor, caches, choose) -> torch.Tensor:
    """ids [B, T] (images for the prompt step, else None) at `positions` [T] -> next ids [B]."""
    h, modality = model.embed(ids, images)
    logits, _ = model.llm(h, modality, positions, caches)
    return next_ids(model, logits, choose)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, images, max_new_tokens: int, eos_id: int, choose: Callable,
           ends: Optional[Callable[[list], bool]] = None, step: Optional[Callable] = None) -> list[list[int]]:
    """prompt: [B, P] (equal lengths) -> each row's new ids, up to (excluding) its first EOS.

    `choose(logits [B, V]) -> ids [B]` picks the next ids; `ends(row ids) -> bool` may end a row early
    (e.g. a stop string); `step` is the step function (default: `one_process_step`). Rows that ended
    are fed EOS until the whole batch has ended. Every rank running a pipelined step sees the same ids,
    so the loop's decisions (and its number of steps) agree on every rank.
    """
    step = step or one_process_step
    B, P = prompt.shape
    caches = new_caches(model.llm, B)
    nxt = step(model, prompt, images, torch.arange(P, device=prompt.device), caches, choose)  # [B]
    rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max_new_tokens):
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok == eos_id:
                done[b] = True
                continue
            rows[b].append(tok)
            done[b] = ends is not None and ends(rows[b])
        if all(done) or t == max_new_tokens - 1:
            break
        feed = torch.where(torch.tensor(done, device=nxt.device), torch.full_like(nxt, eos_id), nxt)
        nxt = step(model, feed[:, None], None, torch.tensor([P + t], device=prompt.device), caches, choose)
    return rows


@torch.no_grad()
def generate(model, prompts: Sequence[torch.Tensor], images: torch.Tensor | None, max_new_tokens: int,
             eos_id: int, pad_id: int = 0, device=None, temperature: float = 0.0,
             generator: torch.Generator | None = None, step: Optional[Callable] = None) -> list[list[int]]:
    """Decode each prompt (1-D id tensors; image i belongs to prompt i when given).

    Prompts are batched by length, so no attention padding is needed; the
    answer of each prompt stops at (and excludes) its first EOS.
    """
    device = device or next(model.parameters()).device
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    results: list[list[int]] = [[] for _ in prompts]
    choose = lambda logits: pick_next(logits, temperature, 1.0, generator)  # noqa: E731
    for idx in groups.values():
        batch = torch.stack([prompts[i] for i in idx]).to(device)
        imgs = images[idx].to(device) if images is not None else None
        for row, i in zip(decode(model, batch, imgs, max_new_tokens, eos_id, choose, step=step), idx):
            results[i] = row
    return results


def greedy_generate(model, prompts, images, max_new_tokens, eos_id, pad_id=0, device=None, step=None):
    return generate(model, prompts, images, max_new_tokens, eos_id, pad_id, device, temperature=0.0, step=step)

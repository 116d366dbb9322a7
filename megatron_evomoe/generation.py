"""Greedy and sampled decoding with a KV cache, for evaluation and the generate CLI."""
from __future__ import annotations

from collections import defaultdict

import torch


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


def _new_caches(llm, batch: int, dtype, device) -> list[KVCache]:
    cfg = llm.cfg
    hd = cfg.hidden_size // cfg.num_heads
    kv = [layer.attn.wk.weight.shape[0] // hd for layer in llm.layers]  # local heads (TP-aware)
    return [KVCache(batch, n, cfg.max_seq_len, hd, dtype, device) for n in kv]


@torch.no_grad()
def _generate_same_length(model, prompt: torch.Tensor, images, max_new_tokens: int, eos_id: int,
                          temperature: float, generator) -> torch.Tensor:
    """prompt: [B, P] (equal lengths) -> new tokens [B, <= max_new_tokens]."""
    B, P = prompt.shape
    h, modality = model.embed(prompt, images)
    caches = _new_caches(model.llm, B, h.dtype, h.device)
    logits, _ = model.llm(h, modality, torch.arange(P, device=h.device), caches)
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=h.device)
    for step in range(max_new_tokens):
        last = logits[:, -1].float()
        last[:, model.image_token_id] = float("-inf")  # image slots come only from images
        nxt = _pick(last, temperature, generator)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        h, modality = model.embed(nxt[:, None], None)
        logits, _ = model.llm(h, modality, torch.tensor([P + step], device=h.device), caches)
    return torch.stack(out, 1)


def _pick(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[torch.Tensor], images: torch.Tensor | None, max_new_tokens: int,
             eos_id: int, pad_id: int = 0, device=None, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Decode each prompt (1-D id tensors; image i belongs to prompt i when given).

    Prompts are batched by length, so no attention padding is needed; the
    answer of each prompt stops at (and excludes) its first EOS.
    """
    device = device or next(model.parameters()).device
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    results: list[list[int]] = [[] for _ in prompts]
    for idx in groups.values():
        batch = torch.stack([prompts[i] for i in idx]).to(device)
        imgs = images[idx].to(device) if images is not None else None
        new = _generate_same_length(model, batch, imgs, max_new_tokens, eos_id, temperature, generator)
        for row, i in zip(new.tolist(), idx):
            results[i] = row[:row.index(eos_id)] if eos_id in row else row
    return results


def greedy_generate(model, prompts, images, max_new_tokens, eos_id, pad_id=0, device=None):
    return generate(model, prompts, images, max_new_tokens, eos_id, pad_id, device, temperature=0.0)

"""Routing and expert-diversity analytics (pure functions on tensors).

Per layer and modality: expert load, its coefficient of variation, routing
entropy, the Jensen-Shannon divergence between image and text routing; expert
homogeneity as the mean pairwise cosine similarity of expert *outputs* on the
same tokens and as linear CKA. Weight cosine is offered only beside those:
permuting hidden units changes it without changing the function.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..ops.permute import expert_counts


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    """counts: [E] -> fraction of assignments per expert [E] (zeros if empty)."""
    counts = counts.double()
    total = counts.sum()
    return counts / total if total > 0 else torch.zeros_like(counts)


def load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation of the per-expert load (0 = perfectly balanced)."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio (DeepSeek-V3's balance measure): (max_e load_e - mean load) / mean load; 0 = balanced,
    E - 1 = every assignment on one expert."""
    c = counts.double()
    mean = c.mean()
    return float((c.max() - mean) / mean) if mean > 0 else 0.0


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim` (0 log 0 = 0)."""
    p = p.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)


def routing_entropy(probs: torch.Tensor) -> float:
    """Mean per-token entropy of the router distribution probs: [T, E]."""
    return float(entropy(probs).mean()) if probs.shape[0] else 0.0


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint support)."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = 0.5 * (p + q)
    return float((entropy(m) - 0.5 * entropy(p) - 0.5 * entropy(q)) / math.log(2))


def pairwise_output_cosine(outputs: torch.Tensor) -> float:
    """outputs: [E, T, C] (every expert applied to the same T tokens) -> mean over
    expert pairs of the mean per-token cosine similarity."""
    sims = [torch.nn.functional.cosine_similarity(outputs[i].double(), outputs[j].double(), dim=-1).mean()
            for i, j in itertools.combinations(range(outputs.shape[0]), 2)]
    return float(torch.stack(sims).mean()) if sims else 1.0


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two representations x: [T, C1], y: [T, C2]."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(num / den) if den > 0 else 0.0


def pairwise_cka(outputs: torch.Tensor) -> float:
    """Mean linear CKA over expert pairs; outputs: [E, T, C]."""
    vals = [linear_cka(outputs[i], outputs[j]) for i, j in itertools.combinations(range(outputs.shape[0]), 2)]
    return sum(vals) / len(vals) if vals else 1.0


def pairwise_weight_cosine(weights: torch.Tensor) -> float:
    """weights: [E, ...] -> mean pairwise cosine of the flattened expert weights."""
    flat = weights.reshape(weights.shape[0], -1).double()
    sims = [torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0)
            for i, j in itertools.combinations(range(flat.shape[0]), 2)]
    return float(torch.stack(sims).mean()) if sims else 1.0


class RoutingCounter:
    """Accumulates top-k assignments per (layer, modality, expert) across forwards."""

    def __init__(self, num_modalities: int = 2):
        self.num_modalities = num_modalities
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [M, E]

    def add(self, layer: int, topk_idx: torch.Tensor, modality: torch.Tensor, num_experts: int) -> None:
        # one flat histogram over (modality, expert) pairs: [M * E], kept on the device (the forward
        # never waits for it, and it traces into a compiled MoE layer); read when a log line is written
        flat = modality.reshape(-1, 1) * num_experts + topk_idx  # [T, K]
        c = expert_counts(flat, self.num_modalities * num_experts).view(self.num_modalities, -1)
        self.counts[layer] = self.counts.get(layer, 0) + c

    def reset(self) -> None:
        self.counts.clear()

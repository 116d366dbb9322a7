"""LLaVA-style assembly: vision encoder -> projector -> image embeddings spliced into the text.

The data pipeline pre-expands each `<image>` tag into `num_image_tokens` copies of
the image token id, so sequence shapes are static; here those positions are
overwritten with the projected patch features, and the same positions form the
per-token modality mask that every router reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .llm import DecoderLM
from .modality import IMAGE, TEXT
from .vision import VisionEncoder, build_projector

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    lm_loss_sum: torch.Tensor | None  # sum of token cross-entropies (fp32)
    num_tokens: torch.Tensor | None  # number of supervised tokens
    aux_loss: torch.Tensor  # weighted sum of MoE aux losses over layers (already coefficient-scaled)
    modality: torch.Tensor  # [B, S]


class MultimodalLM(nn.Module):
    def __init__(self, cfg, image_token_id: int):
        super().__init__()
        self.image_token_id = image_token_id
        self.vision = VisionEncoder(cfg.vision) if cfg.vision.enabled else None
        self.projector = (build_projector(cfg.vision.projector, cfg.vision.hidden_size, cfg.model.hidden_size)
                          if cfg.vision.enabled else None)
        self.llm = DecoderLM(cfg.model)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None):
        """-> (embeddings [B, S, C], modality [B, S])."""
        h = self.llm.embed(input_ids)
        is_image = input_ids == self.image_token_id
        modality = torch.where(is_image, IMAGE, TEXT)
        num_slots = int(is_image.sum())
        num_images = 0 if images is None else images.shape[0]
        if self.vision is None:
            if num_slots or num_images:
                raise ValueError("the batch has images but vision.enabled is false")
            return h, modality
        feats = self.image_features(images) if num_images else None  # [N, P, C]
        expected = 0 if feats is None else feats.shape[0] * feats.shape[1]
        if num_slots != expected:
            raise ValueError(f"batch has {num_slots} image-token positions but {num_images} images "
                             f"give {expected} image embeddings")
        if feats is not None:
            h = h.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(h.dtype))
        return h, modality

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(images))  # [N, P, C]

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        h, modality = self.embed(input_ids, images)
        logits, aux = self.llm(h, modality)
        loss_sum = num = None
        if labels is not None:
            loss_sum, num = causal_lm_loss_sum(logits, labels)
        return ModelOutput(logits, loss_sum, num, aux, modality)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor):
    """Sum (not mean) of next-token cross-entropies, and the token count.

    Returning the sum lets the trainer divide by the global number of
    supervised tokens, so the loss does not depend on how a global batch is
    split over micro-batches and data-parallel ranks.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()

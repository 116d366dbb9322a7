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

from .absent import is_absent
from .llm import DecoderLM
from .modality import IMAGE, TEXT
from .vision import VisionEncoder, build_projector

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V] (under TP with labels: this rank's vocabulary shard)
    lm_loss_sum: torch.Tensor | None  # sum of token cross-entropies (fp32)
    num_tokens: torch.Tensor | None  # number of supervised tokens
    aux_loss: torch.Tensor  # weighted sum of MoE aux losses over layers (already coefficient-scaled)
    modality: torch.Tensor  # [B, S]
    hidden: torch.Tensor | None = None  # [B, S(/tp), C]: output of a pipeline stage without the LM head


class MultimodalLM(nn.Module):
    """The one forward of the model, for one process and for every parallel layout.

    A pipeline stage is this model with the modules it does not own absent (model/absent.py):
    without the embedding it takes the previous stage's `hidden` instead of embedding the ids,
    without the LM head it returns its hidden states. Tensor and sequence parallelism are applied
    from outside (sharded layers and module hooks, parallel/tensor_parallel_plan.py); `loss_fn`
    is replaced there by the vocabulary-parallel loss.
    """

    def __init__(self, cfg, image_token_id: int):
        super().__init__()
        self.image_token_id = image_token_id
        self.vision = VisionEncoder(cfg.vision) if cfg.vision.enabled else None
        self.projector = (build_projector(cfg.vision.projector, cfg.vision.hidden_size, cfg.model.hidden_size)
                          if cfg.vision.enabled else None)
        self.llm = DecoderLM(cfg.model)
        # (logits, labels) -> (sum of token losses, supervised token count)
        self.loss_fn = causal_lm_loss_sum

    def modality(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S] modality ids: the image-token positions are image tokens."""
        return torch.where(input_ids == self.image_token_id, IMAGE, TEXT)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None):
        """-> (embeddings [B, S, C], modality [B, S])."""
        modality = self.modality(input_ids)
        return self._embed(input_ids, images, modality == IMAGE), modality

    def _embed(self, input_ids: torch.Tensor, images: torch.Tensor | None, is_image: torch.Tensor):
        h = self.llm.embed(input_ids)  # [B, S, C]
        num_images = 0 if images is None else images.shape[0]
        if self.vision is None:
            if num_images:
                raise ValueError("the batch has images but vision.enabled is false")
            _check_image_slots(is_image, 0, lambda n: "the batch has images but vision.enabled is false")
            return h
        feats = self.image_features(images) if num_images else None  # [N, P, C]
        expected = 0 if feats is None else feats.shape[0] * feats.shape[1]
        _check_image_slots(is_image, expected, lambda n: f"batch has {n} image-token positions but {num_images} "
                                                         f"images give {expected} image embeddings")
        if feats is None:
            return h
        return splice_rows(h, is_image, feats.reshape(-1, feats.shape[-1]).to(h.dtype))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(images))  # [N, P, C]

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, hidden: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> ModelOutput:
        """input_ids, labels: [B, S]; images: [N, 3, H, W]; hidden: [B, S(/tp), C], the input of a
        pipeline stage that does not hold the embedding (the previous stage's `ModelOutput.hidden`).
        positions, segment_ids: [B, S] for packed rows (data/packing.py): attention stays inside each
        segment and positions restart per sample; None = one sample per row. Every pipeline stage
        gets both (like the ids, they never travel between stages)."""
        if segment_ids is not None and positions is None:
            raise ValueError("packed rows need positions with their segment_ids (data/packing.py)")
        modality = self.modality(input_ids)  # every stage has the ids: the mask never travels
        if is_absent(self.llm.embed):
            assert hidden is not None, "a pipeline stage without the embedding needs the previous stage's output"
            h = hidden
        else:
            h = self._embed(input_ids, images, modality == IMAGE)
        if positions is None:  # from the ids, not h: h may be a sequence shard
            positions = torch.arange(input_ids.shape[1], device=h.device)
        out, aux = self.llm(h, modality, positions, segment_ids=segment_ids)
        if is_absent(self.llm.lm_head):
            return ModelOutput(None, None, None, aux, modality, hidden=out)
        loss_sum = num = None
        if labels is not None:
            loss_sum, num = self.loss_fn(out, labels)
        return ModelOutput(out, loss_sum, num, aux, modality)


def splice_rows(h: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [B, S, C] with its masked positions, in order, replaced by rows [N, C] (N = mask.sum()).

    masked_scatter's result with static shapes and no host read of the count: position i takes row
    cumsum(mask)[i] - 1, and a select keeps it only where the mask is set."""
    slot = (mask.reshape(-1).cumsum(0) - 1).clamp(0, rows.shape[0] - 1)  # [B*S]
    return torch.where(mask.unsqueeze(-1), rows[slot].view_as(h), h)


def _check_image_slots(is_image: torch.Tensor, expected: int, message) -> None:
    """The data must give one image embedding per image-token position: a ValueError on the CPU, an
    asynchronous device assert on CUDA (reading the count on the host would stall the stream).
    message(num_slots or "some") -> the error's text."""
    if is_image.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(is_image.sum() == expected, message("some"))
        return
    num_slots = int(is_image.sum())
    if num_slots != expected:
        raise ValueError(message(num_slots))


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

"""POPE-style evaluation on the held-out split at the end of each stage."""
from __future__ import annotations

import torch

from ..config import Config
from ..data.llava_dataset import PopeDataset
from ..eval.pope import parse_yes_no, pope_metrics
from ..generation import greedy_generate


@torch.no_grad()
def evaluate_pope(model, bundle, cfg: Config, device: torch.device, batch_size: int = 64) -> dict:
    """Greedy answers to the held-out yes/no questions -> accuracy, precision, recall, F1, yes-ratio."""
    data = PopeDataset(bundle.root / cfg.data.eval_split, bundle.root / "images", bundle.tokenizer,
                       cfg.vision.num_image_tokens, cfg.vision.image_size)
    n = min(len(data), cfg.data.num_eval_samples)
    was_training = model.training
    model.eval()
    preds, labels = [], []
    samples = [data[i] for i in range(n)]
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        outs = greedy_generate(model, [s.prompt_ids for s in chunk], torch.stack([s.image for s in chunk]),
                               max_new_tokens=3, eos_id=bundle.tokenizer.eos_id,
                               pad_id=bundle.tokenizer.pad_id, device=device)
        for s, ids in zip(chunk, outs):
            preds.append(parse_yes_no(bundle.tokenizer.decode(ids, skip_special_tokens=True)))
            labels.append(s.label)
    model.train(was_training)
    return {**pope_metrics(preds, labels), "num_questions": n}

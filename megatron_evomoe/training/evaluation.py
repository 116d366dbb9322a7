"""POPE-style evaluation on the held-out split at the end of each stage."""
from __future__ import annotations

import torch

from ..config import Config
from ..pope_metrics import parse_yes_no, pope_metrics
from ..generation import greedy_generate
from .data_setup import POPE_ANSWER_TOKENS, pope_dataset


@torch.no_grad()
def evaluate_pope(model, bundle, cfg: Config, device: torch.device, batch_size: int = 64,
                  blind_baseline: bool = True, stage_idx: int = -1, step=None, per_question: bool = False) -> dict:
    """Greedy answers to the held-out yes/no questions -> accuracy, precision, recall, F1, yes-ratio.

    With `blind_baseline`, the same questions are also asked with blank images
    (`blind_accuracy`, `blind_f1`): POPE's popular/adversarial negatives make
    category frequencies guessable from the text alone, so only the margin over
    the blind score shows that the model looks at the image.  The prompts use stage `stage_idx`'s
    conversation template (the stage just trained; negative: from the end). `step`: the decoding
    step function (`generation.decode`); under PP every rank of the pipeline calls this in step with
    `parallel.pipeline_generation.decode_step_for(state)` and gets the same scores. `per_question`: also
    `correct`, 1/0 per question in file order (what a bootstrap over questions resamples).
    """
    scores = _pope_scores(model, bundle, cfg, device, batch_size, blind=False, stage_idx=stage_idx, step=step)
    if not per_question:
        del scores["correct"]
    if blind_baseline:
        blind = _pope_scores(model, bundle, cfg, device, batch_size, blind=True, stage_idx=stage_idx, step=step)
        scores.update(blind_accuracy=blind["accuracy"], blind_f1=blind["f1"])
    return scores


def _pope_scores(model, bundle, cfg: Config, device: torch.device, batch_size: int, blind: bool,
                 stage_idx: int, step=None) -> dict:
    data = pope_dataset(bundle, cfg, stage_idx)
    n = min(len(data), cfg.data.num_eval_samples)
    was_training = model.training
    model.eval()
    preds, labels = [], []
    samples = [data[i] for i in range(n)]
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        images = torch.stack([s.image for s in chunk])
        if blind:  # the normalised mean colour: no content at all
            images = torch.zeros_like(images)
        outs = greedy_generate(model, [s.prompt_ids for s in chunk], images,
                               max_new_tokens=POPE_ANSWER_TOKENS, eos_id=bundle.tokenizer.eos_id,
                               pad_id=bundle.tokenizer.pad_id, device=device, step=step)
        for s, ids in zip(chunk, outs):
            # stripped as LLaVA's answer writer strips an output before eval_pope.py reads it
            preds.append(parse_yes_no(bundle.tokenizer.decode(ids, skip_special_tokens=True).strip()))
            labels.append(s.label)
    model.train(was_training)
    correct = [int(p == str(y).lower()) for p, y in zip(preds, labels)]  # (labels: "yes"/"no")
    return {**pope_metrics(preds, labels), "num_questions": n, "correct": correct}

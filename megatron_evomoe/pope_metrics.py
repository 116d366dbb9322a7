"""POPE's answer rule and metrics, as the official POPE evaluation script computes them.

Shared by the scorer (eval/pope.py, which reads question and answer files) and the trainer's
stage-end evaluation (training/evaluation.py), so it sits below both.

- an answer is cut at its first "." (first sentence), commas are deleted, it is
  split on single spaces, and it counts as "no" when one of the words is exactly
  "No", "not" or "no"; anything else counts as "yes" ("NO" and "Nope" are "yes");
- "yes" is the positive class: precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2PR/(P+R), accuracy = (TP+TN)/N, yes-ratio = share of "yes" predictions.
Where the official script would divide by zero (no positive predictions, say)
the metric is 0.0 here.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

_NO_WORDS = ("No", "not", "no")


def parse_yes_no(answer: str) -> str:
    """Map a free-form answer to "yes"/"no" with the official POPE rule."""
    # Generation scripts strip outputs before writing answer files; do the same.
    first_sentence = answer.strip().split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(w in words for w in _NO_WORDS) else "yes"


def _as_yes(value: Union[str, bool, int], what: str, i: int) -> bool:
    """True for a "yes" label/prediction; strings of predictions go through `parse_yes_no`."""
    if isinstance(value, str):
        if what == "label":
            if value.lower() not in ("yes", "no"):
                raise ValueError(f"pope_metrics: label {i} is {value!r}, expected 'yes' or 'no'")
            return value.lower() == "yes"
        return parse_yes_no(value) == "yes"
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"pope_metrics: {what} {i} is {value!r}, expected a string or 0/1/bool")


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def pope_metrics(
    preds: Sequence[Union[str, bool, int]], labels: Sequence[Union[str, bool, int]]
) -> Dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no predictions.

    `preds`: raw answers (parsed with `parse_yes_no`) or booleans/0-1 (1 = yes).
    `labels`: "yes"/"no" or booleans/0-1 (1 = yes).
    Returns those five metrics plus the counts ``tp, fp, tn, fn, num_questions``.
    """
    if len(preds) != len(labels):
        raise ValueError(f"pope_metrics: {len(preds)} predictions but {len(labels)} labels")
    if not preds:
        raise ValueError("pope_metrics: no predictions to score")
    tp = fp = tn = fn = 0
    for i, (p, l) in enumerate(zip(preds, labels)):
        pred_yes, label_yes = _as_yes(p, "prediction", i), _as_yes(l, "label", i)
        tp += pred_yes and label_yes
        fp += pred_yes and not label_yes
        tn += (not pred_yes) and (not label_yes)
        fn += (not pred_yes) and label_yes
    n = tp + fp + tn + fn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (tp + fp) / n,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "num_questions": n,
    }

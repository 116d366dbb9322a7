"""POPE's answer rule and metrics, as LLaVA's ``llava/eval/eval_pope.py`` computes them.

Shared by the scorer (eval/pope.py, which reads question, annotation and answer files) and the
trainer's stage-end evaluation (training/evaluation.py), so it sits below both.

The answer rule, character for character (the answer is NOT stripped: LLaVA's answer writer strips
model outputs before they reach the file, the scorer itself does not):
- when the answer holds a ".", only the text before the first "." is kept;
- commas are deleted and the rest is split on single spaces (so a tab or a newline stays inside
  its word: "No\\t" and "No\\nYes" are the words "No\\t" and "No\\nYes", neither of them "No");
- it is "no" when one of the words is exactly "No", "not" or "no", else "yes"
  ("NO", "Nope" and "No\\n" are "yes"; " No" is "no": its words are "" and "No").
Metrics, "yes" the positive class: precision = TP/(TP+FP), recall = TP/(TP+FN),
F1 = 2PR/(P+R), accuracy = (TP+TN)/N, yes-ratio = share of "yes" predictions.
Where the official script divides by zero and stops (no "yes" prediction: TP+FP = 0; no "yes"
label: TP+FN = 0; TP = 0 otherwise: P+R = 0) the metric is 0.0 here and `undefined_metrics` names it.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Union

_NO_WORDS = ("No", "not", "no")


def parse_yes_no(answer: str) -> str:
    """Map an answer, as written in the answers file, to "yes"/"no" with eval_pope.py's rule."""
    first_sentence = answer.split(".")[0]
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


def undefined_metrics(metrics: Mapping[str, float]) -> List[str]:
    """The metrics of a `pope_metrics` result that divide by zero (where eval_pope.py stops with
    ZeroDivisionError, at the first of them) and are reported as 0.0."""
    tp, fp, fn = metrics["tp"], metrics["fp"], metrics["fn"]
    undefined = [name for name, den in (("precision", tp + fp), ("recall", tp + fn)) if den == 0]
    if tp == 0:  # P + R = 0 whether or not P and R themselves are defined
        undefined.append("f1")
    return undefined

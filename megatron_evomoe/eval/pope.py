"""POPE: object-hallucination probing with yes/no questions ("Is there a <object> in the image?").

Question file: JSON lines ``{"question_id", "image", "text", "label": "yes"|"no"}``
(optionally ``"category"``: random / popular / adversarial), images at
``<image_root>/<image>``.

Scoring follows the official POPE evaluation script:
- an answer is cut at its first "." (first sentence), commas are deleted, it is
  split on single spaces, and it counts as "no" when one of the words is exactly
  "No", "not" or "no"; anything else counts as "yes" ("NO" and "Nope" are "yes");
- "yes" is the positive class: precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2PR/(P+R), accuracy = (TP+TN)/N, yes-ratio = share of "yes" predictions.
Where the official script would divide by zero (no positive predictions, say)
the metric is 0.0 here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

NAME = "pope"
_NO_WORDS = ("No", "not", "no")
_METRIC_ORDER = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass(frozen=True)
class PopeQuestion:
    question_id: Any
    image: str          # as written in the question file
    image_path: str     # resolved under image_root
    text: str
    prompt: str
    label: str          # "yes" | "no"
    category: Optional[str]


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


def _parse_line(path: str, lineno: int, line: str) -> Dict[str, Any]:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question_id", "image", "text", "label"):
        if key not in rec:
            raise ValueError(f"{where}: missing field '{key}'")
    for key in ("image", "text", "label"):
        if not isinstance(rec[key], str):
            raise ValueError(f"{where}: field '{key}' must be a string, got {rec[key]!r}")
    if rec["label"].lower() not in ("yes", "no"):
        raise ValueError(f"{where}: field 'label' is {rec['label']!r}, expected 'yes' or 'no'")
    return rec


def load_questions(
    question_file: str, image_root: str, limit: Optional[int] = None, prompt_suffix: str = ""
) -> List[PopeQuestion]:
    """Parse and check the question file (every line), keep the first `limit`, check their images."""
    questions: List[PopeQuestion] = []
    seen = set()
    with open(question_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rec = _parse_line(question_file, lineno, line)
            qid = rec["question_id"]
            if str(qid) in seen:
                raise ValueError(f"{question_file}:{lineno}: duplicate question_id {qid!r}")
            seen.add(str(qid))
            questions.append(PopeQuestion(
                question_id=qid, image=rec["image"],
                image_path=os.path.join(image_root, rec["image"]),
                text=rec["text"], prompt=rec["text"] + prompt_suffix,
                label=rec["label"].lower(), category=rec.get("category"),
            ))
    if limit is not None:
        questions = questions[:limit]
    for q in questions:
        if not os.path.isfile(q.image_path):
            raise ValueError(
                f"POPE {question_file}: question {q.question_id!r}: image not found: {q.image_path}")
    return questions


def score(questions: Sequence[PopeQuestion], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by ``str(question_id)``) against the labels."""
    records, by_category = [], {}
    for q in questions:
        answer = responses[str(q.question_id)]
        pred = parse_yes_no(answer)
        records.append({
            "question_id": q.question_id, "image": q.image, "category": q.category,
            "prompt": q.prompt, "label": q.label, "answer": answer, "pred": pred,
            "correct": pred == q.label,
        })
        if q.category is not None:
            by_category.setdefault(q.category, []).append((answer, q.label))
    metrics: Dict[str, Any] = pope_metrics([r["answer"] for r in records],
                                           [r["label"] for r in records])
    if by_category:
        metrics["by_category"] = {
            cat: pope_metrics([a for a, _ in pairs], [l for _, l in pairs])
            for cat, pairs in sorted(by_category.items())
        }
    return {"benchmark": NAME, "metrics": metrics, "questions": records}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    rows = [(k, metrics[k]) for k in _METRIC_ORDER]
    rows += [(k, metrics[k]) for k in ("tp", "fp", "tn", "fn", "num_questions")]
    for cat, m in metrics.get("by_category", {}).items():
        rows += [(f"{cat}/{k}", m[k]) for k in _METRIC_ORDER]
    return rows

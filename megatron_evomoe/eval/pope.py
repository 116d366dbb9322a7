"""POPE: object-hallucination probing with yes/no questions ("Is there a <object> in the image?").

Question file: JSON lines ``{"question_id", "image", "text", "label": "yes"|"no"}``
(optionally ``"category"``: random / popular / adversarial), images at
``<image_root>/<image>``.

Scoring follows the official POPE evaluation script: the answer rule and the metrics are in
`megatron_evomoe/pope_metrics.py` (shared with the trainer's stage-end evaluation).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..pope_metrics import parse_yes_no, pope_metrics
from .question_images import limited_with_images

NAME = "pope"
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
    return limited_with_images(questions, limit, lambda q: f"POPE {question_file}")


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

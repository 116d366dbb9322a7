"""POPE: object-hallucination probing with yes/no questions ("Is there a <object> in the image?").

Question files read:
- with labels: JSON lines ``{"question_id", "image", "text", "label": "yes"|"no"}``, optionally
  ``"category"`` (random / popular / adversarial), e.g. one of POPE's ``coco_pope_<split>.json``;
- LLaVA's ``llava_pope_test.jsonl`` (``{"question_id", "image", "text", "category"}``, no label)
  with ``annotations=DIR``, the COCO POPE annotation folder: the labels of split ``<c>`` are the
  lines of ``DIR/coco_pope_<c>.json``, in order, paired with the question file's ``<c>`` questions
  in order, as LLaVA's ``eval_pope.py`` pairs them (it zips the answers of a split with that
  file's lines); each pair must name the same image.
Images at ``<image_root>/<image>``.

Scoring follows eval_pope.py (the answer rule and the metrics are in `megatron_evomoe/pope_metrics.py`,
shared with the trainer's stage-end evaluation): each split is scored on its own, as eval_pope.py
loops over the annotation files; added here: the metrics of all questions pooled (top level) and,
with several splits, the mean of each metric over the splits (``mean_over_categories``; LLaVA-1.5's
tables report the mean F1).  Where eval_pope.py would stop with ZeroDivisionError the metric is
0.0 and ``metrics["notes"]`` says so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..pope_metrics import parse_yes_no, pope_metrics, undefined_metrics
from .question_images import limited_with_images

NAME = "pope"
_METRIC_ORDER = ("accuracy", "precision", "recall", "f1", "yes_ratio")
ANNOTATION_FILE = "coco_pope_{}.json"


@dataclass(frozen=True)
class PopeQuestion:
    question_id: Any
    image: str          # as written in the question file
    image_path: str     # resolved under image_root
    text: str
    prompt: str
    label: str          # "yes" | "no"
    category: Optional[str]


def _read_jsonl(path: str, required: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
    """[(where, record)] of a JSON-lines file whose records hold the string fields `required`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key in required:
                if key not in rec:
                    raise ValueError(f"{where}: missing field '{key}'")
                if key != "question_id" and not isinstance(rec[key], str):
                    raise ValueError(f"{where}: field '{key}' must be a string, got {rec[key]!r}")
            if "label" in rec and str(rec["label"]).lower() not in ("yes", "no"):
                raise ValueError(f"{where}: field 'label' is {rec['label']!r}, expected 'yes' or 'no'")
            out.append((where, rec))
    return out


def _annotation_labels(folder: str, rows: Sequence[Tuple[str, Dict[str, Any]]]) -> List[str]:
    """The label of each question row, from its split's annotation file (paired in order)."""
    if not os.path.isdir(folder):
        raise ValueError(f"POPE: annotation folder not found: {folder}")
    by_split: Dict[str, List[int]] = {}
    for i, (_, rec) in enumerate(rows):
        by_split.setdefault(rec["category"], []).append(i)
    labels: List[str] = [""] * len(rows)
    for split, indices in by_split.items():
        path = os.path.join(folder, ANNOTATION_FILE.format(split))
        if not os.path.isfile(path):
            raise ValueError(f"POPE: annotation file not found: {path} (split {split!r} of the questions)")
        annotations = _read_jsonl(path, ("image", "label"))
        if len(annotations) != len(indices):
            raise ValueError(f"{path}: {len(annotations)} labels for the {len(indices)} questions "
                             f"of split {split!r}")
        for i, (where, ann) in zip(indices, annotations):
            q_where, q = rows[i]
            if ann["image"] != q["image"]:
                raise ValueError(f"{where}: image {ann['image']!r}, but the question it labels "
                                 f"({q_where}) is on {q['image']!r}")
            labels[i] = ann["label"].lower()
    return labels


def load_questions(
    question_file: str, image_root: str, limit: Optional[int] = None, prompt_suffix: str = "",
    annotations: Optional[str] = None,
) -> List[PopeQuestion]:
    """Parse and check the question file (every line), keep the first `limit`, check their images."""
    required = ("question_id", "image", "text") + (("category",) if annotations else ("label",))
    rows = _read_jsonl(question_file, required)
    labels = (_annotation_labels(annotations, rows) if annotations
              else [rec["label"].lower() for _, rec in rows])
    questions: List[PopeQuestion] = []
    seen = set()
    for (where, rec), label in zip(rows, labels):
        qid = rec["question_id"]
        if str(qid) in seen:
            raise ValueError(f"{where}: duplicate question_id {qid!r}")
        seen.add(str(qid))
        questions.append(PopeQuestion(
            question_id=qid, image=rec["image"], image_path=os.path.join(image_root, rec["image"]),
            text=rec["text"], prompt=rec["text"] + prompt_suffix, label=label,
            category=rec.get("category"),
        ))
    return limited_with_images(questions, limit, lambda q: f"POPE {question_file}")


def _notes(scope: str, metrics: Mapping[str, Any]) -> List[str]:
    return [f"{scope}: {name} divides by zero (eval_pope.py stops with ZeroDivisionError); reported as 0.0"
            for name in undefined_metrics(metrics)]


def llava_question_id(q: PopeQuestion) -> Any:
    """The question's key in a LLaVA answers file (eval_pope.py: the question file's id)."""
    return q.question_id


def score(questions: Sequence[PopeQuestion], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by ``str(question_id)``) against the labels, per split and pooled."""
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
    notes = _notes("all questions", metrics)
    if by_category:
        metrics["by_category"] = {
            cat: pope_metrics([a for a, _ in pairs], [l for _, l in pairs])
            for cat, pairs in sorted(by_category.items())
        }
        for cat, m in metrics["by_category"].items():
            notes += _notes(f"split {cat}", m)
        if len(by_category) > 1:
            splits = metrics["by_category"].values()
            metrics["mean_over_categories"] = {
                k: sum(m[k] for m in splits) / len(splits) for k in _METRIC_ORDER}
    metrics["notes"] = notes
    return {"benchmark": NAME, "metrics": metrics, "questions": records}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    rows = [(k, metrics[k]) for k in _METRIC_ORDER]
    rows += [(k, metrics[k]) for k in ("tp", "fp", "tn", "fn", "num_questions")]
    for cat, m in metrics.get("by_category", {}).items():
        rows += [(f"{cat}/{k}", m[k]) for k in _METRIC_ORDER]
    for k, v in metrics.get("mean_over_categories", {}).items():
        rows.append((f"mean/{k}", v))
    return rows

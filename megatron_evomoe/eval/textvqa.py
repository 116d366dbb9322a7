"""TextVQA: open-ended questions about text in images, scored with VQA accuracy.

Data: the official JSON ``{"data": [{"question_id", "question", "image_id",
"answers": [10 strings], ...}]}``; image ``<image_root>/<image_id>.jpg``.
Entries without ``answers`` (the test split) are asked but not scored.

Scoring (the official TextVQA / EvalAI accuracy): the prediction and the 10
human answers are normalised with `vqa_normalize.normalize_answer`; then for
each of the 10 ways of leaving one human answer out, the prediction scores
min(1, matches among the other 9 / 3), and its accuracy is the mean of those 10.
With m of the 10 answers matching that is (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10:
m = 0, 1, 2, 3, >=4 -> 0, 0.3, 0.6, 0.9, 1.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .question_images import limited_with_images
from .vqa_normalize import normalize_answer

NAME = "textvqa"
NUM_HUMAN_ANSWERS = 10
DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class TextVQAQuestion:
    question_id: Any
    image_id: str
    image_path: str
    question: str
    prompt: str
    answers: Optional[Tuple[str, ...]]   # the human answers; None on the test split


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Leave-one-out VQA accuracy of one prediction against its human answers."""
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in human_answers]
    total = sum(matches)
    # Leaving out answer i leaves `total - matches[i]` matching answers among the others.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


def _check_entry(path: str, i: int, entry: Any) -> None:
    where = f"{path}: data[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("question_id", "question", "image_id"):
        if key not in entry:
            raise ValueError(f"{where}: missing field '{key}'")
    qid = entry["question_id"]
    if not isinstance(entry["question"], str):
        raise ValueError(f"{where} (question {qid!r}): field 'question' must be a string")
    answers = entry.get("answers")
    if answers is None:
        return
    if (not isinstance(answers, list) or len(answers) != NUM_HUMAN_ANSWERS
            or not all(isinstance(a, str) for a in answers)):
        raise ValueError(f"{where} (question {qid!r}): 'answers' must be a list of "
                         f"{NUM_HUMAN_ANSWERS} strings, got {answers!r}")


def load_questions(
    json_path: str, image_root: str, limit: Optional[int] = None,
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
) -> List[TextVQAQuestion]:
    """Parse and check every entry, keep the first `limit`, check their images."""
    with open(json_path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{json_path}: expected an object with a 'data' list")
    questions: List[TextVQAQuestion] = []
    seen = set()
    for i, entry in enumerate(doc["data"]):
        _check_entry(json_path, i, entry)
        qid = entry["question_id"]
        if str(qid) in seen:
            raise ValueError(f"{json_path}: data[{i}]: duplicate question_id {qid!r}")
        seen.add(str(qid))
        image_id = str(entry["image_id"])
        answers = entry.get("answers")
        questions.append(TextVQAQuestion(
            question_id=qid, image_id=image_id,
            image_path=os.path.join(image_root, image_id + ".jpg"),
            question=entry["question"], prompt=entry["question"] + prompt_suffix,
            answers=None if answers is None else tuple(answers),
        ))
    return limited_with_images(questions, limit, lambda q: f"TextVQA {json_path}")


def score(questions: Sequence[TextVQAQuestion], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by ``str(question_id)``) with VQA accuracy."""
    records = []
    for q in questions:
        answer = responses[str(q.question_id)]
        records.append({
            "question_id": q.question_id, "image_id": q.image_id, "question": q.question,
            "answer": answer, "normalized": normalize_answer(answer),
            "gt_answers": None if q.answers is None else list(q.answers),
            "score": None if q.answers is None else vqa_accuracy(answer, q.answers),
        })
    scored = [r["score"] for r in records if r["score"] is not None]
    metrics = {
        "accuracy": sum(scored) / len(scored) if scored else None,
        "num_questions": len(records), "num_scored": len(scored),
    }
    return {"benchmark": NAME, "metrics": metrics, "questions": records}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    return [(k, metrics[k]) for k in ("accuracy", "num_questions", "num_scored")]

"""TextVQA: open-ended questions about text in images, scored with VQA accuracy.

Data: the official JSON ``{"data": [{"question_id", "question", "image_id",
"answers": [10 strings], ...}]}``; image ``<image_root>/<image_id>.jpg``.
Entries without ``answers`` (the test split) are asked but not scored.

Prompts: ``question + prompt_suffix`` (default "\nAnswer the question using a single word or
phrase."), or with ``ocr_tokens=True`` LLaVA-1.5's prompt of ``llava_textvqa_val_v051_ocr.jsonl``
(the one behind its reported TextVQA numbers), built from the entry's ``ocr_tokens``:
``Question.capitalize() + "\nReference OCR token: " + ", ".join(ocr_tokens) + prompt_suffix``
(str.capitalize: first letter upper, the rest lower, as lmms-eval's LLaVA-reproducing task builds it;
the line is there even with no token).

Answers keyed as LLaVA writes them (``question_id`` = the image id, shared by an image's
questions, and the ``prompt``) are matched as LLaVA's ``eval_textvqa.py`` matches them
(`match_answers`): on (image id, the question read back from the prompt, lower-cased).

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
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .answer_records import AnswerRecord, claim
from .question_images import limited_with_images
from .vqa_normalize import normalize_answer

NAME = "textvqa"
NUM_HUMAN_ANSWERS = 10
DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
OCR_LINE = "\nReference OCR token: "


@dataclass(frozen=True)
class TextVQAQuestion:
    question_id: Any
    image_id: str
    image_path: str
    question: str       # as the annotation file holds it
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
    tokens = entry.get("ocr_tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where} (question {qid!r}): 'ocr_tokens' must be a list of strings")
    answers = entry.get("answers")
    if answers is None:
        return
    if (not isinstance(answers, list) or len(answers) != NUM_HUMAN_ANSWERS
            or not all(isinstance(a, str) for a in answers)):
        raise ValueError(f"{where} (question {qid!r}): 'answers' must be a list of "
                         f"{NUM_HUMAN_ANSWERS} strings, got {answers!r}")


def ocr_prompt(question: str, ocr_tokens: Sequence[str], prompt_suffix: str = DEFAULT_PROMPT_SUFFIX) -> str:
    """LLaVA-1.5's TextVQA prompt with the image's OCR tokens (see the module docstring)."""
    return question.capitalize() + OCR_LINE + ", ".join(ocr_tokens) + prompt_suffix


def load_questions(
    json_path: str, image_root: str, limit: Optional[int] = None,
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX, ocr_tokens: bool = False,
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
        if ocr_tokens and "ocr_tokens" not in entry:
            raise ValueError(f"{json_path}: data[{i}] (question {qid!r}): no 'ocr_tokens' for the OCR prompt")
        prompt = (ocr_prompt(entry["question"], entry["ocr_tokens"], prompt_suffix) if ocr_tokens
                  else entry["question"] + prompt_suffix)
        questions.append(TextVQAQuestion(
            question_id=qid, image_id=image_id,
            image_path=os.path.join(image_root, image_id + ".jpg"),
            question=entry["question"], prompt=prompt,
            answers=None if answers is None else tuple(answers),
        ))
    return limited_with_images(questions, limit, lambda q: f"TextVQA {json_path}")


def prompt_question(prompt: str, where: str) -> str:
    """The question eval_textvqa.py reads back from a LLaVA prompt, lower-cased: the text between
    "Question: " and " Short answer:" of a BLIP-style OCR prompt; the line before (or, when the
    prompt starts with it, after) the "Reference OCR token: " line of a 3-line prompt; the first
    line of a 2-line prompt.  Any other prompt is an error (eval_textvqa.py fails an assertion)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = found.group(1) if found else None
    elif OCR_LINE[1:] in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(OCR_LINE[1:].rstrip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    if question is None:
        raise ValueError(f"{where}: prompt {prompt[:60]!r} is in none of the forms eval_textvqa.py reads")
    return question.lower()


def match_answers(questions: Sequence[TextVQAQuestion], records: Sequence[AnswerRecord]
                  ) -> Tuple[Dict[str, str], List[AnswerRecord]]:
    """Answers by question_id, from records keyed by question_id or, as LLaVA writes them, by
    image id + ``prompt``; -> (answers, records that match no question).  Questions with the same
    (image, question) take their answers in order (eval_textvqa.py scores them all against the
    last such annotation)."""
    ours = {str(q.question_id) for q in questions}
    images = {q.image_id for q in questions}
    by_key: Dict[Tuple[str, str], List[str]] = {}
    for q in questions:
        by_key.setdefault((q.image_id, q.question.lower()), []).append(str(q.question_id))
    answers: Dict[str, str] = {}
    unmatched: List[AnswerRecord] = []
    for r in records:
        qid = str(r.question_id)
        if r.prompt is not None and qid in images:
            same = by_key.get((qid, prompt_question(r.prompt, r.where)), [])
            free = [k for k in same if k not in answers]
            if same:
                claim(answers, free[0] if free else same[0], r)
                continue
        elif qid in ours:
            claim(answers, qid, r)
            continue
        unmatched.append(r)
    return answers, unmatched


def llava_question_id(q: TextVQAQuestion) -> str:
    """The question's key in a LLaVA answers file: the image id (eval_textvqa.py matches on it and
    the question read back from the prompt)."""
    return q.image_id


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

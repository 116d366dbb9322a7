"""Answers files and how their lines find their questions.

An answers file has one JSON object per line: ``question_id`` and the answer under ``answer`` or,
as LLaVA's ``model_vqa_loader.py`` writes it, ``text`` (its other fields, ``prompt``, ``answer_id``,
``model_id``, ``metadata``, are kept or ignored).  A line becomes an `AnswerRecord`.

Matching answers to questions is by ``str(question_id)`` unless the benchmark module has a
``match_answers(questions, records) -> (answers by question id, unmatched records)``: LLaVA's MME
and TextVQA files share one ``question_id`` between several questions and name the question by
its ``prompt``, as the official scripts read them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

Answers = Union[Mapping[Any, str], Sequence["AnswerRecord"]]


@dataclass(frozen=True)
class AnswerRecord:
    question_id: Any
    answer: str
    prompt: Optional[str]   # the question as the model saw it (LLaVA answer files), else None
    where: str              # "<file>:<line>", for error messages
    round_id: Any = 0       # LLaVA's MMBench rotation (``model_vqa_mmbench --all-rounds``); 0 elsewhere


def not_utf8(path, e: UnicodeDecodeError) -> str:
    return f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"


def _record(where: str, line: str) -> AnswerRecord:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or "question_id" not in rec:
        raise ValueError(f"{where}: expected an object with a 'question_id'")
    key = "answer" if "answer" in rec else "text"
    if not isinstance(rec.get(key), str):
        raise ValueError(f"{where}: expected a string 'answer' (or 'text')")
    prompt = rec.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' must be a string, got {prompt!r}")
    return AnswerRecord(rec["question_id"], rec[key], prompt, where, rec.get("round_id", 0))


def read_answer_records(path: str) -> List[AnswerRecord]:
    """Every answer line of a JSON-lines answers file, in file order (blank lines skipped)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")  # (not splitlines: U+2028 may sit inside a JSON string)
    except UnicodeDecodeError as e:  # (name the file and where: the decoder's message names neither)
        raise ValueError(not_utf8(path, e)) from None
    return [_record(f"{path}:{n}", line) for n, line in enumerate(lines, start=1) if line.strip()]


def by_question_id(records: Sequence[AnswerRecord]) -> Dict[str, str]:
    """``{str(question_id): answer}``; a question_id twice is an error naming its second line."""
    answers: Dict[str, str] = {}
    for r in records:
        qid = str(r.question_id)
        if qid in answers:
            raise ValueError(f"{r.where}: duplicate question_id {r.question_id!r}")
        answers[qid] = r.answer
    return answers


def match_by_id(questions: Sequence[Any], records: Sequence[AnswerRecord]
                ) -> Tuple[Dict[str, str], List[AnswerRecord]]:
    """The default matching: a record answers the question with its ``str(question_id)``."""
    known = {str(q.question_id) for q in questions}
    answers = by_question_id(records)
    unmatched = [r for r in records if str(r.question_id) not in known]
    return {k: v for k, v in answers.items() if k in known}, unmatched


def claim(answers: Dict[str, str], question_id: str, record: AnswerRecord) -> None:
    """Give `record` to question `question_id`; a second answer to one question is an error."""
    if question_id in answers:
        raise ValueError(f"{record.where}: a second answer to question {question_id!r} "
                         f"(question_id {record.question_id!r})")
    answers[question_id] = record.answer


def check_some_matched(records: Sequence[AnswerRecord], matched: Mapping[str, str], data_path: str) -> None:
    """An answers file none of whose lines answers a question is the wrong file: say which."""
    if records and not matched:
        first = records[0]
        path = first.where.rsplit(":", 1)[0]
        raise ValueError(f"{path}: no answer matches a question of {data_path} "
                         f"(first unmatched: question_id {first.question_id!r} at line "
                         f"{first.where.rsplit(':', 1)[1]})")


def write_llava_answers(path: str, questions: Sequence[Any], answers: Mapping[str, str],
                        llava_question_id, model_id: str) -> str:
    """An answers file as LLaVA's ``model_vqa_loader.py`` writes it (``question_id`` as the
    official scorer of the benchmark expects it, ``prompt``, ``text``, ``answer_id``, ``model_id``,
    ``metadata``), one line per question in question order; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"question_id": llava_question_id(q), "prompt": q.prompt,
                                "text": answers[str(q.question_id)], "answer_id": f"{model_id}-{i}",
                                "model_id": model_id, "metadata": {}}, ensure_ascii=False) + "\n")
    return path

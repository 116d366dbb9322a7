"""MMBench: single-choice questions with 2-4 options, scored with circular evaluation.

Data: the official TSV (see `mmbench_tsv`: cells pandas reads as NaN, "NA" and
"N/A" included, are missing; a missing hint, or the unused options C and D of a
two-option question).  Images are decoded into ``image_dir`` before any
question is asked.

Prompt (LLaVA's ``model_vqa_mmbench``): ``hint\\n`` (when there is one), the
question, then one line per option ``A. text``, then `prompt_suffix` (by default
LLaVA's instruction to answer with the option's letter).

Scoring (`mmbench_circular`, with `mmbench_matching`): VLMEvalKit's exact
matching and circular evaluation, with no LLM judge: an answer from which no
option can be inferred, which VLMEvalKit would hand to its judge, is wrong here,
and the result counts such questions (``num_judge_questions``).

Circular evaluation: each question is asked once per rotation of its options
(N options -> N passes, pass k showing option (j+k) mod N as letter j, as LLaVA's
``--all-rounds``); a question counts as right only when every pass is right.  The
official circular TSVs already hold the rotated copies as rows with
``index = k * 1e6 + base`` and VLMEvalKit groups rows by ``index % 1e6``; such a
file is used as is.  A file with only base rows (index < 1e6) gets its
rotations generated here, numbered the same way.  ``circular=False`` asks base
rows once (vanilla evaluation).  Accuracy: overall and per ``category`` /
``l2-category`` of the base row.  Rows without an ``answer`` (the test split) are
asked but not scored; `mmbench_submission` writes the file its server takes.

Answer files: LLaVA's (``question_id`` = the row index, ``text``, ``round_id`` =
the rotation of ``--all-rounds``) are read as they are: `answer_key`.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .answer_records import AnswerRecord, claim
from .mmbench_circular import score_passes, summary_rows
from .mmbench_tsv import Row, decode_images, read_rows

__all__ = ["MMBenchQuestion", "answer_key", "build_prompt", "load_questions", "match_answers", "score", "summary_rows"]

NAME = "mmbench"
GROUP_STRIDE = 1_000_000
DEFAULT_PROMPT_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class MMBenchQuestion:
    question_id: int        # the row index; rotated copies: k * 1e6 + base index
    group: int              # base index (question_id % 1e6)
    rotation: int
    image_path: str
    prompt: str
    options: Tuple[str, ...]
    answer: Optional[str]   # correct letter, None when the file has no answer
    category: Optional[str]
    l2_category: Optional[str]


def build_prompt(question: str, hint: Optional[str], options: Sequence[str],
                 prompt_suffix: str = DEFAULT_PROMPT_SUFFIX) -> str:
    text = question if hint is None else f"{hint}\n{question}"
    for letter, option in zip(string.ascii_uppercase, options):
        text += f"\n{letter}. {option}"
    return text + prompt_suffix


def _rotations(row: Row, n: int) -> List[Tuple[int, Tuple[str, ...], Optional[str]]]:
    """-> [(rotation k, options shown, correct letter)] for k = 0..n-1."""
    out = []
    for k in range(n):
        options = row.options[k:] + row.options[:k]
        answer = None
        if row.answer is not None:
            answer = string.ascii_uppercase[(string.ascii_uppercase.index(row.answer) - k) % n]
        out.append((k, options, answer))
    return out


def load_questions(
    tsv_path: str, image_dir: str, limit: Optional[int] = None, circular: bool = True,
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
) -> List[MMBenchQuestion]:
    """Parse the TSV (every row), keep the first `limit` base questions, decode their images."""
    rows = read_rows(tsv_path)
    by_index = {r.index: r for r in rows}
    base = [r for r in rows if r.index < GROUP_STRIDE]
    copies: Dict[int, List[Row]] = {}
    for r in rows:
        if r.index >= GROUP_STRIDE:
            g = r.index % GROUP_STRIDE
            if g not in by_index:
                raise ValueError(f"{tsv_path}:{r.lineno}: circular copy {r.index} has no base "
                                 f"question with index {g}")
            copies.setdefault(g, []).append(r)
    if limit is not None:
        base = base[:limit]

    # (row shown, question_id, rotation, options, answer) for every question asked
    plan: List[Tuple[Row, Row, int, int, Tuple[str, ...], Optional[str]]] = []
    for b in base:
        if not circular:
            plan.append((b, b, b.index, 0, b.options, b.answer))
        elif copies:
            for r in [b] + sorted(copies.get(b.index, []), key=lambda r: r.index):
                plan.append((b, r, r.index, r.index // GROUP_STRIDE, r.options, r.answer))
        else:
            for k, options, answer in _rotations(b, len(b.options)):
                plan.append((b, b, k * GROUP_STRIDE + b.index, k, options, answer))

    images = decode_images(tsv_path, list({id(r): r for _, r, *_ in plan}.values()),
                           by_index, image_dir)
    return [
        MMBenchQuestion(
            question_id=qid, group=b.index, rotation=k, image_path=images[r.index],
            prompt=build_prompt(r.question, r.hint, options, prompt_suffix),
            options=options, answer=answer, category=b.category, l2_category=b.l2_category,
        )
        for b, r, qid, k, options, answer in plan
    ]


def score(questions: Sequence[MMBenchQuestion], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by ``str(question_id)``); see `mmbench_circular`."""
    return {"benchmark": NAME, **score_passes(questions, responses)}


def answer_key(record: AnswerRecord) -> str:
    """The question id an answer-file record answers: ``round_id * 1e6 + question_id``.

    LLaVA's ``model_vqa_mmbench`` writes ``question_id`` = the TSV row's index and
    ``round_id`` = k for its k-th rotation (``--all-rounds``; always 0 without it),
    the rotation this module numbers ``k * 1e6 + index``.
    """
    qid, k = record.question_id, record.round_id
    if not k:
        return str(qid)
    try:
        return str(int(qid) + int(k) * GROUP_STRIDE)
    except (TypeError, ValueError):
        raise ValueError(f"{record.where}: question_id {qid!r} with round_id {k!r}: expected integers") from None


def match_answers(questions: Sequence[Any], records: Sequence[AnswerRecord]
                  ) -> Tuple[Dict[str, str], List[AnswerRecord]]:
    """Answer-file lines -> answers by question id (`answer_key`), and the lines answering nothing."""
    known = {str(q.question_id) for q in questions}
    answers: Dict[str, str] = {}
    unmatched: List[AnswerRecord] = []
    for r in records:
        key = answer_key(r)
        if key in known:
            claim(answers, key, r)
        else:
            unmatched.append(r)
    return answers, unmatched
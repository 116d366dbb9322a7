"""MMBench: single-choice questions with 2-4 options, scored with circular evaluation.

Data: the official TSV, columns ``index, question, hint, A, B, C, D, answer,
category, l2-category, image`` (others ignored).  ``image`` is a base64 image, or
(in de-duplicated files) the ``index`` of another row whose image it shares.
Empty / "nan" / "none" cells are missing (a missing hint, or the unused options
C and D of a two-option question).  Images are decoded into ``image_dir``
before any question is asked.

Prompt (LLaVA's MMBench prompt): ``hint\\n`` (when there is one), the question,
then one line per option ``A. text``, then `prompt_suffix` (by default the
instruction to answer with the option's letter).

Answer extraction (the official rule-based matching, no LLM judge):
1. the characters ``.()[],:;!*#{}`` become spaces and the answer is split on
   whitespace; if exactly one option letter occurs among the words it is the
   prediction.  A known refusal sentence, or no letter but a standalone "Z",
   means no prediction.
2. otherwise, if the lower-cased answer is at most twice as long as all option
   texts together and exactly one lower-cased option text occurs in it, that
   option is the prediction.
3. otherwise there is no prediction (wrong).

Circular evaluation: each question is asked once per rotation of its options
(N options -> N passes, pass k showing option (j+k) mod N as letter j); a
question counts as right only when every pass is right.  The official circular
TSVs already hold the rotated copies as rows with ``index = k * 1e6 + base``
and group rows by ``index % 1e6``; such a file is used as is.  A file with only
base rows (index < 1e6) gets its rotations generated here, numbered the same
way.  ``circular=False`` asks base rows once (vanilla evaluation).
Accuracy: overall and per ``category`` / ``l2-category`` of the base row.
Rows without an ``answer`` (the test split) are asked but not scored.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import string
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

NAME = "mmbench"
GROUP_STRIDE = 1_000_000
DEFAULT_PROMPT_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
_SPLIT_CHARS = ".()[],:;!*#{}"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MISSING = ("", "nan", "none")
_IMAGE_REF_MAX_LEN = 64   # shorter image cells are references to another row's index
_REQUIRED = ("index", "question", "A", "B", "image")


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


# ---------------------------------------------------------------- answer extraction

def _infer_letter(response: str, letters: Sequence[str]) -> Tuple[Optional[str], bool]:
    """Step 1 -> (letter or None, whether text matching may still be tried)."""
    if any(r in response for r in _REFUSALS):
        return None, False
    words = response
    for ch in _SPLIT_CHARS:
        words = words.replace(ch, " ")
    words = words.split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0], False
    return None, not (not found and "Z" in words)


def _infer_text(response: str, options: Mapping[str, str]) -> Optional[str]:
    """Step 2: the one option whose text occurs in the (not too long) response."""
    text = response.lower()
    if len(text) > 2 * sum(len(o) for o in options.values()):
        return None
    found = [c for c, o in options.items() if o.lower() in text]
    return found[0] if len(found) == 1 else None


def extract_choice(response: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter a free-form `response` picks among `options` ({letter: text}), or None."""
    letter, try_text = _infer_letter(response, list(options))
    if letter is None and try_text:
        letter = _infer_text(response, options)
    return letter


def build_prompt(question: str, hint: Optional[str], options: Sequence[str],
                 prompt_suffix: str = DEFAULT_PROMPT_SUFFIX) -> str:
    text = question if hint is None else f"{hint}\n{question}"
    for letter, option in zip(string.ascii_uppercase, options):
        text += f"\n{letter}. {option}"
    return text + prompt_suffix


# ---------------------------------------------------------------- reading

@dataclass
class _Row:
    lineno: int
    index: int
    question: str
    hint: Optional[str]
    options: Tuple[str, ...]
    answer: Optional[str]
    category: Optional[str]
    l2_category: Optional[str]
    image: str


def _cell(row: Mapping[str, str], key: str) -> Optional[str]:
    value = row.get(key)
    if value is None or value.strip().lower() in _MISSING:
        return None
    return value


def _parse_row(path: str, lineno: int, row: Dict[str, str], letters: Sequence[str]) -> _Row:
    where = f"{path}:{lineno}"
    try:
        index = int(float(row["index"]))   # pandas may have written 12 as 12.0
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'index' is {row['index']!r}, expected an integer") from None
    options: List[str] = []
    for letter in letters:
        value = _cell(row, letter)
        if value is None:
            break
        options.append(value)
    later = [c for c in letters[len(options):] if _cell(row, c) is not None]
    if later:
        raise ValueError(f"{where}: option {later[0]} is set but an earlier option is empty")
    if len(options) < 2:
        raise ValueError(f"{where}: index {index} has {len(options)} option(s), expected 2 or more")
    answer = _cell(row, "answer")
    if answer is not None:
        answer = answer.strip()
        if answer not in letters[:len(options)]:
            raise ValueError(f"{where}: index {index}: answer {answer!r} is not one of the "
                             f"options {''.join(letters[:len(options)])}")
    question = _cell(row, "question")
    image = _cell(row, "image")
    if question is None or image is None:
        raise ValueError(f"{where}: index {index}: empty '{'question' if question is None else 'image'}'")
    return _Row(lineno, index, question, _cell(row, "hint"), tuple(options), answer,
                _cell(row, "category"), _cell(row, "l2-category"), image.strip())


def _read_rows(path: str) -> List[_Row]:
    # Base64 images are far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        missing = [c for c in _REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)}")
        letters = [c for c in string.ascii_uppercase if c in header]
        rows, seen = [], {}
        start = reader.line_num
        for fields in reader:
            lineno, start = start + 1, reader.line_num   # first physical line of the record
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(fields)} fields, header has {len(header)}")
            row = _parse_row(path, lineno, dict(zip(header, fields)), letters)
            if row.index in seen:
                raise ValueError(f"{path}:{lineno}: index {row.index} already used on line {seen[row.index]}")
            seen[row.index] = lineno
            rows.append(row)
    return rows


def _image_suffix(data: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{where}: 'image' does not decode to an image") from None
    return {"JPEG": ".jpg"}.get(fmt, "." + fmt.lower())


def _decode_images(path: str, rows: Sequence[_Row], by_index: Mapping[int, _Row],
                   image_dir: str) -> Dict[int, str]:
    """Write each needed row's image to `image_dir`; -> {row index: image path}."""
    os.makedirs(image_dir, exist_ok=True)
    written: Dict[int, str] = {}
    out: Dict[int, str] = {}
    for row in rows:
        src = row
        if len(row.image) <= _IMAGE_REF_MAX_LEN:
            ref = row.image
            try:
                src = by_index[int(float(ref))]
            except (ValueError, KeyError):
                raise ValueError(f"MMBench {path}:{row.lineno}: index {row.index}: 'image' "
                                 f"{ref!r} is neither base64 nor the index of another row") from None
            if len(src.image) <= _IMAGE_REF_MAX_LEN:
                raise ValueError(f"MMBench {path}:{row.lineno}: index {row.index}: 'image' refers to "
                                 f"index {src.index}, which holds no image either")
        if src.index not in written:
            where = f"MMBench {path}:{src.lineno}: index {src.index}"
            try:
                data = base64.b64decode(src.image, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{where}: 'image' is not valid base64") from None
            target = os.path.join(image_dir, f"{src.index}{_image_suffix(data, where)}")
            with open(target, "wb") as f:
                f.write(data)
            written[src.index] = target
        out[row.index] = written[src.index]
    return out


def _rotations(row: _Row, n: int) -> List[Tuple[int, Tuple[str, ...], Optional[str]]]:
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
    rows = _read_rows(tsv_path)
    by_index = {r.index: r for r in rows}
    base = [r for r in rows if r.index < GROUP_STRIDE]
    copies: Dict[int, List[_Row]] = {}
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
    plan: List[Tuple[_Row, _Row, int, int, Tuple[str, ...], Optional[str]]] = []
    for b in base:
        if not circular:
            plan.append((b, b, b.index, 0, b.options, b.answer))
        elif copies:
            for r in [b] + sorted(copies.get(b.index, []), key=lambda r: r.index):
                plan.append((b, r, r.index, r.index // GROUP_STRIDE, r.options, r.answer))
        else:
            for k, options, answer in _rotations(b, len(b.options)):
                plan.append((b, b, k * GROUP_STRIDE + b.index, k, options, answer))

    images = _decode_images(tsv_path, list({id(r): r for _, r, *_ in plan}.values()),
                            by_index, image_dir)
    return [
        MMBenchQuestion(
            question_id=qid, group=b.index, rotation=k, image_path=images[r.index],
            prompt=build_prompt(r.question, r.hint, options, prompt_suffix),
            options=options, answer=answer, category=b.category, l2_category=b.l2_category,
        )
        for b, r, qid, k, options, answer in plan
    ]


# ---------------------------------------------------------------- scoring

def _accuracy_by(groups: Sequence[Dict[str, Any]], key: str) -> Dict[str, float]:
    buckets: Dict[str, List[bool]] = {}
    for g in groups:
        if g[key] is not None:
            buckets.setdefault(g[key], []).append(g["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(buckets.items())}


def score(questions: Sequence[MMBenchQuestion], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by ``str(question_id)``); a group is right when all its passes are."""
    records = []
    for q in questions:
        response = responses[str(q.question_id)]
        options = dict(zip(string.ascii_uppercase, q.options))
        pred = extract_choice(response, options)
        records.append({
            "question_id": q.question_id, "group": q.group, "rotation": q.rotation,
            "category": q.category, "l2-category": q.l2_category, "prompt": q.prompt,
            "gt": q.answer, "response": response, "pred": pred,
            "correct": None if q.answer is None else pred == q.answer,
        })
    grouped: Dict[int, List[Dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r["group"], []).append(r)
    groups = []
    for g, rs in grouped.items():
        scored = all(r["correct"] is not None for r in rs)
        groups.append({
            "group": g, "category": rs[0]["category"], "l2-category": rs[0]["l2-category"],
            "num_passes": len(rs), "correct": all(r["correct"] for r in rs) if scored else None,
        })
    scored_groups = [g for g in groups if g["correct"] is not None]
    metrics: Dict[str, Any] = {
        "accuracy": (sum(g["correct"] for g in scored_groups) / len(scored_groups)
                     if scored_groups else None),
        "num_questions": len(groups), "num_scored": len(scored_groups),
        "num_passes": len(records),
        "num_unparsed": sum(r["pred"] is None for r in records),
        "by_category": _accuracy_by(scored_groups, "category"),
        "by_l2_category": _accuracy_by(scored_groups, "l2-category"),
    }
    return {"benchmark": NAME, "metrics": metrics, "questions": records, "groups": groups}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = [(k, metrics[k]) for k in (
        "accuracy", "num_questions", "num_scored", "num_passes", "num_unparsed")]
    rows += [(f"l2/{k}", v) for k, v in metrics["by_l2_category"].items()]
    rows += [(f"category/{k}", v) for k, v in metrics["by_category"].items()]
    return rows

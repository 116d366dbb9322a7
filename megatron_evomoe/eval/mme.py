"""MME: 14 sub-tasks of yes/no questions, two questions per image.

Layouts read (``data_path`` is the benchmark root, one folder per category):
- flat: ``<category>/<stem>.txt`` next to ``<category>/<stem>.jpg|png``;
- split: ``<category>/questions_answers_YN/<stem>.txt`` with ``<category>/images/<stem>.*``;
each txt holding one line per question, ``question<TAB>Yes|No`` (the release
files) or ``image<TAB>question<TAB>Yes|No``;
- the eval-tool template: ``data_path`` holds ``<category>.txt`` files of
  ``image<TAB>question<TAB>Yes|No`` lines, the images being found under
  ``<image_root>/<category>/`` or ``<image_root>/<category>/images/``.
``image_root`` defaults to ``data_path``; for the two folder layouts it replaces the
benchmark root when looking images up.

Answers keyed as LLaVA writes them (``model_vqa_loader.py`` on ``llava_mme.jsonl``: ``question_id``
``"<category>/<image file>"``, the same for an image's two questions, and the ``prompt``) are
matched as LLaVA's ``convert_answer_to_mme.py`` matches them (`match_answers`).

Scoring follows the official MME calculation script (``eval_tool/calculation.py``):
- answers are lower-cased, not stripped; exactly "yes"/"no" is taken as is, otherwise "yes" in
  the first 4 characters means yes, else "no" in them means no, else "other" (always wrong):
  " Yes" is yes, "  Yes" other (its first 4 characters are "  ye");
- per category: acc = share of questions right, acc+ = share of images with both
  questions right, score = 100*acc + 100*acc+ (at most 200).  The official script pairs
  consecutive lines of its per-category results file, which are an image's two questions when
  the answers come in LLaVA's question order; here the pairs are the questions of one image,
  whatever the order;
- an answer with a newline or a tab breaks the official results file (one line per answer,
  tab-separated): calculation.py then skips lines or stops on its pair assertion.  Here such an
  answer is read as written (its first 4 characters) and ``metrics["notes"]`` counts them;
- Perception = sum of the 10 perception category scores (at most 2000), Cognition
  = sum of the 4 cognition ones (at most 800).
Categories present in the data but in neither list are scored and left out of the
totals; a total over a list with missing categories says so in ``*_num_categories``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .answer_records import AnswerRecord, claim
from .question_images import limited_with_images

NAME = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
              "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
_SPLIT_QA, _SPLIT_IMAGES = "questions_answers_YN", "images"
# What LLaVA's prompts add to MME's questions, and convert_answer_to_mme.py takes off again.
_SHORT_ANSWER = "Answer the question using a single word or phrase."
_YES_OR_NO = "Please answer yes or no."


@dataclass(frozen=True)
class MMEQuestion:
    question_id: str    # "<category>/<image file>#<n>", n = 0, 1 within the image
    category: str
    image: str          # image file name
    image_path: str
    question: str
    prompt: str
    answer: str         # "yes" | "no"
    source: str         # "<txt file>:<line>" the question came from


def parse_yes_no_other(answer: str) -> str:
    """Map an answer, as written in the answers file, to "yes"/"no"/"other" with calculation.py's rule."""
    # (calculation.py reads the answer with the line's "\n"; that changes neither rule below.)
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# ---------------------------------------------------------------- reading

def _split_line(path: str, lineno: int, line: str, default_image: Optional[str]):
    """-> (image, question, answer) of one `[image\\t]question\\tanswer` line."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) == 2 and default_image is not None:
        image, (question, answer) = default_image, fields
    elif len(fields) == 3:
        image, question, answer = fields
    else:
        want = "question<TAB>answer or " if default_image is not None else ""
        raise ValueError(f"{path}:{lineno}: expected {want}image<TAB>question<TAB>answer, "
                         f"got {len(fields)} tab-separated fields")
    if answer.strip().lower() not in ("yes", "no"):
        raise ValueError(f"{path}:{lineno}: answer is {answer!r}, expected Yes or No")
    return image.strip(), question, answer.strip().lower()


def _read_txt(path: str, default_image: Optional[str]):
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append((lineno, *_split_line(path, lineno, line, default_image)))
    return rows


def _find_image(folder: str, stem: str) -> str:
    """The image `stem`.* in `folder`; the .jpg path when there is none (reported later)."""
    for ext in IMAGE_EXTENSIONS:
        candidate = os.path.join(folder, stem + ext)
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(folder, stem + IMAGE_EXTENSIONS[0])


def _category_entries(data_path: str, image_root: str, category: str):
    """-> [(txt path, lineno, image name, image path, question, answer)] of a category folder."""
    folder = os.path.join(data_path, category)
    image_folder = os.path.join(image_root, category)
    split = os.path.isdir(os.path.join(folder, _SPLIT_QA))
    if split:
        folder, image_folder = os.path.join(folder, _SPLIT_QA), os.path.join(image_folder, _SPLIT_IMAGES)
    entries = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".txt"):
            continue
        path, stem = os.path.join(folder, name), name[:-4]
        default = os.path.basename(_find_image(image_folder, stem))
        for lineno, image, question, answer in _read_txt(path, default):
            image_path = (_find_image(image_folder, stem) if image == default
                          else os.path.join(image_folder, image))
            entries.append((path, lineno, image, image_path, question, answer))
    return entries


def _template_entries(data_path: str, image_root: str, category: str):
    """-> entries of an eval-tool ``<category>.txt`` file."""
    path = os.path.join(data_path, category + ".txt")
    base = os.path.join(image_root, category)
    entries = []
    for lineno, image, question, answer in _read_txt(path, None):
        image_path = os.path.join(base, image)
        if not os.path.isfile(image_path) and os.path.isfile(os.path.join(base, _SPLIT_IMAGES, image)):
            image_path = os.path.join(base, _SPLIT_IMAGES, image)
        entries.append((path, lineno, image, image_path, question, answer))
    return entries


def _categories(data_path: str) -> Tuple[List[str], bool]:
    """Known categories first (official order), then any others; and whether it is the template layout."""
    names = sorted(os.listdir(data_path))
    folders = [n for n in names if os.path.isdir(os.path.join(data_path, n))
               and not n.startswith(".") and n != "eval_tool"]
    template = [n[:-4] for n in names if n.endswith(".txt") and n[:-4] in PERCEPTION + COGNITION]
    found, is_template = (template, True) if template else (folders, False)
    order = [c for c in PERCEPTION + COGNITION if c in found]
    return order + [c for c in found if c not in order], is_template


def load_questions(
    data_path: str, image_root: Optional[str] = None, limit: Optional[int] = None,
    prompt_suffix: str = "",
) -> List[MMEQuestion]:
    """Parse every category (any malformed line is an error), keep the first `limit`, check images."""
    if not os.path.isdir(data_path):
        raise ValueError(f"MME: data path {data_path} is not a folder")
    image_root = image_root or data_path
    categories, is_template = _categories(data_path)
    if not categories:
        raise ValueError(f"MME: no category folders or <category>.txt files in {data_path}")
    read = _template_entries if is_template else _category_entries
    questions: List[MMEQuestion] = []
    for category in categories:
        per_image: Dict[str, int] = {}
        for path, lineno, image, image_path, question, answer in read(data_path, image_root, category):
            n = per_image.get(image, 0)
            per_image[image] = n + 1
            questions.append(MMEQuestion(
                question_id=f"{category}/{image}#{n}", category=category, image=image,
                image_path=image_path, question=question, prompt=question + prompt_suffix,
                answer=answer, source=f"{path}:{lineno}",
            ))
    return limited_with_images(questions, limit, lambda q: f"MME {q.source}")


# ---------------------------------------------------------------- LLaVA's answer keys

def _gt_key(category: str, image: str, question: str) -> Tuple[str, str, str]:
    """convert_answer_to_mme.py's key of a question: category, the image name up to its first ".",
    and the question as its (stripped) release line holds it."""
    return category, image.split(".")[0], question.lstrip()


def _prompt_keys(record: AnswerRecord) -> List[Tuple[str, str, str]]:
    """The keys convert_answer_to_mme.py tries for a LLaVA answer, in its order."""
    qid = str(record.question_id)
    category, stem = qid.split("/")[0], qid.split("/")[-1].split(".")[0]
    prompt = record.prompt
    if _SHORT_ANSWER in prompt:
        prompt = prompt.replace(_SHORT_ANSWER, "").strip()
    if _YES_OR_NO in prompt:
        return [(category, stem, prompt)]
    return [(category, stem, f"{prompt} {_YES_OR_NO}"), (category, stem, f"{prompt}  {_YES_OR_NO}")]


def match_answers(questions: Sequence[MMEQuestion], records: Sequence[AnswerRecord]
                  ) -> Tuple[Dict[str, str], List[AnswerRecord]]:
    """Answers by question_id, from records keyed ``"<category>/<image>#<n>"`` or, as LLaVA writes
    them, ``"<category>/<image file>"`` + ``prompt``; -> (answers, records that match no question).
    Questions with the same key (the same question twice on one image) take their answers in order."""
    ours = {q.question_id for q in questions}
    by_key: Dict[Tuple[str, str, str], List[str]] = {}
    for q in questions:
        by_key.setdefault(_gt_key(q.category, q.image, q.question), []).append(q.question_id)
    answers: Dict[str, str] = {}
    unmatched: List[AnswerRecord] = []
    for r in records:
        if str(r.question_id) in ours:
            claim(answers, str(r.question_id), r)
            continue
        keys = [] if r.prompt is None else [k for k in _prompt_keys(r) if k in by_key]
        if not keys:
            unmatched.append(r)
            continue
        free = [qid for qid in by_key[keys[0]] if qid not in answers]
        claim(answers, free[0] if free else by_key[keys[0]][0], r)
    return answers, unmatched


# ---------------------------------------------------------------- scoring

def _category_score(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    images: Dict[str, List[bool]] = {}
    for r in records:
        images.setdefault(r["image"], []).append(r["correct"])
    acc = sum(r["correct"] for r in records) / len(records)
    acc_plus = sum(all(v) for v in images.values()) / len(images)
    return {
        "acc": 100.0 * acc, "acc_plus": 100.0 * acc_plus, "score": 100.0 * (acc + acc_plus),
        "num_questions": len(records), "num_images": len(images),
        "num_other": sum(r["pred"] == "other" for r in records),
        "num_multiline": sum(any(c in r["answer"] for c in "\n\t") for r in records),
    }


def llava_question_id(q: MMEQuestion) -> str:
    """The question's key in a LLaVA answers file: ``"<category>/<image file>"``, shared by an
    image's questions (convert_answer_to_mme.py tells them apart by the prompt)."""
    return f"{q.category}/{q.image}"


def score(questions: Sequence[MMEQuestion], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by question_id) per category and in the two totals."""
    records = []
    for q in questions:
        answer = responses[q.question_id]
        pred = parse_yes_no_other(answer)
        records.append({
            "question_id": q.question_id, "category": q.category, "image": q.image,
            "question": q.question, "gt": q.answer, "answer": answer, "pred": pred,
            "correct": pred == q.answer,
        })
    by_cat: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        by_cat.setdefault(r["category"], []).append(r)
    categories = {c: _category_score(rs) for c, rs in by_cat.items()}
    metrics: Dict[str, Any] = {}
    for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [c for c in members if c in categories]
        metrics[total] = sum(categories[c]["score"] for c in present)
        metrics[f"{total}_num_categories"] = len(present)
    metrics["categories"] = categories
    metrics["notes"] = [
        f"{total}: the sum over {metrics[f'{total}_num_categories']} of its {len(members)} categories "
        f"(calculation.py stops on a missing category file)"
        for total, members in (("perception", PERCEPTION), ("cognition", COGNITION))
        if 0 < metrics[f"{total}_num_categories"] < len(members)] + [
        f"{c}: {m['num_multiline']} answer(s) hold a newline or tab, which break calculation.py's "
        f"results file (lines skipped or a failed pair assertion); read here as written"
        for c, m in categories.items() if m["num_multiline"]]
    return {"benchmark": NAME, "metrics": metrics, "questions": records}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = [
        ("perception", metrics["perception"]), ("cognition", metrics["cognition"])]
    for cat, m in metrics["categories"].items():
        rows += [(f"{cat}/score", m["score"]), (f"{cat}/acc", m["acc"]),
                 (f"{cat}/acc_plus", m["acc_plus"])]
    return rows

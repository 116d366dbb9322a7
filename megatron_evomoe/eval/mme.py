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

Scoring follows the official MME calculation script:
- answers are lower-cased; exactly "yes"/"no" is taken as is, otherwise "yes" in
  the first 4 characters means yes, else "no" in them means no, else "other"
  (always wrong);
- per category: acc = share of questions right, acc+ = share of images with both
  questions right, score = 100*acc + 100*acc+ (at most 200);
- Perception = sum of the 10 perception category scores (at most 2000), Cognition
  = sum of the 4 cognition ones (at most 800).
Categories present in the data but in neither list are scored and left out of the
totals; a total over a list with missing categories says so in ``*_num_categories``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .question_images import limited_with_images
NAME = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
              "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
_SPLIT_QA, _SPLIT_IMAGES = "questions_answers_YN", "images"


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
    """Map a free-form answer to "yes"/"no"/"other" with the official MME rule."""
    # Generation scripts strip outputs before the results file is written.
    text = answer.strip().lower()
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
    }


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
    return {"benchmark": NAME, "metrics": metrics, "questions": records}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = [
        ("perception", metrics["perception"]), ("cognition", metrics["cognition"])]
    for cat, m in metrics["categories"].items():
        rows += [(f"{cat}/score", m["score"]), (f"{cat}/acc", m["acc"]),
                 (f"{cat}/acc_plus", m["acc_plus"])]
    return rows

"""The step every question loader ends with: keep the first `limit` questions, and check that each
one's image exists before the model is asked anything (an error names the file and the question)."""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, TypeVar

Q = TypeVar("Q")


def limited_with_images(questions: Sequence[Q], limit: Optional[int], where: Callable[[Q], str]) -> List[Q]:
    """questions[:limit], each with an existing `image_path`; `where(q)` names the question's source
    (e.g. "POPE questions.jsonl"), the message adds the question id and the missing path."""
    kept = list(questions if limit is None else questions[:limit])
    for q in kept:
        if not os.path.isfile(q.image_path):
            raise ValueError(f"{where(q)}: question {q.question_id!r}: image not found: {q.image_path}")
    return kept

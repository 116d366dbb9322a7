"""The MMBench submission file: the .xlsx the official evaluation server takes.

Laid out as LLaVA's ``scripts/convert_mmbench_for_submission.py`` writes it: the
TSV read by pandas, without its ``hint, category, source, image, comment,
l2-category`` columns, a ``prediction`` column (the answer text, unprocessed)
inserted as the seventh column, so for the official files::

    index, question, A, B, C, D, prediction, answer (dev only), split, ...

One row per TSV row (circular copies included), its prediction the answer
keyed by that row's index (for a TSV of base rows only: the answer to rotation
0).  Cells pandas reads as NaN (a missing option) stay empty.  Characters that
an .xlsx cannot hold (control characters other than tab and newlines) are
dropped from the predictions, and the count of predictions so changed printed;
text starting with "=" stays text (LLaVA's script would store it as a formula,
read back as an empty cell).

Needs pandas and openpyxl: the ``[eval]`` extra (``pip install 'megatron_evomoe[eval]'``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, List, Mapping, Sequence, Tuple

EXTRA_HINT = "pip install 'megatron_evomoe[eval]'"
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_POSITION = 6


class MissingExtraError(ValueError):
    """pandas or openpyxl is not installed (a user's set-up, reported in one line)."""


def require_eval_extra() -> Any:
    """-> the pandas module, or MissingExtraError naming the ``[eval]`` extra."""
    try:
        import openpyxl  # noqa: F401  (pandas' .xlsx writer)
        import pandas
    except ImportError as e:
        raise MissingExtraError(f"the MMBench submission file needs pandas and openpyxl "
                                f"({e.name} is missing): {EXTRA_HINT}") from None
    return pandas


def _xlsx_safe(texts: Sequence[str], illegal: Any) -> Tuple[List[str], int]:
    cleaned = [illegal.sub("", t) for t in texts]
    return cleaned, sum(a != b for a, b in zip(texts, cleaned))


def _keep_as_text(sheet: Any) -> None:
    """openpyxl stores a string starting with "=" as a formula, which a reader sees as an empty
    cell (no cached value): an answer "=B" would be lost.  Store every cell as written."""
    for row in sheet.iter_rows(min_row=2):
        for cell in row:
            if cell.data_type == "f":
                cell.data_type = "s"


def write_submission(tsv_path: str, answers: Mapping[str, str], out_path: str) -> str:
    """Write the submission .xlsx for `tsv_path` with `answers` ({str(row index): answer}).

    Every row of the TSV needs an answer (ValueError naming the first missing index).
    Returns `out_path`.
    """
    pd = require_eval_extra()
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    table = pd.read_csv(tsv_path, sep="\t")   # as LLaVA and VLMEvalKit read it
    if "index" not in table.columns:
        raise ValueError(f"{tsv_path}: no 'index' column")
    keys = [str(int(i)) for i in table["index"]]
    missing = [k for k in keys if k not in answers]
    if missing:
        raise ValueError(f"{tsv_path}: no answer for {len(missing)} of {len(keys)} rows, "
                         f"e.g. index {', '.join(missing[:5])} (the submission needs every row)")
    predictions, num_changed = _xlsx_safe([answers[k] for k in keys], ILLEGAL_CHARACTERS_RE)
    table = table.drop(columns=[c for c in DROPPED_COLUMNS if c in table.columns])
    table.insert(min(PREDICTION_POSITION, len(table.columns)), "prediction", predictions)
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    with pd.ExcelWriter(out_path, engine="openpyxl") as writer:
        table.to_excel(writer, index=False)
        _keep_as_text(next(iter(writer.sheets.values())))
    if num_changed:
        print(f"MMBench submission: {num_changed} prediction(s) held characters an .xlsx cannot "
              f"store; they were dropped", file=sys.stderr)
    print(f"MMBench submission: {len(keys)} rows -> {out_path}")
    return out_path


def write_result_submission(result: Mapping[str, Any], out_path: str) -> str:
    """The submission .xlsx of a finished MMBench run (`eval.runner.run_benchmark`'s result)."""
    answers = {str(r["question_id"]): r["response"] for r in result["questions"]}
    return write_submission(result["data"], answers, out_path)

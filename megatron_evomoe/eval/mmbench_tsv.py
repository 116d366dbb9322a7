"""Reading the MMBench TSV as pandas reads it, without pandas; decoding its images.

Columns: ``index, question, hint, A, B, C, D, answer, category, l2-category, image``
(others ignored).  VLMEvalKit and LLaVA read the file with pandas' default
settings, so a cell that is exactly one of pandas' default NA strings
(`PANDAS_NA`: "", "NA", "N/A", "nan", "None", "null", ... case and spaces as
listed) is missing: an option so written is no option, a hint so written no
hint.  Other text, "none" or " NA" included, is kept as written.  LLaVA's
MMBench script also drops a hint reading "nan" or "none" in any case
(`is_llava_none`); the prompt follows it.  (It would also end the options at
such a cell; VLMEvalKit, which scores, keeps it as an option, and so does this
module.)  Cells are text: the official files' option columns hold text, so
pandas' number parsing of an all-numeric column does not arise.

``image`` is a base64 image, or (in de-duplicated files) the ``index`` of another
row whose image it shares.
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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

# pandas.read_csv's default na_values (keep_default_na=True), compared with the whole cell.
PANDAS_NA = frozenset((
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
))
_IMAGE_REF_MAX_LEN = 64   # shorter image cells are references to another row's index
_REQUIRED = ("index", "question", "A", "B", "image")


def is_pandas_na(cell: Optional[str]) -> bool:
    """Whether pandas (default settings) reads this TSV cell as NaN."""
    return cell is None or cell in PANDAS_NA


def is_llava_none(cell: Optional[str]) -> bool:
    """LLaVA's `is_none` on a cell pandas has read: NaN, or the text nan/none in any case."""
    return is_pandas_na(cell) or cell.lower() in ("nan", "none")


@dataclass
class Row:
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
    return None if is_pandas_na(value) else value


def _parse_options(where: str, index: int, row: Mapping[str, str], letters: Sequence[str]) -> Tuple[str, ...]:
    options: List[str] = []
    for letter in letters:
        value = _cell(row, letter)
        if value is None:
            break
        options.append(value)
    later = [c for c in letters[len(options):] if _cell(row, c) is not None]
    if later:
        raise ValueError(f"{where}: index {index}: option {later[0]} is set but an earlier option is empty")
    if len(options) < 2:
        raise ValueError(f"{where}: index {index} has {len(options)} option(s), expected 2 or more")
    return tuple(options)


def _parse_row(path: str, lineno: int, row: Dict[str, str], letters: Sequence[str]) -> Row:
    where = f"{path}:{lineno}"
    try:
        index = int(float(row["index"]))   # pandas may have written 12 as 12.0
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'index' is {row['index']!r}, expected an integer") from None
    options = _parse_options(where, index, row, letters)
    answer = _cell(row, "answer")
    if answer is not None and answer not in letters[:len(options)]:
        raise ValueError(f"{where}: index {index}: answer {answer!r} is not one of the "
                         f"options {''.join(letters[:len(options)])}")
    question, image = row.get("question") or "", (row.get("image") or "").strip()
    if not question.strip() or not image:
        raise ValueError(f"{where}: index {index}: empty '{'question' if not question.strip() else 'image'}'")
    hint = None if is_llava_none(row.get("hint")) else row["hint"]
    return Row(lineno, index, question, hint, options, answer,
               _cell(row, "category"), _cell(row, "l2-category"), image)


def read_rows(path: str) -> List[Row]:
    """Every row of the TSV, checked (unique index, 2+ options, answer among them)."""
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


def _image_source(path: str, row: Row, by_index: Mapping[int, Row]) -> Row:
    """The row holding `row`'s image: itself, or the row its short image cell names."""
    if len(row.image) > _IMAGE_REF_MAX_LEN:
        return row
    try:
        src = by_index[int(float(row.image))]
    except (ValueError, KeyError):
        raise ValueError(f"MMBench {path}:{row.lineno}: index {row.index}: 'image' "
                         f"{row.image!r} is neither base64 nor the index of another row") from None
    if len(src.image) <= _IMAGE_REF_MAX_LEN:
        raise ValueError(f"MMBench {path}:{row.lineno}: index {row.index}: 'image' refers to "
                         f"index {src.index}, which holds no image either")
    return src


def decode_images(path: str, rows: Sequence[Row], by_index: Mapping[int, Row],
                  image_dir: str) -> Dict[int, str]:
    """Write each needed row's image to `image_dir`; -> {row index: image path}."""
    os.makedirs(image_dir, exist_ok=True)
    written: Dict[int, str] = {}
    out: Dict[int, str] = {}
    for row in rows:
        src = _image_source(path, row, by_index)
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

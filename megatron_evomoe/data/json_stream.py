"""Streaming readers of LLaVA record files: a `.json` list or a `.jsonl` file, one record at a time.

A LLaVA-mix `.json` list is a gigabyte of text; `json.load` of it holds the text and every record
as Python objects at once (tens of GiB).  `read_records` decodes one element of the list at a time
with `json.JSONDecoder.raw_decode` over a sliding window of the text, so memory stays at the window
plus one record.  Its errors are those `json.loads` of the whole text gives (same message, line,
column and char), so a bad file reads the same as before.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional, TextIO, Tuple

from .errors import DataError

CHUNK_CHARS = 1 << 20  # characters read at a time; a record longer than this grows the window
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


def read_records(path) -> Iterator[Tuple[int, Any, Optional[DataError]]]:
    """Yield (record_index, record, error) for a .json list or a .jsonl file.

    A .json file that does not parse, or is not a list, raises (nothing of it is usable; a syntax
    error past the first records raises when the reader gets there).  In a .jsonl file an
    unparsable line is yielded as an error for that record (so it can be skipped and counted like
    any other bad record); blank lines are ignored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("data file not found", file=path, reason="missing_file")
    reader = _read_jsonl if path.endswith(".jsonl") else _read_json_list
    try:  # utf-8-sig: tolerate a byte-order mark, which editors on Windows add
        with open(path, encoding="utf-8-sig") as f:
            yield from reader(path, f)
    except UnicodeDecodeError as e:  # the structure past this point cannot be trusted
        raise DataError(f"is not UTF-8 text ({e.reason}); is it really a JSON file?", file=path,
                        reason="bad_json") from None


def _read_jsonl(path: str, f: TextIO) -> Iterator[Tuple[int, Any, Optional[DataError]]]:
    index = 0
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line), None
        except (json.JSONDecodeError, RecursionError) as e:
            yield index, None, DataError(f"line {lineno} is not valid JSON: {e}", file=path, index=index,
                                         reason="bad_json")
        index += 1


class _Window:
    """The part of the file's text not consumed yet, and where it starts in the whole text (for the
    line/column of an error as json.loads reports them)."""

    def __init__(self, f: TextIO):
        self.f = f
        self.text = ""
        self.pos = 0  # next unread character of `text`
        self.base = 0  # index in the whole text of text[0]
        self.base_lines = 0  # newlines before text[0]
        self.base_last_newline = -1  # index in the whole text of the last newline before text[0]
        self.eof = False

    def more(self, min_chars: int = CHUNK_CHARS) -> bool:
        """Drop the consumed text, read at least `min_chars` more; False at the end of the file."""
        if self.eof:
            return False
        consumed = self.text[: self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self.base_lines += newlines
            self.base_last_newline = self.base + consumed.rindex("\n")
        self.base += self.pos
        chunk = self.f.read(max(min_chars, CHUNK_CHARS))
        self.eof = not chunk
        self.text = self.text[self.pos:] + chunk
        self.pos = 0
        return not self.eof

    def skip_space(self) -> Optional[str]:
        """The next non-whitespace character (not consumed), or None at the end of the file."""
        while True:
            text, pos = self.text, self.pos
            while pos < len(text) and text[pos] in _WHITESPACE:
                pos += 1
            self.pos = pos
            if pos < len(text):
                return text[pos]
            if not self.more():
                return None

    def decode(self) -> Any:
        """The JSON value at the current position; a window that cut it short is grown and retried."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.error(e.msg, e.pos) from None
                # Twice the unconsumed part (a record longer than a chunk doubles until it fits); e.pos is
                # stale after the window moved: the retry finds the error again if it is real.
                self.more(2 * (len(self.text) - self.pos))
                continue
            self.pos = end
            return value

    def error(self, msg: str, pos: int) -> json.JSONDecodeError:
        """json.loads's error for position `pos` of the window, with the whole text's line and column."""
        before = self.text[:pos]
        lineno = self.base_lines + before.count("\n") + 1
        last = self.base + before.rindex("\n") if "\n" in before else self.base_last_newline
        absolute = self.base + pos
        err = json.JSONDecodeError(msg, "", 0)  # the document is not at hand: set the position fields
        err.pos, err.lineno, err.colno = absolute, lineno, absolute - last
        err.args = (f"{msg}: line {lineno} column {absolute - last} (char {absolute})",)
        return err


def _read_json_list(path: str, f: TextIO) -> Iterator[Tuple[int, Any, Optional[DataError]]]:
    w = _Window(f)
    first = w.skip_space()
    if first is None:
        raise DataError("the file is empty (expected a JSON list of records)", file=path, reason="empty")
    if first != "[":  # not a list: a whole-file parse says what it is (or where it breaks)
        _not_a_list(path, w.text + f.read())
    w.pos += 1
    index = 0
    try:
        if w.skip_space() == "]":
            w.pos += 1
        else:
            while True:
                yield index, w.decode(), None
                index += 1
                sep = w.skip_space()
                if sep is None:
                    raise w.error("Expecting ',' delimiter", w.pos)
                w.pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    raise w.error("Expecting ',' delimiter", w.pos - 1)
                if w.skip_space() is None:
                    raise w.error("Expecting value", w.pos)
        if w.skip_space() is not None:
            raise w.error("Extra data", w.pos)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"not valid JSON: {e}", file=path, reason="bad_json") from e


def _not_a_list(path: str, text: str) -> None:
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"not valid JSON: {e}", file=path, reason="bad_json") from e
    raise DataError(f"expected a JSON list of records, got {type(records).__name__} "
                    "(use a .jsonl extension for one record per line)", file=path, reason="bad_json")

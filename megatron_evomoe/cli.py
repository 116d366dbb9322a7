"""What every command line of the project shares: range-checked numeric arguments, and one line
on stderr with exit status 2 for a user error instead of a traceback or a screen of usage.

A user error is a `ValueError` (ConfigError, DataError and ConversionError are ValueErrors, and
so is a file that does not parse), a `CheckpointError`, or an OSError of a path the user gave (a
file or folder that is missing, of the wrong kind, or not readable). Anything else is a bug in
this code and keeps its traceback.

    p = ArgumentParser(...)             # a bad argument: "prog: error: argument --limit: must be >= 1, got -1"
    p.add_argument("--limit", type=int_at_least(1))
    try:
        ...
    except USER_ERRORS as e:
        return user_error(e)          # prints "error: <one line>", returns 2
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional

from .checkpointing import CheckpointError

USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
EXIT_USER_ERROR = 2  # as argparse exits for a bad argument


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its error as one line (the usage is one --help away); exit status 2 as argparse's."""

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def one_line(e: BaseException) -> str:
    """The error's message on one line; an OSError as 'path: reason'."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or type(e).__name__}"
    return " ".join(str(e).split()) or type(e).__name__


def user_error(e: BaseException, prefix: str = "error") -> int:
    """Print `prefix: <message>` on stderr; the exit status for it."""
    print(f"{prefix}: {one_line(e)}", file=sys.stderr)
    return EXIT_USER_ERROR


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high) (high None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            bound = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] ((low, high] with low_open); nan and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not (math.isfinite(value) and inside):
            bound = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != math.inf else \
                f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {'in ' if high != math.inf else ''}{bound}, "
                                             f"got {text}")
        return value
    parse.__name__ = "number"
    return parse

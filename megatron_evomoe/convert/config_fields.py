"""Numbers read from a Hugging Face config.json, checked for type and range.

`int(cfg["num_attention_heads"])` turns "4" into 4 and 2.5 into 2 without a word, and a 0 only
fails later as a ZeroDivisionError deep in the head-size arithmetic; here each is a one-line
ConversionError naming the file and the field.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from .errors import ConversionError


def config_int(cfg: dict, key: str, where: str, default: Optional[int] = None, minimum: int = 1) -> int:
    """cfg[key] (or `default` when absent or null) as an int >= minimum; JSON ints only (no "4", no 2.5)."""
    value: Any = cfg.get(key)
    if value is None:
        if default is None:
            raise ConversionError(f"{where}: missing field {key!r}")
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConversionError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def config_float(cfg: dict, key: str, where: str, default: float) -> float:
    """cfg[key] (or `default` when absent or null) as a finite float; a JSON number, not a string."""
    value: Any = cfg.get(key)
    if value is None:
        return float(default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConversionError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)

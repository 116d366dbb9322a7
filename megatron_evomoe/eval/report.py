"""Writing a benchmark's result: a JSON file and a plain-text table of its metrics.

Every benchmark returns a result dict ``{"benchmark", "data", "metrics", "questions",
...}``; `write_report` stores it as ``<out_dir>/<benchmark>.json`` and prints the
rows it is given as a two-column table, followed by the result's ``metrics["notes"]`` (where a
result departs from what the official script would do, e.g. a metric it cannot compute).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence, TextIO, Tuple

Row = Tuple[str, Any]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(title: str, rows: Sequence[Row]) -> str:
    """Two columns, names left-aligned and values right-aligned, under a title line."""
    cells = [(str(name), _cell(value)) for name, value in rows]
    name_w = max([len("metric")] + [len(n) for n, _ in cells])
    value_w = max([len("value")] + [len(v) for _, v in cells])
    rule = "-" * (name_w + 2 + value_w)
    lines = [title, rule, f"{'metric':<{name_w}}  {'value':>{value_w}}", rule]
    lines += [f"{n:<{name_w}}  {v:>{value_w}}" for n, v in cells]
    lines.append(rule)
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> str:
    """Write `obj` as indented UTF-8 JSON, creating the parent folder."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def write_report(
    result: Mapping[str, Any],
    rows: Sequence[Row],
    out_dir: str,
    stream: Optional[TextIO] = None,
) -> str:
    """Store `result` as ``<out_dir>/<benchmark>.json``, print `rows`; return the JSON path."""
    name = result["benchmark"]
    path = write_json(os.path.join(out_dir, f"{name}.json"), result)
    notes = [f"note: {n}" for n in result["metrics"].get("notes", [])]
    print("\n".join([format_table(f"{name}  ({result.get('data', '')})", rows)] + notes),
          file=stream or sys.stdout)
    return path

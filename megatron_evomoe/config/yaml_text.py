"""Parsing the YAML of a config (a file or a `--section.field=value` override) strictly.

PyYAML's `safe_load` keeps the last of two equal keys of a mapping without a word, so a config
that sets `lr:` twice trains with whichever comes last; here a repeated key is a ConfigError
naming the source, the key's dotted path and both lines. A file that is not UTF-8 (a config saved
as Latin-1, a binary file passed by mistake) is named with the offset of its first bad byte
instead of a UnicodeDecodeError trace. Only the safe loader is used: no tag can run code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor` merges a mapping; its keys may be overridden


def read_yaml_file(path: Path) -> Any:
    """The YAML document of `path` (None when empty), or a one-line ConfigError."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); "
                          "save the config as UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str, root: str = "") -> Any:
    """YAML text -> Python data; `source` (a file, or `--stages` for an override) starts every message,
    `root` (`stages` for that override) the dotted path of a duplicate key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, source, root, set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        # PyYAML's message spans lines (context, mark, caret): one line, "source:line:column: problem"
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, source: str, where: str, seen: set) -> None:
    """Walk the node tree (an alias is the same node: visit it once) for a key set twice in one mapping."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, source, f"{where}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict = {}
    for key_node, value_node in node.value:
        path = where
        if key_node.tag != _MERGE_TAG and isinstance(key_node, yaml.ScalarNode):
            path = f"{where}.{key_node.value}" if where else key_node.value
            line = key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)  # `1:` and `"1":` are different keys
            if key in first_line:
                raise ConfigError(f"{source}:{line}: duplicate key '{path}' (first set on line {first_line[key]}, "
                                  f"again on line {line}; YAML would keep only the last)")
            first_line[key] = line
        _check_duplicate_keys(value_node, source, path, seen)

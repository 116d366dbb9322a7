"""Building a Config from YAML and `--section.field=value` overrides, with type checks.

Types are checked here, field by field, while the tree is built; the allowed values of
choice fields and every cross-field rule are checked afterwards by `validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Union

from .schema import Config, ConfigError, StageConfig, field_types
from .validation import validate
from .yaml_text import parse_yaml, read_yaml_file


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and mildly coerce: int -> float) `value` against annotation `tp`."""
    if typing.get_origin(tp) is Union:  # e.g. a stage's data: a file name or a mixture list, taken as given
        kinds = typing.get_args(tp)
        if type(value) not in kinds:
            raise ConfigError(f"{where}: expected {' or '.join(k.__name__ for k in kinds)}, got "
                              f"{type(value).__name__} ({value!r})")
        return value
    if typing.get_origin(tp) is Literal:  # a choice field: its type here, its values in validate()
        kinds = {type(c) for c in typing.get_args(tp)}
        assert len(kinds) == 1, f"choices of mixed types at {where}"
        tp = kinds.pop()
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # e.g. --moe.layers=1 or a numeric folder name
    if tp is str and isinstance(value, list) and all(type(v) is int for v in value):
        return ",".join(map(str, value))  # moe.layers: [1, 3]
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        return value
    raise AssertionError(f"unsupported config type {tp} at {where}")


# Keys of earlier versions: the unknown-key error says what replaced them
REPLACED = {
    "train.grad_accum_steps": " (replaced by train.global_batch_size, samples per optimizer step over all "
                              "data-parallel ranks, and stages.<name>.global_batch_size; the accumulation is "
                              "derived: global_batch_size / (micro_batch_size x dp))",
    "parallel.num_microbatches": " (removed: under pipeline parallelism the step's micro-batches, "
                                 "train.global_batch_size / (micro_batch_size x dp), are the pipeline's)",
}


def upgrade_saved_config(tree: dict) -> dict:
    """A config tree saved in a checkpoint of an earlier version, in today's keys (REPLACED): its
    train.grad_accum_steps becomes the global batch of one process (micro_batch_size x accumulation; the
    checkpoint does not record its world size) and parallel.num_microbatches is dropped."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    train, par = tree.get("train", {}), tree.get("parallel", {})
    accum = train.pop("grad_accum_steps", None)
    if accum is not None and "global_batch_size" not in train:
        train["global_batch_size"] = 0 if accum == 1 else train.get("micro_batch_size", 16) * accum
    par.pop("num_microbatches", None)
    return tree


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = REPLACED.get(f"{where}.{unknown[0]}") or _did_you_mean(unknown[0], names)
        raise ConfigError(f"{where}.{unknown[0]}: unknown key{hint} (valid keys: {', '.join(sorted(names))})"
                          if where else f"{unknown[0]}: unknown section{hint} (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, path)
        elif name == "stages" and cls is Config:
            if not isinstance(value, list):
                raise ConfigError("stages: expected a list of stages")
            kwargs[name] = [_from_dict(StageConfig, s, f"stages[{i}]") for i, s in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, tp, path)
    return cls(**kwargs)


def _did_you_mean(key: Any, valid: set) -> str:
    """' (did you mean 'hidden_size'?)' for a typo such as 'hiden_size', else ''."""
    close = difflib.get_close_matches(str(key), sorted(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(tree: dict, dotted: str, raw: str) -> None:
    """Set `tree[a][b]... = yaml(raw)` for `--a.b=raw`; list items by index or stage name."""
    parts = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, key, where)]
        else:
            if key not in node:
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--{dotted}: '{where}' is a value, not a section")
    value = parse_yaml(raw, f"--{dotted}", dotted) if raw != "" else ""
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(items: list, key: str, where: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ConfigError(f"--{where}: no list item with index or name '{key}'")


def _defaults_tree() -> dict:
    return dataclasses.asdict(Config())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + `section.field=value` overrides -> validated Config."""
    tree = _defaults_tree()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml_file(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _check_sections(loaded, str(path))
        tree = _merge(tree, loaded)
    for item in overrides or []:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override '{item}': expected --section.field=value")
        _check_sections({key.split(".")[0]: None}, "command line")
        _apply_override(tree, key, raw)
    cfg = _from_dict(Config, tree, "")
    validate(cfg)
    return cfg


def _check_sections(loaded: dict, source: str) -> None:
    valid = {f.name for f in dataclasses.fields(Config)}
    for key in loaded:
        if key not in valid:
            raise ConfigError(f"{key}: unknown section in {source}{_did_you_mean(key, valid)} "
                              f"(valid: {', '.join(sorted(valid))})")

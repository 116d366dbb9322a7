"""The bad-input corpus of issue #7: one broken input per case, each made from a valid piece of
the tiny bundled dataset or of the tiny config, with the outcome it must produce.

- RECORD_CASES: a record the dataset can drop. Without data.skip_bad_samples: a DataError
  "<file>: record <k> (id=...): field '<f>': <message>"; with it: a skip counted under `reason`.
  `lazy` cases are images that are only decoded when a sample is drawn (decoding every image up
  front is too slow for real datasets), so they are found mid-run, or up front with check_images.
- FILE_CASES: a data file of which nothing is usable: always a DataError naming the file, also
  with skipping on (skipping it whole would train on nothing, silently).
- CONFIG_CASES / YAML_CASES: a ConfigError whose message starts with the field.
The checkpoint cases need a trained checkpoint and live in test_bad_inputs.py.

Over-long conversations are not truncated (as LLaVA does): the image tokens could be cut, and an
answer cut off entirely leaves a sample with no supervised token, a zero-token loss that nobody
sees. They are an error naming the length and data.seq_len, or a counted skip ("too_long").

This module only writes files; the test module runs the table.
"""
from __future__ import annotations

import copy
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

# ----------------------------------------------------------------------------- broken image files


def _first_half(fmt: str) -> bytes:
    # incompressible pixels, so cutting the file in half cuts pixel data and not just a trailer
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


BROKEN_IMAGES = {
    "truncated.png": lambda: _first_half("PNG"),
    "truncated.jpg": lambda: _first_half("JPEG"),
    "not_an_image.png": lambda: b"<html>404 Not Found</html>\n",  # a failed download saved under the image name
    "empty.jpg": lambda: b"",
}


def write_broken_images(image_dir: Path) -> None:
    for name, make in BROKEN_IMAGES.items():
        (image_dir / name).write_bytes(make())


def corrupt_image(path: Path) -> bytes:
    """Make an existing image unreadable (as if overwritten mid-run); return its bytes to restore it."""
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    return good


def make_corpus(data_root: Path, out: Path) -> Path:
    """A private copy of the tiny dataset (so breaking it touches no other test) + the broken images."""
    shutil.copytree(data_root, out)
    write_broken_images(out / "images")
    return out


# ----------------------------------------------------------------------------- broken records


def _with(record: dict, **changes) -> dict:
    out = copy.deepcopy(record)
    for key, value in changes.items():
        if value is _DELETE:
            del out[key]
        else:
            out[key] = value
    return out


_DELETE = object()


def _turns(record: dict, human: Any = None, gpt: Any = None, human_role: Any = "human") -> list:
    conv = copy.deepcopy(record["conversations"])
    if human is not None:
        conv[0]["value"] = human
    if gpt is not None:
        conv[1]["value"] = gpt
    conv[0]["from"] = human_role
    return conv


@dataclass(frozen=True)
class RecordCase:
    name: str
    make: Callable[[dict], Any]  # a valid caption record (with an image) -> the broken record
    error: str  # regexp of what follows "<file>: record <k>[ (id=...)]: " in the message
    reason: str  # key under which data.skip_bad_samples counts it
    has_id: bool = True  # whether the message can name the record's id
    lazy: bool = False  # found when the image is decoded, not when the file is read


LONG = "<image>\n" + "circle " * 80  # > data.seq_len=84 tokens with the 4 image tokens of the tiny config

RECORD_CASES = [
    RecordCase("record_not_an_object", lambda r: ["not", "a", "record"],
               r"a record must be a JSON object, got list", "bad_record", has_id=False),
    RecordCase("record_null", lambda r: None, r"a record must be a JSON object, got NoneType", "bad_record",
               has_id=False),
    RecordCase("id_wrong_type", lambda r: _with(r, id=[1, 2]), r"field 'id': must be a string or an integer, got list",
               "bad_record", has_id=False),
    RecordCase("missing_conversations", lambda r: _with(r, conversations=_DELETE),
               r"field 'conversations': is missing", "missing_conversations"),
    RecordCase("conversations_a_string", lambda r: _with(r, conversations="What is in this picture?"),
               r"field 'conversations': must be a list of turns, got str", "bad_conversations"),
    RecordCase("conversations_empty", lambda r: _with(r, conversations=[]), r"field 'conversations': is empty",
               "bad_conversations"),
    RecordCase("turn_not_an_object", lambda r: _with(r, conversations=["hello", "world"]),
               r"field 'conversations\[0\]': each turn must be an object", "bad_conversations"),
    RecordCase("value_a_number", lambda r: _with(r, conversations=_turns(r, gpt=42)),
               r"field 'conversations\[1\]\.value': must be a string, got int", "bad_conversations"),
    RecordCase("value_missing", lambda r: _with(r, conversations=[{"from": "human"}, r["conversations"][1]]),
               r"field 'conversations\[0\]\.value': is missing", "bad_conversations"),
    RecordCase("unknown_role", lambda r: _with(r, conversations=_turns(r, human_role="robot")),
               r"field 'conversations\[0\]\.from': unknown role 'robot'", "bad_conversations"),
    RecordCase("turns_not_alternating", lambda r: _with(r, conversations=[r["conversations"][0]] * 2),
               r"field 'conversations\[1\]\.from': turns must alternate", "bad_conversations"),
    RecordCase("question_without_answer", lambda r: _with(r, conversations=r["conversations"][:1]),
               r"field 'conversations\[0\]': the last human turn has no gpt answer", "bad_conversations"),
    RecordCase("image_tag_without_image", lambda r: _with(r, image=_DELETE),
               r"field 'image': the first human turn has an <image> tag but the record has no image",
               "image_tag_mismatch"),
    RecordCase("image_without_tag", lambda r: _with(r, conversations=_turns(r, human="What is in this picture?")),
               r"field 'conversations\[0\]\.value': the record has an 'image' but its first human turn has no "
               r"<image> tag", "image_tag_mismatch"),
    RecordCase("two_image_tags", lambda r: _with(r, conversations=_turns(r, human="<image>\n<image>\nWhat is it?")),
               r"field 'conversations\[0\]\.value': holds 2 <image> tags", "image_tag_mismatch"),
    RecordCase("image_tag_in_answer", lambda r: _with(r, conversations=_turns(r, gpt="a <image> circle")),
               r"field 'conversations\[1\]\.value': a gpt turn may not hold the <image> tag", "image_tag_mismatch"),
    RecordCase("image_a_list", lambda r: _with(r, image=["train_00000.png", "train_00001.png"]),
               r"field 'image': must be a non-empty string \(one image per sample\)", "bad_image_field"),
    RecordCase("missing_image_file", lambda r: _with(r, image="no_such_image.png"),
               r"field 'image': image file not found: .*no_such_image\.png", "missing_image"),
    RecordCase("over_long_conversation", lambda r: _with(r, conversations=_turns(r, human=LONG)),
               r"field 'conversations': is \d+ tokens long after tokenisation \(including 4 image tokens\), "
               r"more than seq_len=84", "too_long"),
    RecordCase("truncated_png", lambda r: _with(r, image="truncated.png"),
               r"field 'image': .*truncated\.png: cannot decode image", "corrupt_image", lazy=True),
    RecordCase("truncated_jpeg", lambda r: _with(r, image="truncated.jpg"),
               r"field 'image': .*truncated\.jpg: cannot decode image \(OSError: image file is truncated",
               "corrupt_image", lazy=True),
    RecordCase("not_an_image", lambda r: _with(r, image="not_an_image.png"),
               r"field 'image': .*not_an_image\.png: cannot decode image \(UnidentifiedImageError",
               "corrupt_image", lazy=True),
    RecordCase("empty_image_file", lambda r: _with(r, image="empty.jpg"),
               r"field 'image': .*empty\.jpg: cannot decode image", "corrupt_image", lazy=True),
]


def record_id(record: Any) -> Any:
    return record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) else None


def write_records(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def good_records(root: Path, n: int) -> list:
    return json.loads((root / "captions.json").read_text())[:n]


def with_bad_record(root: Path, case: RecordCase, n_good: int = 6, at: int = 3) -> tuple[list, dict]:
    """`n_good` valid caption records with the case's broken record inserted at index `at`."""
    records = good_records(root, n_good + 1)
    bad = case.make(records[at])
    records[at] = bad
    return records, bad


# ----------------------------------------------------------------------------- broken data files


@dataclass(frozen=True)
class FileCase:
    name: str
    filename: str
    content: bytes
    error: str  # regexp of what follows "<file>: "


FILE_CASES = [
    FileCase("empty_json_file", "empty.json", b"", r"the file is empty"),
    FileCase("whitespace_json_file", "blank.json", b"\n  \n", r"the file is empty"),
    FileCase("json_syntax_error", "syntax.json", b'[{"id": "a", "conversations": [}]',
             r"not valid JSON: Expecting value: line 1 column 32 \(char 31\)"),
    FileCase("json_cut_off", "cut.json", b'[{"id": "a", "image": "train_00000.png", "conv', r"not valid JSON: "),
    FileCase("json_object_not_list", "object.json", b'{"id": "a", "conversations": []}',
             r"expected a JSON list of records, got dict"),
    FileCase("empty_list", "nothing.json", b"[]", r"has no records"),
    FileCase("empty_jsonl", "nothing.jsonl", b"\n\n", r"has no records"),
    FileCase("binary_not_utf8", "binary.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"is not UTF-8 text"),
]


# ----------------------------------------------------------------------------- broken configs


@dataclass(frozen=True)
class ConfigCase:
    name: str
    error: str  # regexp the ConfigError message must match from its start
    overrides: tuple = ()
    yaml: str | None = None  # written to a file given as the config


CONFIG_CASES = [
    # unknown keys, at every level
    ConfigCase("unknown_section", r"modle: unknown section in command line \(did you mean 'model'\?\)",
               ("--modle.hidden_size=64",)),
    ConfigCase("unknown_nested_key", r"model\.hiden_size: unknown key \(did you mean 'hidden_size'\?\)",
               ("--model.hiden_size=64",)),
    ConfigCase("unknown_stage_key", r"stages\[0\]\.stepz: unknown key \(did you mean 'steps'\?\)",
               ("--stages.s.stepz=3",)),
    ConfigCase("unknown_stage", r"--stages\.nope: no list item with index or name 'nope'", ("--stages.nope.steps=3",)),
    ConfigCase("field_used_as_section", r"--model\.hidden_size\.x: 'model\.hidden_size' is a value, not a section",
               ("--model.hidden_size.x=1",)),
    # values out of range
    ConfigCase("negative_lr", r"stages\[0\]\.lr: must be a finite number >= 0, got -0\.001", ("--stages.s.lr=-0.001",)),
    ConfigCase("infinite_lr", r"stages\[0\]\.lr: must be a finite number >= 0, got inf", ("--stages.s.lr=.inf",)),
    ConfigCase("min_lr_above_lr", r"stages\[0\]\.min_lr: must be in \[0, lr=0\.001\]", ("--stages.s.min_lr=0.01",)),
    ConfigCase("top_k_above_num_experts", r"moe\.top_k: 5 must be between 1 and moe\.num_experts=4",
               ("--moe.top_k=5",)),
    ConfigCase("seq_len_zero", r"data\.seq_len: must be positive", ("--data.seq_len=0",)),
    ConfigCase("drop_ratio_above_one", r"moe\.drop_ratio: must be in \[0, 1\]", ("--moe.drop_ratio=1.5",)),
    ConfigCase("negative_z_loss", r"moe\.z_loss_coeff: must be >= 0", ("--moe.z_loss_coeff=-0.1",)),
    ConfigCase("negative_clip_grad", r"train\.clip_grad: must be >= 0", ("--train.clip_grad=-1",)),
    ConfigCase("negative_weight_decay", r"train\.weight_decay: must be >= 0", ("--train.weight_decay=-0.1",)),
    ConfigCase("adam_beta_one", r"train\.adam_betas: must be \[beta1, beta2\] with 0 <= beta < 1",
               ("--train.adam_betas=[0.9, 1.0]",)),
    ConfigCase("log_interval_zero", r"train\.log_interval: must be >= 1", ("--train.log_interval=0",)),
    ConfigCase("negative_seed", r"train\.seed: must be in \[0, 2\*\*32\)", ("--train.seed=-1",)),
    ConfigCase("patch_size_zero", r"vision\.patch_size: must be positive", ("--vision.patch_size=0",)),
    ConfigCase("nan_norm_eps", r"model\.norm_eps: must be finite, got nan", ("--model.norm_eps=.nan",)),
    ConfigCase("empty_stage_name", r"stages\[0\]\.name: must not be empty", ("--stages.s.name=",)),
    # wrong types
    ConfigCase("float_for_int", r"model\.hidden_size: expected int, got float \(1\.5\)", ("--model.hidden_size=1.5",)),
    ConfigCase("string_for_bool", r"train\.bf16: expected bool, got str \('maybe'\)", ("--train.bf16=maybe",)),
    ConfigCase("null_for_int", r"model\.hidden_size: expected int, got NoneType", ("--model.hidden_size=null",)),
    ConfigCase("scalar_for_section", r"model: expected a mapping, got int", ("--model=5",)),
    ConfigCase("string_for_list", r"stages\[0\]\.trainable: expected a list, got str", ("--stages.s.trainable=llm.*",)),
    ConfigCase("scalar_for_stages", r"stages: expected a list of stages", ("--stages=5",)),
    # the same in YAML files
    ConfigCase("yaml_wrong_type", r"model\.hidden_size: expected int, got str \('big'\)",
               yaml="model:\n  hidden_size: big\n"),
    ConfigCase("yaml_list_for_section", r"train: expected a mapping, got list", yaml="train: [1, 2]\n"),
    ConfigCase("yaml_nested_typo", r"vision\.patch_sise: unknown key \(did you mean 'patch_size'\?\)",
               yaml="vision:\n  patch_sise: 4\n"),
    ConfigCase("yaml_unknown_section", r"trian: unknown section in .*\.yaml \(did you mean 'train'\?\)",
               yaml="trian:\n  seed: 1\n"),
    ConfigCase("yaml_syntax_error", r".*\.yaml:2:1: invalid YAML: expected ',' or '}', but got '<stream end>'",
               yaml="model: {hidden_size: 32\n"),
    ConfigCase("yaml_tab_indent", r".*\.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token",
               yaml="model:\n\thidden_size: 32\n"),
    ConfigCase("yaml_not_a_mapping", r".*\.yaml: top level must be a mapping", yaml="- model\n- train\n"),
    ConfigCase("yaml_nan", r"train\.clip_grad: must be finite, got nan", yaml="train:\n  clip_grad: .nan\n"),
]

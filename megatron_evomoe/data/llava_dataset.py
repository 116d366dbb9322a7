"""LLaVA-format datasets: instruction/caption conversations for training, POPE questions
for evaluation.

Input files: a JSON list of records (`.json`) or one record per line (`.jsonl`), as
LLaVA ships them:

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

"image" is relative to `image_root` (or absolute); records without "image" are
text-only.  Other keys are ignored.

Every record is validated and tokenised in the constructor, so that a bad record stops
the run before any training work, with a `DataError` naming the file, the record index
and id, and the field.  With `skip_bad_samples=True` bad records are dropped instead and
counted in `dataset.skipped` (reason -> count), with a one-line summary logged; nothing
is dropped silently.  Image pixels are decoded lazily in `__getitem__` (decoding every
image up front is too slow for real datasets; pass `check_images=True` to do it anyway),
so a corrupt image file raises `DataError` naming the file when it is first loaded.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .conversation import (DEFAULT_TEMPLATE, IGNORE_INDEX, IMAGE_TAG, ConversationTemplate, count_image_tags,
                           render_conversation, render_prompt)
from .errors import DataError
from .image_processing import CLIP_MEAN, CLIP_STD, ImageProcessor, load_image
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- reading files

def read_records(path: PathLike) -> Iterator[Tuple[int, Any, Optional[DataError]]]:
    """Yield (record_index, record, error) for a .json list or a .jsonl file.

    A .json file that does not parse, or is not a list, raises at once (nothing of it is
    usable).  In a .jsonl file an unparsable line is yielded as an error for that record
    (so it can be skipped and counted like any other bad record); blank lines are ignored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("data file not found", file=path, reason="missing_file")
    if path.endswith(".jsonl"):
        yield from _read_jsonl(path)
        return
    try:  # utf-8-sig: tolerate a byte-order mark, which editors on Windows add
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if not text.strip():
        raise DataError("the file is empty (expected a JSON list of records)", file=path, reason="empty")
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"not valid JSON: {e}", file=path, reason="bad_json") from e
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of records, got {type(records).__name__} "
                        "(use a .jsonl extension for one record per line)", file=path, reason="bad_json")
    for index, record in enumerate(records):
        yield index, record, None


def _read_jsonl(path: str) -> Iterator[Tuple[int, Any, Optional[DataError]]]:
    index = 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line), None
                except (json.JSONDecodeError, RecursionError) as e:
                    yield index, None, DataError(f"line {lineno} is not valid JSON: {e}", file=path, index=index,
                                                 reason="bad_json")
                index += 1
    except UnicodeDecodeError as e:  # the line structure past this point cannot be trusted
        raise _not_utf8(path, e) from None


def _not_utf8(path: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"is not UTF-8 text ({e.reason}); is it really a JSON file?", file=path, reason="bad_json")


def _image_error(e: DataError) -> DataError:
    """An image's DataError (which names the image file) re-homed to the record's `image` field, so
    that adding the context names the data file and the record too."""
    return DataError(str(e), field="image", reason=e.reason)


def _record_id(record: Any) -> Optional[Union[str, int]]:
    if isinstance(record, dict):
        rid = record.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            return rid
    return None


def _summarise_skips(path: str, num_records: int, skipped: Dict[str, int], first: Optional[str]) -> None:
    total = sum(skipped.values())
    if total == 0:
        logger.info("%s: %d records, none skipped", path, num_records)
        return
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    logger.warning("%s: skipped %d of %d records (%s); first: %s", path, total, num_records, reasons, first)


# --------------------------------------------------------------------------- training data

class LlavaDataset(Dataset):
    """Tokenised LLaVA conversations (+ images), padded to `seq_len`.

    `dataset[i]` -> {"input_ids": LongTensor [S], "labels": LongTensor [S],
    "image": FloatTensor [3, H, W] or None}.  input_ids are right-padded with
    `tokenizer.pad_id`; labels are IGNORE_INDEX (-100) on padding and prompts and are
    aligned with input_ids (the loss shifts them).  `dataset.collate` batches them.
    """

    def __init__(
        self,
        json_path: PathLike,
        image_root: Optional[PathLike],
        tokenizer: Tokenizer,
        seq_len: int,
        num_image_tokens: int,
        image_size: int,
        skip_bad_samples: bool = False,
        *,
        template: ConversationTemplate = DEFAULT_TEMPLATE,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        pad_to_square: bool = False,
        check_images: bool = False,
        overlong: str = "error",
        index_dir: Optional[PathLike] = None,
    ):
        if overlong != "error":
            raise NotImplementedError("data.overlong other than 'error'")  # (the token index, issue 13)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.json_path = os.fspath(json_path)
        self.image_root = "" if image_root is None else os.fspath(image_root)
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = int(image_size)
        self.skip_bad_samples = skip_bad_samples
        self.template = template
        self.check_images = check_images
        self.processor = ImageProcessor(image_size, image_mean, image_std, pad_to_square)

        self.skipped: Dict[str, int] = {}
        self.record_indices: List[int] = []  # index in the file of each kept sample
        self.record_ids: List[Optional[Union[str, int]]] = []
        self.image_paths: List[Optional[str]] = []
        # Token ids of all samples concatenated; sample k is tokens[offsets[k]:offsets[k+1]].
        tokens: List[np.ndarray] = []
        labels: List[np.ndarray] = []
        lengths: List[int] = [0]
        skipped: Counter = Counter()
        first_error: Optional[str] = None
        num_records = 0
        exists_cache: Dict[str, bool] = {}

        for index, record, error in read_records(self.json_path):
            num_records += 1
            rid = _record_id(record)
            try:
                if error is not None:
                    raise error
                ids, labs, image_path = self._prepare(record, exists_cache)
            except DataError as e:
                e = e.with_context(file=self.json_path, index=index, record_id=rid)
                if not skip_bad_samples:
                    raise e from None
                skipped[e.reason] += 1
                first_error = first_error or str(e)
                continue
            tokens.append(np.asarray(ids, dtype=np.int64))
            labels.append(np.asarray(labs, dtype=np.int64))
            lengths.append(len(ids))
            self.record_indices.append(index)
            self.record_ids.append(rid)
            self.image_paths.append(image_path)

        self.num_records = num_records
        self.skipped = dict(skipped)
        self._offsets = np.cumsum(lengths)
        self._tokens = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
        self._labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        _summarise_skips(self.json_path, num_records, self.skipped, first_error)
        if not num_records:
            raise DataError("has no records", file=self.json_path, reason="empty")
        if not self.record_indices:
            raise DataError(f"no usable records ({num_records} read, skipped: {self.skipped})",
                            file=self.json_path, reason="empty")

    def _prepare(self, record: Any, exists_cache: Dict[str, bool]) -> Tuple[List[int], List[int], Optional[str]]:
        """Validate one record; return (input_ids, labels, image path or None)."""
        if not isinstance(record, dict):
            raise DataError(f"a record must be a JSON object, got {type(record).__name__}", reason="bad_record")
        if "id" in record and (not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool)):
            raise DataError(f"must be a string or an integer, got {type(record['id']).__name__}", field="id",
                            reason="bad_record")
        if "conversations" not in record:
            raise DataError("is missing", field="conversations", reason="missing_conversations")

        image_path = None
        image = record.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise DataError(f"must be a non-empty string (one image per sample), got {image!r:.60}",
                                field="image", reason="bad_image_field")
            image_path = os.path.join(self.image_root, image)
            if image_path not in exists_cache:
                exists_cache[image_path] = os.path.isfile(image_path)
            if not exists_cache[image_path]:
                raise DataError(f"image file not found: {image_path}", field="image", reason="missing_image")
            if self.check_images:
                try:
                    load_image(image_path)
                except DataError as e:
                    raise _image_error(e) from None

        ids, labels = render_conversation(record["conversations"], self.tokenizer, self.num_image_tokens,
                                          has_image=image_path is not None, template=self.template)
        if len(ids) > self.seq_len:
            raise DataError(f"is {len(ids)} tokens long after tokenisation (including "
                            f"{self.num_image_tokens if image_path else 0} image tokens), more than seq_len="
                            f"{self.seq_len}", field="conversations", reason="too_long")
        return ids, labels, image_path

    def __len__(self) -> int:
        return len(self.record_indices)

    def num_tokens(self, i: int) -> int:
        """Unpadded length of sample i."""
        return int(self._offsets[i + 1] - self._offsets[i])

    @property
    def lengths(self) -> np.ndarray:
        """[N] unpadded length of every sample (image tokens included), for packing and length grouping."""
        return np.diff(self._offsets)

    def tokens(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample i unpadded: (input_ids LongTensor [L], labels LongTensor [L]), L = lengths[i]."""
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return torch.from_numpy(self._tokens[start:end]), torch.from_numpy(self._labels[start:end])

    def image(self, i: int) -> Optional[torch.Tensor]:
        """Sample i's preprocessed image [3, H, W], or None for a text-only sample; a DataError naming
        the data file, record and image when it cannot be loaded (images are decoded only here)."""
        if self.image_paths[i] is None:
            return None
        try:
            return self.processor(self.image_paths[i])  # [3, H, W]
        except DataError as e:
            raise _image_error(e).with_context(file=self.json_path, index=self.record_indices[i],
                                               record_id=self.record_ids[i]) from None

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i = i % len(self)
        ids, labs = self.tokens(i)
        input_ids = torch.full((self.seq_len,), self.tokenizer.pad_id, dtype=torch.long)  # [S]
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)  # [S]
        input_ids[: len(ids)] = ids
        labels[: len(labs)] = labs
        return {"input_ids": input_ids, "labels": labels, "image": self.image(i)}

    def collate(self, batch: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        return collate_llava(batch, self.image_size)


def collate_llava(batch: Sequence[Dict[str, Any]], image_size: int) -> Dict[str, torch.Tensor]:
    """Stack samples: input_ids/labels [B, S]; images [N, 3, H, W] of the N samples that
    have one, in batch order ([0, 3, H, W] if none); has_image BoolTensor [B] says which."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    input_ids = torch.stack([s["input_ids"] for s in batch])  # [B, S]
    labels = torch.stack([s["labels"] for s in batch])  # [B, S]
    has_image = torch.tensor([s["image"] is not None for s in batch], dtype=torch.bool)  # [B]
    images = [s["image"] for s in batch if s["image"] is not None]
    if images:
        pixel_values = torch.stack(images)  # [N, 3, H, W]
    else:
        pixel_values = torch.zeros(0, 3, image_size, image_size)
    return {"input_ids": input_ids, "labels": labels, "images": pixel_values, "has_image": has_image}


# --------------------------------------------------------------------------- POPE evaluation

POPE_LABELS = ("yes", "no")


class PopeSample(NamedTuple):
    image: torch.Tensor  # [3, H, W]
    prompt_ids: torch.Tensor  # LongTensor [P]: "[BOS] USER: <image tokens> {question} ASSISTANT:"
    label: Optional[str]  # "yes" / "no", or None when the question file carries no labels
    question_id: Union[int, str]
    text: str


class PopeDataset(Dataset):
    """POPE question file (.jsonl: {"question_id", "image", "text", "label"?, ...}).

    `dataset[i]` -> PopeSample(image, prompt_ids, label, question_id, text); the prompt
    is the same template as training, stopped after "ASSISTANT:" for generation.  Every
    line is validated up front, with the rules of training records (types, at most one
    `<image>` tag, the image file present, a length limit: `max_prompt_tokens`, which leaves
    room for the answer) and, with `require_labels`, a label on every question; evaluation
    data is never skipped, always an error.
    """

    def __init__(
        self,
        jsonl_path: PathLike,
        image_root: Optional[PathLike],
        tokenizer: Tokenizer,
        num_image_tokens: int,
        image_size: int,
        *,
        template: ConversationTemplate = DEFAULT_TEMPLATE,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        pad_to_square: bool = False,
        require_labels: bool = False,
        max_prompt_tokens: Optional[int] = None,
    ):
        self.path = os.fspath(jsonl_path)
        self.image_root = "" if image_root is None else os.fspath(image_root)
        self.processor = ImageProcessor(image_size, image_mean, image_std, pad_to_square)
        self.require_labels = require_labels
        self.questions: List[Dict[str, Any]] = []
        self.prompts: List[List[int]] = []
        for index, record, error in read_records(self.path):
            rid = record.get("question_id") if isinstance(record, dict) else None
            try:
                if error is not None:
                    raise error
                q = self._check(record)
                human = q["text"] if IMAGE_TAG in q["text"] else f"{IMAGE_TAG}\n{q['text']}"
                prompt = render_prompt(human, tokenizer, num_image_tokens, template)
                if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
                    raise DataError(f"is {len(prompt)} tokens long after tokenisation (including {num_image_tokens} "
                                    f"image tokens); at most {max_prompt_tokens} leave room for the answer within "
                                    "model.max_seq_len", field="text", reason="too_long")
            except DataError as e:
                raise e.with_context(file=self.path, index=index, record_id=rid) from None
            self.questions.append(q)
            self.prompts.append(prompt)
        if not self.questions:
            raise DataError("has no questions", file=self.path, reason="empty")

    def _check(self, record: Any) -> Dict[str, Any]:
        if not isinstance(record, dict):
            raise DataError(f"a question must be a JSON object, got {type(record).__name__}", reason="bad_record")
        for key, types in (("question_id", (int, str)), ("image", (str,)), ("text", (str,))):
            if key not in record:
                raise DataError("is missing", field=key, reason="bad_record")
            if not isinstance(record[key], types) or isinstance(record[key], bool):
                raise DataError(f"has the wrong type {type(record[key]).__name__}", field=key, reason="bad_record")
        count_image_tags(record["text"], "text")
        label = record.get("label")
        if label is None and self.require_labels:
            raise DataError("is missing (the evaluation scores the answers against it)", field="label",
                            reason="bad_record")
        if label is not None:
            if not isinstance(label, str) or label.strip().lower() not in POPE_LABELS:
                raise DataError(f"must be 'yes' or 'no', got {label!r}", field="label", reason="bad_record")
            label = label.strip().lower()
        path = os.path.join(self.image_root, record["image"])
        if not os.path.isfile(path):
            raise DataError(f"image file not found: {path}", field="image", reason="missing_image")
        return {"question_id": record["question_id"], "image": path, "text": record["text"], "label": label}

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> PopeSample:
        q = self.questions[i]
        try:
            image = self.processor(q["image"])
        except DataError as e:  # every record is kept, so i is the record's index in the file
            raise _image_error(e).with_context(file=self.path, index=i % len(self),
                                               record_id=q["question_id"]) from None
        return PopeSample(image, torch.tensor(self.prompts[i], dtype=torch.long), q["label"], q["question_id"],
                          q["text"])

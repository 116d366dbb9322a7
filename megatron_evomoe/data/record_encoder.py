"""Validation and tokenisation of LLaVA records into the token index's compact form.

Every check the dataset ever made lives here (record and id types, the image field and file, the
conversation's structure and `<image>` tags via `render_conversation`, the length limit), raising
`DataError`s with the same messages; `data.overlong` then decides what a too-long record becomes.

A kept record is stored with its image as ONE image-token id (the model's `num_image_tokens`
slots are expanded when the record is read) and its labels as spans of supervised positions:
labels are IGNORE_INDEX or the input id itself, which `_compact` asserts.

`RecordEncoder.encode_batch` turns a batch of raw records into one `EncodedBatch` of numpy arrays,
so that worker processes return a few arrays per batch, not Python objects per token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .conversation import IGNORE_INDEX, render_conversation
from .conversation_templates import DEFAULT_TEMPLATE
from .errors import DataError
from .image_processing import load_image
from .tokenizer import Tokenizer

OVERLONG_POLICIES = ("error", "truncate", "skip")


def record_id(record: Any):
    if isinstance(record, dict):
        rid = record.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            return rid
    return None


def image_error(e: DataError) -> DataError:
    """An image's DataError (which names the image file) re-homed to the record's `image` field, so
    that adding the context names the data file and the record too."""
    return DataError(str(e), field="image", reason=e.reason)


@dataclass
class EncodedBatch:
    """A batch of records, encoded: the kept records' stored ids one after another in `tokens`."""
    tokens: List[int] = field(default_factory=list)  # made one array [sum num_stored] by `encode_batch`
    num_stored: List[int] = field(default_factory=list)
    image_pos: List[int] = field(default_factory=list)  # stored position of the image id + 1; 0: none
    span_runs: List[int] = field(default_factory=list)  # per supervised span: gap before it, its length
    span_counts: List[int] = field(default_factory=list)
    ids: List[Any] = field(default_factory=list)  # each kept record's id (str, int or None)
    images: List[Optional[str]] = field(default_factory=list)  # the records' "image" (relative to image_root)
    truncated: List[int] = field(default_factory=list)  # batch positions of kept records that were cut
    bad: List[Tuple[int, Any, str, str]] = field(default_factory=list)  # (record index, id, reason, message)
    error: Optional[DataError] = None  # the first bad record when it may not be skipped (stops the build)


class RecordEncoder:
    def __init__(self, json_path: str, image_root: str, tokenizer: Tokenizer, seq_len: int, num_image_tokens: int,
                 *, template=DEFAULT_TEMPLATE, check_images: bool = False,
                 overlong: str = "error", skip_bad_samples: bool = False, token_dtype=np.uint16):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.json_path, self.image_root, self.tokenizer = json_path, image_root, tokenizer
        self.seq_len, self.num_image_tokens, self.template = seq_len, num_image_tokens, template
        self.check_images, self.overlong, self.skip_bad_samples = check_images, overlong, skip_bad_samples
        self.token_dtype = np.dtype(token_dtype)
        self._exists: Dict[str, bool] = {}

    def encode_batch(self, items: Sequence[Tuple[int, Any, Optional[DataError]]]) -> EncodedBatch:
        out = EncodedBatch()
        for index, record, error in items:
            rid = record_id(record)
            try:
                if error is not None:
                    raise error
                self._encode(record, out)
            except DataError as e:
                e = e.with_context(file=self.json_path, index=index, record_id=rid)
                skippable = self.skip_bad_samples or (e.reason == "too_long" and self.overlong != "error")
                if not skippable:
                    out.error = e
                    break
                out.bad.append((index, rid, e.reason, str(e)))
                continue
            out.ids.append(rid)
        out.tokens = self._stored(out.tokens)
        return out

    def _encode(self, record: Any, out: EncodedBatch) -> None:
        image_path = self._check(record)
        # Rendered with ONE image slot: the stored form (the n slots are n copies of it, expanded on read).
        ids, labels = render_conversation(record["conversations"], self.tokenizer, 1,
                                          has_image=image_path is not None, template=self.template)
        n_img = self.num_image_tokens if image_path else 0
        image_at = ids.index(self.tokenizer.image_token_id) if image_path else -1
        length = len(ids) + max(n_img - 1, 0)  # expanded
        truncated = False
        if length > self.seq_len:
            message = (f"is {length} tokens long after tokenisation (including {n_img} image tokens), more "
                       f"than seq_len={self.seq_len}")
            if self.overlong != "truncate":
                raise DataError(message, field="conversations", reason="too_long")
            if image_at + n_img > self.seq_len:  # LLaVA's cut keeps the image: here it would not fit
                raise DataError(message + "; its image tokens do not fit in seq_len (not truncated)",
                                field="conversations", reason="too_long")
            keep = self.seq_len - max(n_img - 1, 0)  # the text is cut at the end, as LLaVA's model_max_length
            ids, labels, truncated = ids[:keep], labels[:keep], True
        if truncated:
            out.truncated.append(len(out.num_stored))
        out.tokens += ids
        out.num_stored.append(len(ids))
        out.image_pos.append(image_at + 1)
        spans = supervised_spans(ids, labels)
        assert image_at < 0 or labels[image_at] == IGNORE_INDEX, "the image slot is supervised"
        # As run lengths (gap since the previous span's end, length): mostly < 256, so one byte each.
        out.span_runs += [b - a for a, b in zip([0] + spans, spans)]
        out.span_counts.append(len(spans) // 2)
        out.images.append(record.get("image"))

    def _check(self, record: Any) -> Optional[str]:
        """The record's structure, id and image field (the conversation is checked when rendered);
        its image path or None."""
        if not isinstance(record, dict):
            raise DataError(f"a record must be a JSON object, got {type(record).__name__}", reason="bad_record")
        if "id" in record and (not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool)):
            raise DataError(f"must be a string or an integer, got {type(record['id']).__name__}", field="id",
                            reason="bad_record")
        if "conversations" not in record:
            raise DataError("is missing", field="conversations", reason="missing_conversations")
        image = record.get("image")
        if image is None:
            return None
        if not isinstance(image, str) or not image:
            raise DataError(f"must be a non-empty string (one image per sample), got {image!r:.60}",
                            field="image", reason="bad_image_field")
        image_path = os.path.join(self.image_root, image)
        if image_path not in self._exists:
            self._exists[image_path] = os.path.isfile(image_path)
        if not self._exists[image_path]:
            raise DataError(f"image file not found: {image_path}", field="image", reason="missing_image")
        if self.check_images:
            try:
                load_image(image_path)
            except DataError as e:
                raise image_error(e) from None
        return image_path

    def _stored(self, ids: List[int]) -> np.ndarray:
        assert not ids or (min(ids) >= 0 and max(ids) <= np.iinfo(self.token_dtype).max), "token id out of range"
        return np.asarray(ids, dtype=self.token_dtype)


def supervised_spans(ids: Sequence[int], labels: Sequence[int]) -> List[int]:
    """[start0, end0, start1, end1, ...]: the runs of supervised positions; asserts that a supervised
    label is its input id (what lets the index store spans instead of labels).  A Python loop: 3x
    faster than numpy on a record's few hundred tokens."""
    spans: List[int] = []
    start = -1
    for k, lab in enumerate(labels):
        if lab == IGNORE_INDEX:
            if start >= 0:
                spans += (start, k)
                start = -1
            continue
        assert lab == ids[k], "a label that is neither IGNORE_INDEX nor its input id cannot be stored as spans"
        if start < 0:
            start = k
    if start >= 0:
        spans += (start, len(labels))
    return spans


# Worker processes: the encoder is installed once per worker (fork: inherited, no pickling).
_WORKER_ENCODER: Optional[RecordEncoder] = None


def install_worker_encoder(encoder: RecordEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def encode_in_worker(items) -> EncodedBatch:
    assert _WORKER_ENCODER is not None, "install_worker_encoder was not run in this worker"
    return _WORKER_ENCODER.encode_batch(items)

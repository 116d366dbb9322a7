"""LLaVA-format datasets: instruction/caption conversations for training, POPE questions
for evaluation.

Input files: a JSON list of records (`.json`) or one record per line (`.jsonl`), as
LLaVA ships them:

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

"image" is relative to `image_root` (or absolute); records without "image" are
text-only.  Other keys are ignored.

Every record is validated and tokenised once, into the token index (token_index.py) that
the constructor opens or builds: a bad record stops the run before any training work,
with a `DataError` naming the file, the record index and id, and the field.  With
`skip_bad_samples=True` bad records are dropped instead and counted in `dataset.skipped`
(reason -> count), with a one-line summary logged; nothing is dropped silently.  A record
longer than `seq_len` follows `overlong`: "error" (a bad record), "truncate" (text cut
at the end, the image kept; counted in `num_truncated`, ids in `truncated_ids`) or
"skip" (counted as "too_long").  The dataset is a view of the memory-mapped index and
pickles as its settings and the index folder.  Image pixels are decoded lazily in `__getitem__` (decoding every
image up front is too slow for real datasets; pass `check_images=True` to do it anyway),
so a corrupt image file raises `DataError` naming the file when it is first loaded.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .conversation import IGNORE_INDEX, count_image_tags, render_prompt
from .conversation_templates import DEFAULT_TEMPLATE, IMAGE_TAG
from .errors import DataError
from .image_processing import ImageProcessor
from .json_stream import read_records  # noqa: F401  (exported here too, as it always was)
from .record_encoder import image_error
from .token_index import TokenIndex, open_index
from .tokenizer import Tokenizer

PathLike = Union[str, os.PathLike]


def as_image_processor(image_processor: Union[ImageProcessor, int]) -> ImageProcessor:
    """A dataset's processor: one built from the run's `vision` config (`ImageProcessor.from_config`), or an
    image size alone for the defaults (CLIP crop and normalisation; tests, benchmarks)."""
    return image_processor if isinstance(image_processor, ImageProcessor) else ImageProcessor(int(image_processor))


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
        image_processor: Union[ImageProcessor, int],
        skip_bad_samples: bool = False,
        *,
        template=DEFAULT_TEMPLATE,
        check_images: bool = False,
        overlong: str = "error",
        index_dir: Optional[PathLike] = None,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.json_path = os.fspath(json_path)
        self.image_root = "" if image_root is None else os.fspath(image_root)
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.num_image_tokens = int(num_image_tokens)
        self.processor = as_image_processor(image_processor)
        self.image_size = self.processor.image_size
        self.skip_bad_samples = skip_bad_samples
        self.template = template
        self.check_images = check_images
        self.overlong = overlong
        self._index = open_index(self.json_path, self.image_root, tokenizer, self.seq_len, self.num_image_tokens,
                                 template=template, overlong=overlong, skip_bad_samples=skip_bad_samples,
                                 check_images=check_images, index_dir=index_dir)
        self.index_folder = self._index.folder
        self._index.summarise(self.json_path)
        if not self.num_records:
            raise DataError("has no records", file=self.json_path, reason="empty")
        if not len(self):
            raise DataError(f"no usable records ({self.num_records} read, skipped: {self.skipped})",
                            file=self.json_path, reason="empty")

    # Pickled (DataLoader workers, spawn) as its settings and the index folder; the maps are reopened.
    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._index = TokenIndex(self.index_folder)

    @property
    def index(self) -> TokenIndex:
        """The memory-mapped token index this dataset reads (its folder, manifest and counts)."""
        return self._index

    @property
    def num_records(self) -> int:
        """Records in the file, kept or not."""
        return self._index.num_records

    @property
    def skipped(self) -> Dict[str, int]:
        """reason -> number of records skipped when the file was read."""
        return dict(self._index.manifest["skipped"])

    @property
    def num_truncated(self) -> int:
        return self._index.manifest["num_truncated"]

    @property
    def record_indices(self) -> Sequence[int]:
        """Index in the file of each kept sample."""
        return self._index.record_indices

    @property
    def record_ids(self) -> Sequence[Optional[Union[str, int]]]:
        return self._index.record_ids

    @property
    def image_paths(self) -> Sequence[Optional[str]]:
        return self._index.image_paths

    @property
    def truncated_ids(self) -> Sequence[Optional[Union[str, int]]]:
        """Ids of the kept records that data.overlong=truncate cut to seq_len."""
        return self._index.truncated_ids

    @property
    def skipped_ids(self) -> Sequence[Optional[Union[str, int]]]:
        """Ids of the skipped records, in file order (their reasons: `skipped_reasons`)."""
        return self._index.skipped_ids

    @property
    def skipped_reasons(self) -> List[str]:
        return self._index.skipped_reasons

    def __len__(self) -> int:
        return len(self._index)

    def num_tokens(self, i: int) -> int:
        """Unpadded length of sample i."""
        return int(self._index.lengths[i])

    @property
    def lengths(self) -> np.ndarray:
        """[N] unpadded length of every sample (image tokens included), for packing and length grouping."""
        return self._index.lengths

    def tokens(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample i unpadded: (input_ids LongTensor [L], labels LongTensor [L]), L = lengths[i]."""
        ids, labels = self._index.tokens(i, self.tokenizer.image_token_id)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def image(self, i: int) -> Optional[torch.Tensor]:
        """Sample i's preprocessed image [3, H, W], or None for a text-only sample; a DataError naming
        the data file, record and image when it cannot be loaded (images are decoded only here)."""
        path = self.image_paths[i]
        if path is None:
            return None
        try:
            return self.processor(path)  # [3, H, W]
        except DataError as e:
            raise image_error(e).with_context(file=self.json_path, index=self.record_indices[i],
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
    prompt_ids: torch.Tensor  # LongTensor [P]: the template's prompt, image tokens expanded, up to the answer
    label: Optional[str]  # "yes" / "no", or None when the question file carries no labels
    question_id: Union[int, str]
    text: str


class PopeDataset(Dataset):
    """POPE question file (.jsonl: {"question_id", "image", "text", "label"?, ...}).

    `dataset[i]` -> PopeSample(image, prompt_ids, label, question_id, text); the prompt
    is the template of the evaluated stage (`template`), stopped where the answer starts.  Every
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
        image_processor: Union[ImageProcessor, int],
        *,
        template=DEFAULT_TEMPLATE,
        require_labels: bool = False,
        max_prompt_tokens: Optional[int] = None,
    ):
        self.path = os.fspath(jsonl_path)
        self.image_root = "" if image_root is None else os.fspath(image_root)
        self.processor = as_image_processor(image_processor)
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
            raise image_error(e).with_context(file=self.path, index=i % len(self),
                                               record_id=q["question_id"]) from None
        return PopeSample(image, torch.tensor(self.prompts[i], dtype=torch.long), q["label"], q["question_id"],
                          q["text"])

"""Render a LLaVA conversation into prompt text, then token ids and training labels.

The template (conversation_templates.py, chosen by `data.conversation_template`) gives the
text as pieces marked supervised or not; e.g. vicuna_v1 (LLaVA-1.5):

    {system} USER: <image>\\n{human} ASSISTANT: {gpt}</s>USER: {human} ASSISTANT: {gpt}</s>

- `conversation_text` / `question_text` return that text (LLaVA's `conv.get_prompt()`), the
  `<image>` tag still in it; `render_conversation` / `render_prompt` tokenise it as LLaVA's
  `tokenizer_image_token` does (split at the tag; BOS once, when the tokenizer adds one).
- `labels` has the same length and positions as `input_ids` (NOT shifted: the loss
  compares logits[:, :-1] with labels[:, 1:]).  It equals the token id on the gpt
  answers and the separator that ends each (vicuna_v1: </s>), and IGNORE_INDEX (-100)
  everywhere else: BOS, system text, roles, the human turns.
- The `<image>` tag may appear once, anywhere in the first human turn, and only when
  the record has an image.  A template with `image_first` (vicuna_v1, plain, chatml: LLaVA's
  preprocess_multimodal) makes that turn "<image>\\n" + its text stripped; the others (phi,
  stablelm, openchat: MoE-LLaVA's preprocess_multimodal) leave the tag and the text as they are.
  The tag becomes `num_image_tokens` copies of `tokenizer.image_token_id` so that the
  sequence length is known before the vision tower runs (the model overwrites those
  positions with image embeddings).

Records are validated here (structure, types, roles, tag placement); problems raise
`DataError` naming the field, e.g. "conversations[2].from".  The dataset adds the file
and record.  Turn roles accepted: human/user, gpt/assistant, and system (first only);
keys other than "from" and "value" are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from .conversation_templates import DEFAULT_TEMPLATE, IMAGE_TAG, Piece
from .errors import DataError
from .tokenizer import Tokenizer

IGNORE_INDEX = -100
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
SYSTEM_ROLE = "system"


@dataclass(frozen=True)
class ParsedConversation:
    system: Optional[str]
    turns: Tuple[Tuple[str, str], ...]  # (human, gpt) pairs
    human_indices: Tuple[int, ...]  # index in the record's list of each human turn, for messages


def _bad(message: str, field: str, reason: str = "bad_conversations") -> DataError:
    return DataError(message, field=field, reason=reason)


def parse_conversations(conversations: Any) -> ParsedConversation:
    """Check structure and types; return (system, [(human, gpt), ...])."""
    if not isinstance(conversations, list):
        raise _bad(f"must be a list of turns, got {type(conversations).__name__}", "conversations")
    if not conversations:
        raise _bad("is empty", "conversations")
    system: Optional[str] = None
    roles: List[str] = []
    values: List[str] = []
    for i, turn in enumerate(conversations):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _bad(f"each turn must be an object with 'from' and 'value', got {type(turn).__name__}", where)
        for key in ("from", "value"):
            if key not in turn:
                raise _bad("is missing", f"{where}.{key}")
            if not isinstance(turn[key], str):
                raise _bad(f"must be a string, got {type(turn[key]).__name__}", f"{where}.{key}")
        role = turn["from"].lower()
        if role == SYSTEM_ROLE:
            if i != 0:
                raise _bad("a 'system' turn may only come first", f"{where}.from")
            system = turn["value"]
            continue
        if role not in HUMAN_ROLES + GPT_ROLES:
            raise _bad(f"unknown role {turn['from']!r}; expected one of {HUMAN_ROLES + GPT_ROLES + (SYSTEM_ROLE,)}",
                       f"{where}.from")
        expected_human = len(roles) % 2 == 0
        if expected_human != (role in HUMAN_ROLES):
            want = "human" if expected_human else "gpt"
            raise _bad(f"turns must alternate human, gpt, human, ...; expected a '{want}' turn here, "
                       f"got {turn['from']!r}", f"{where}.from")
        roles.append(role)
        values.append(turn["value"])
    if not roles:
        raise _bad("has no human/gpt turns", "conversations")
    if len(roles) % 2 == 1:
        raise _bad("the last human turn has no gpt answer", f"conversations[{len(conversations) - 1}]")
    offset = 1 if system is not None else 0
    turns = tuple((values[k], values[k + 1]) for k in range(0, len(values), 2))
    human_indices = tuple(offset + k for k in range(0, len(values), 2))
    return ParsedConversation(system, turns, human_indices)


def check_image_tags(parsed: ParsedConversation, has_image: bool) -> None:
    """One `<image>` tag in the first human turn iff the record has an image."""
    first = parsed.human_indices[0]
    for k, (human, gpt) in enumerate(parsed.turns):
        h_idx = parsed.human_indices[k]
        if k > 0 and IMAGE_TAG in human:
            raise _bad(f"only the first human turn may hold the {IMAGE_TAG} tag", f"conversations[{h_idx}].value",
                       "image_tag_mismatch")
        if IMAGE_TAG in gpt:
            raise _bad(f"a gpt turn may not hold the {IMAGE_TAG} tag", f"conversations[{h_idx + 1}].value",
                       "image_tag_mismatch")
    if parsed.system is not None and IMAGE_TAG in parsed.system:
        raise _bad(f"the system turn may not hold the {IMAGE_TAG} tag", "conversations[0].value", "image_tag_mismatch")
    count = count_image_tags(parsed.turns[0][0], f"conversations[{first}].value")
    if has_image and count == 0:
        raise _bad(f"the record has an 'image' but its first human turn has no {IMAGE_TAG} tag",
                   f"conversations[{first}].value", "image_tag_mismatch")
    if not has_image and count == 1:
        raise _bad(f"the first human turn has an {IMAGE_TAG} tag but the record has no image", "image",
                   "image_tag_mismatch")


def count_image_tags(text: str, field: str) -> int:
    """0 or 1: the `<image>` tags of a prompt; more is a DataError on `field` (one image per sample)."""
    count = text.count(IMAGE_TAG)
    if count > 1:
        raise _bad(f"holds {count} {IMAGE_TAG} tags; one image per sample is supported", field, "image_tag_mismatch")
    return count


def place_image_tag(human: str, template) -> str:
    """The turn as the template's preprocess_multimodal leaves it: `template.image_first` (LLaVA's),
    "<image>\\n" + the rest, stripped; else (MoE-LLaVA's) unchanged."""
    if IMAGE_TAG not in human or not template.image_first:
        return human
    return f"{IMAGE_TAG}\n{human.replace(IMAGE_TAG, '').strip()}".strip()


def conversation_pieces(conversations: Any, template, has_image: bool) -> List[Piece]:
    """The template's (text, supervised) pieces of a whole record's conversation (validated here)."""
    parsed = parse_conversations(conversations)
    check_image_tags(parsed, has_image)
    turns = [(place_image_tag(human, template) if k == 0 else human, gpt) for k, (human, gpt) in enumerate(parsed.turns)]
    return template.pieces(parsed.system, turns)


def question_pieces(question: str, template, system: Optional[str] = None) -> List[Piece]:
    """The pieces of a prompt asking `question` (its `<image>` tag placed as in `place_image_tag`)."""
    count_image_tags(question, "prompt")
    return template.pieces(system, [(place_image_tag(question, template), None)])


def conversation_text(conversations: Any, template, has_image: bool) -> str:
    """The prompt text of a whole conversation, `<image>` tag included (what LLaVA tokenises)."""
    return "".join(text for text, _ in conversation_pieces(conversations, template, has_image))


def question_text(question: str, template, system: Optional[str] = None) -> str:
    """The prompt text that asks `question`, ending where the answer starts (LLaVA's conv.get_prompt())."""
    return "".join(text for text, _ in question_pieces(question, template, system))


def tokenize_pieces(pieces: Sequence[Piece], tokenizer: Tokenizer, num_image_tokens: int,
                    template) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of the joined text, tokenised as LLaVA's tokenizer_image_token does: split at
    `<image>`, each chunk tokenised whole, `num_image_tokens` image ids between, BOS once at the start
    when the tokenizer adds one.  A token is supervised iff its characters overlap a supervised piece."""
    text, ranges, at = "", [], 0
    for piece, supervised in pieces:
        if supervised and piece:
            ranges.append((at, at + len(piece)))
        text += piece
        at += len(piece)
    ids: List[int] = []
    spans: List[Tuple[int, int]] = []  # per id: its characters; image slots and BOS: empty
    if template.uses_tokenizer_bos and tokenizer.add_bos:
        ids.append(tokenizer.bos_id)
        spans.append((0, 0))
    chunks = text.split(IMAGE_TAG)
    if len(chunks) > 1 and num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1 for a sample with an image, got {num_image_tokens}")
    start = 0
    for k, chunk in enumerate(chunks):
        if k:
            ids += [tokenizer.image_token_id] * num_image_tokens
            spans += [(start, start)] * num_image_tokens
            start += len(IMAGE_TAG)
        chunk_ids, offsets = tokenizer.encode_with_offsets(chunk)
        ids += chunk_ids
        spans += [(start + a, start + b) for a, b in offsets]
        start += len(chunk)
    return ids, _labels(ids, spans, ranges)


def _labels(ids: Sequence[int], spans: Sequence[Tuple[int, int]], ranges: Sequence[Tuple[int, int]]) -> List[int]:
    labels = [IGNORE_INDEX] * len(ids)
    r = 0
    for k, (a, b) in enumerate(spans):  # both in text order: one pass
        while r < len(ranges) and ranges[r][1] <= a:
            r += 1
        if r < len(ranges) and a < b and a < ranges[r][1] and b > ranges[r][0]:
            labels[k] = ids[k]
    return labels


def render_prompt(question: str, tokenizer: Tokenizer, num_image_tokens: int, template=DEFAULT_TEMPLATE,
                  system: Optional[str] = None) -> List[int]:
    """Token ids of the prompt asking `question` (what generation continues); `<image>` becomes
    `num_image_tokens` image tokens."""
    return tokenize_pieces(question_pieces(question, template, system), tokenizer, num_image_tokens, template)[0]


def render_conversation(conversations: Any, tokenizer: Tokenizer, num_image_tokens: int, has_image: bool,
                        template=DEFAULT_TEMPLATE) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of a whole LLaVA conversation; see the module docstring."""
    return tokenize_pieces(conversation_pieces(conversations, template, has_image), tokenizer,
                           num_image_tokens, template)


def supervised_positions(labels: Sequence[int]) -> List[int]:
    """Positions whose label is trained on (handy for tests and debugging)."""
    return [i for i, t in enumerate(labels) if t != IGNORE_INDEX]

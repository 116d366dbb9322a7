"""Render a LLaVA conversation into token ids and training labels.

Template (Vicuna-v1 style, as LLaVA-1.5 uses), per turn:

    [BOS] USER: {human} ASSISTANT: {gpt}</s>USER: {human} ASSISTANT: {gpt}</s>...

- BOS once at the start (skipped for tokenizers that have none).
- A leading "system" turn, when present, is rendered before the first "USER:" and is
  never supervised.
- `labels` has the same length and positions as `input_ids` (NOT shifted: the loss
  compares logits[:, :-1] with labels[:, 1:]).  It equals the token id on the gpt
  answers and their EOS, and IGNORE_INDEX (-100) everywhere else: BOS, system text,
  "USER:", the human turns, "ASSISTANT:".
- The `<image>` tag may appear once, anywhere in the first human turn, and only when
  the record has an image; it becomes `num_image_tokens` copies of
  `tokenizer.image_token_id` so that the sequence length is known before the vision
  tower runs (the model overwrites those positions with image embeddings).

Records are validated here (structure, types, roles, tag placement); problems raise
`DataError` naming the field, e.g. "conversations[2].from".  The dataset adds the file
and record.  Turn roles accepted: human/user, gpt/assistant, and system (first only);
keys other than "from" and "value" are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from .errors import DataError
from .tokenizer import Tokenizer

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
SYSTEM_ROLE = "system"


@dataclass(frozen=True)
class ConversationTemplate:
    user: str = "USER:"
    assistant: str = "ASSISTANT:"

    def words(self) -> List[str]:
        """Strings a word-level vocabulary must cover for this template."""
        return [self.user, self.assistant]


DEFAULT_TEMPLATE = ConversationTemplate()


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


def render_prompt(
    human: str,
    tokenizer: Tokenizer,
    num_image_tokens: int,
    template: ConversationTemplate = DEFAULT_TEMPLATE,
    system: Optional[str] = None,
    add_bos: bool = True,
) -> List[int]:
    """Token ids of "[BOS] [system] USER: {human} ASSISTANT:" (what generation continues).

    The `<image>` tag, if any, becomes `num_image_tokens` image tokens.
    """
    ids: List[int] = []
    if add_bos and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
    head = f"{system.strip()} {template.user}" if system and system.strip() else template.user
    before, tag, after = human.partition(IMAGE_TAG)
    if tag:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1 for a sample with an image, got {num_image_tokens}")
        before, after = before.strip(), after.strip()
        ids += tokenizer.encode(f"{head} {before}" if before else head)
        ids += [tokenizer.image_token_id] * num_image_tokens
        ids += tokenizer.encode(f" {after} {template.assistant}" if after else f" {template.assistant}")
    else:
        ids += tokenizer.encode(f"{head} {human.strip()} {template.assistant}")
    return ids


def render_conversation(
    conversations: Any,
    tokenizer: Tokenizer,
    num_image_tokens: int,
    has_image: bool,
    template: ConversationTemplate = DEFAULT_TEMPLATE,
) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of a whole LLaVA conversation; see the module docstring."""
    parsed = parse_conversations(conversations)
    check_image_tags(parsed, has_image)
    input_ids: List[int] = []
    labels: List[int] = []
    for k, (human, gpt) in enumerate(parsed.turns):
        prompt = render_prompt(human, tokenizer, num_image_tokens, template,
                               system=parsed.system if k == 0 else None, add_bos=(k == 0))
        answer = tokenizer.encode(f" {gpt.strip()}") + [tokenizer.eos_id]
        input_ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return input_ids, labels


def supervised_positions(labels: Sequence[int]) -> List[int]:
    """Positions whose label is trained on (handy for tests and debugging)."""
    return [i for i, t in enumerate(labels) if t != IGNORE_INDEX]

"""The default template (vicuna_v1) through a word tokenizer: exact ids, exact supervised positions,
image-tag expansion and placement, validation."""
import pytest

from megatron_evomoe.data.conversation import (IGNORE_INDEX, render_conversation, render_prompt,
                                               supervised_positions)
from megatron_evomoe.data.conversation_templates import VICUNA_SYSTEM
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.tokenizer import WORD_SPECIAL_TOKENS, WordTokenizer, split_words

WORDS = ["USER", ":", "ASSISTANT", "What", "is", "this", "?", "a", "cat", ".", "And", "colour", "black", "Be",
         "brief"]
SYSTEM_WORDS = [w for w in dict.fromkeys(split_words(VICUNA_SYSTEM)) if w not in WORDS]
TOK = WordTokenizer(list(WORD_SPECIAL_TOKENS) + WORDS + SYSTEM_WORDS)
W = {w: i for i, w in enumerate(TOK.tokens)}  # USER=5, ':'=6, ASSISTANT=7, ... brief=19
IMG = TOK.image_token_id
SYS = TOK.encode(VICUNA_SYSTEM)  # the template's system prompt, before the first "USER:"
S = len(SYS)

# A record as LLaVA ships it: string id, image path, extra keys at record and turn level.
RECORD = {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "model": "",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "a cat.", "weight": 1.0},
        {"from": "human", "value": "And colour?"},
        {"from": "gpt", "value": "black."},
    ],
}


def test_two_turn_record_exact_ids_and_supervised_positions():
    ids, labels = render_conversation(RECORD["conversations"], TOK, num_image_tokens=3, has_image=True)
    expected = [TOK.bos_id] + SYS + [W["USER"], W[":"], IMG, IMG, IMG, W["What"], W["is"], W["this"], W["?"],
                W["ASSISTANT"], W[":"], W["a"], W["cat"], W["."], TOK.eos_id,
                W["USER"], W[":"], W["And"], W["colour"], W["?"], W["ASSISTANT"], W[":"],
                W["black"], W["."], TOK.eos_id]
    assert ids == expected
    assert len(labels) == len(ids)
    # Supervised: "a cat . </s>" (positions S+12..S+15) and "black . </s>" (S+23..S+25); nothing else.
    want = [S + p for p in (12, 13, 14, 15, 23, 24, 25)]
    assert supervised_positions(labels) == want
    assert all(labels[p] == ids[p] for p in supervised_positions(labels))
    assert all(labels[p] == IGNORE_INDEX for p in range(len(ids)) if p not in want)


@pytest.mark.parametrize("n", [1, 5, 24])
def test_image_tag_expands_to_num_image_tokens(n):
    ids, labels = render_conversation(RECORD["conversations"], TOK, num_image_tokens=n, has_image=True)
    assert ids.count(IMG) == n
    first = ids.index(IMG)
    assert ids[first:first + n] == [IMG] * n  # contiguous
    assert all(labels[first + k] == IGNORE_INDEX for k in range(n))
    assert len(ids) == 1 + S + 22 + n


def test_image_tag_anywhere_in_first_turn_goes_first():
    # As LLaVA's preprocess_multimodal: the tag is taken out and the turn becomes "<image>\n" + its text.
    want = [TOK.bos_id] + SYS + [W["USER"], W[":"], IMG, IMG, W["What"], W["is"], W["this"], W["?"],
                                 W["ASSISTANT"], W[":"]]
    assert render_prompt("What is <image> this?", TOK, 2) == want
    assert render_prompt("What is this?\n<image>", TOK, 2) == want


def test_text_only_and_system_and_role_aliases():
    conv = [{"from": "system", "value": "Be brief."},
            {"from": "user", "value": "What is this?"},
            {"from": "assistant", "value": "a cat."}]
    ids, labels = render_conversation(conv, TOK, num_image_tokens=4, has_image=False)
    assert IMG not in ids
    assert ids == [TOK.bos_id, W["Be"], W["brief"], W["."], W["USER"], W[":"], W["What"], W["is"], W["this"],
                   W["?"], W["ASSISTANT"], W[":"], W["a"], W["cat"], W["."], TOK.eos_id]
    assert supervised_positions(labels) == [12, 13, 14, 15]


def _field_error(conv, has_image=False):
    with pytest.raises(DataError) as info:
        render_conversation(conv, TOK, num_image_tokens=2, has_image=has_image)
    return info.value


H = {"from": "human", "value": "What is this?"}
G = {"from": "gpt", "value": "a cat."}


@pytest.mark.parametrize("conv, field, text", [
    ("hello", "conversations", "must be a list"),
    ([], "conversations", "is empty"),
    ([H, "a cat."], "conversations[1]", "must be an object"),
    ([H, {"from": "gpt"}], "conversations[1].value", "is missing"),
    ([H, {"from": "gpt", "value": 3}], "conversations[1].value", "must be a string, got int"),
    ([{"from": "robot", "value": "hi"}, G], "conversations[0].from", "unknown role 'robot'"),
    ([H, G, G], "conversations[2].from", "expected a 'human' turn"),
    ([G, H], "conversations[0].from", "expected a 'human' turn"),
    ([H, G, H], "conversations[2]", "has no gpt answer"),
    ([H, {"from": "system", "value": "x"}, G], "conversations[1].from", "may only come first"),
])
def test_malformed_conversations_name_the_field(conv, field, text):
    err = _field_error(conv)
    assert err.field == field
    assert f"field '{field}'" in str(err) and text in str(err)


@pytest.mark.parametrize("conv, has_image, field, text", [
    ([{"from": "human", "value": "<image> What is <image> this?"}, G], True, "conversations[0].value", "2 <image>"),
    ([H, G, {"from": "human", "value": "<image>"}, G], True, "conversations[2].value", "only the first human"),
    ([H, G], True, "conversations[0].value", "has no <image> tag"),
    ([{"from": "human", "value": "<image>\nWhat is this?"}, G], False, "image", "record has no image"),
    ([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "<image>"}], True,
     "conversations[1].value", "gpt turn"),
])
def test_image_tag_mismatch(conv, has_image, field, text):
    err = _field_error(conv, has_image)
    assert err.reason == "image_tag_mismatch"
    assert err.field == field and text in str(err)

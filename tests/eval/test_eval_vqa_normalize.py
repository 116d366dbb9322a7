"""Official VQA answer normalisation and leave-one-out VQA accuracy."""
import pytest

from megatron_evomoe.eval.textvqa import vqa_accuracy
from megatron_evomoe.eval.vqa_normalize import (
    CONTRACTIONS, normalize_answer, strip_punctuation, tokenize,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("the cat.", "cat"),
    ("A Dog!", "dog"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),             # only none..ten are number words
    ("3.5", "3.5"),                   # a decimal point stays
    ("2.", "2"),
    ("t-shirt", "t shirt"),           # mark inside a word -> space
    ("yes - no", "yes no"),           # mark next to a space -> deleted
    ("(approx)", "approx"),
    ("1,000", "1000"),                # commas are dropped by the tokenizer
    ("Hello, World?", "hello world"),
    ("cat's toy", "cat 's toy"),      # possessive split off
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),       # two apostrophes missing: not in the table
    ("yall'd've", "y'all'd've"),
    ("twas", "'twas"),
    ("somebody'd", "somebodyd"),      # official table quirk
    ("lets", "lets"),
    ("it's a sign", "it 's sign"),
    ("Stop\tsign\n", "stop sign"),
    ("50% off: #1 & *", "50% off: #1 & *"),  # these marks are not punctuation
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_steps_separately():
    assert tokenize("  What's THIS, ok?  ") == "what 's this ok"
    # A digit,digit comma anywhere makes every mark be deleted instead of spaced.
    assert strip_punctuation("1,000 (a-b)") == "1000 ab"
    assert strip_punctuation("(a-b)") == " a b "
    assert len(CONTRACTIONS) == 118


def test_at_most_32_periods_are_stripped():
    assert normalize_answer("x." * 40) == "x" * 32 + "x." * 8


@pytest.mark.parametrize("num_matches, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(num_matches, expected):
    humans = ["two"] * num_matches + [f"other{i}" for i in range(10 - num_matches)]
    assert vqa_accuracy("2", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    humans = ["The Cat", "cat.", "a cat"] + ["dog"] * 7
    assert vqa_accuracy("CAT!", humans) == pytest.approx(0.9)
    assert vqa_accuracy("dogs", humans) == 0.0

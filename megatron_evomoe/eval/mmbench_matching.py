"""MMBench answer extraction: VLMEvalKit's exact matching, with no LLM judge.

The rules of VLMEvalKit's ``can_infer`` (``vlmeval/utils/matching_util.py``, as of
its 2026 sources), applied to a free-form answer and the question's options
``{letter: text}``:

1. Option letters.  An answer holding "Failed to obtain answer via API" infers
   nothing here (go to 2).  One holding a refusal sentence (`REFUSALS`) is
   `NO_OPTION` ("Z": none of the options, a wrong answer).  Otherwise the
   characters ``.()[],:;!*#{}`` become spaces and the answer is split into words:
   - exactly one option letter among the words: that letter, but only when it
     occurs within the last four words (so "A" as an article at the start of a
     long sentence is not read as option A);
   - no option letter but a word "Z": `NO_OPTION`;
   - otherwise (or a single letter too early): the first "answer is <letter>"
     (any case, ``**`` allowed around the letter, letters A-D) names the
     option, if that letter is one of the options.
2. Option texts, when 1 inferred nothing: if the lower-cased answer is at most
   twice as long as all option texts together and exactly one lower-cased option
   text occurs in it, that option.
3. Otherwise nothing is inferred (None).  VLMEvalKit then asks its LLM judge; with
   no judge (its ``exact_matching`` mode, and here) the answer counts as wrong.

VLMEvalKit also has a debugging switch (the ``VERBOSE`` environment variable) that
rejects any multi-word answer holding the word "A"; it is off by default and not
reproduced.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

NO_OPTION = "Z"
API_FAILURE = "Failed to obtain answer via API"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SPLIT_CHARS = ".()[],:;!*#{}"
_LAST_WORDS = 4   # a lone option letter counts only among the answer's last four words
# "answer is B", "The correct answer is **b**": only the letters A-D, in any case.
_ANSWER_IS = re.compile(r"answer\s+is\s+\**([a-d])", re.IGNORECASE)


def _words(answer: str) -> list:
    for ch in _SPLIT_CHARS:
        answer = answer.replace(ch, " ")
    return answer.split()


def infer_option(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """Rule 1: the option letter the answer names, `NO_OPTION`, or None."""
    if API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return NO_OPTION
    words = _words(answer)
    named = [c for c in options if c in words]
    if len(named) == 1 and words.index(named[0]) >= len(words) - _LAST_WORDS:
        return named[0]
    if not named and NO_OPTION in words:
        return NO_OPTION
    m = _ANSWER_IS.search(answer)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def infer_text(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """Rule 2: the one option whose text occurs in the (not too long) answer, or None."""
    text = answer.lower()
    if len(text) > 2 * sum(len(o) for o in options.values()):
        return None
    named = [c for c, o in options.items() if o.lower() in text]
    return named[0] if len(named) == 1 else None


def infer_choice(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """The letter an answer picks among `options` ({letter: text}), `NO_OPTION`, or None
    (nothing inferred: where VLMEvalKit would ask its LLM judge)."""
    return infer_option(answer, options) or infer_text(answer, options)

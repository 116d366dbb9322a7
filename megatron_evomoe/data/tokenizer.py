"""Tokenizers: one small interface, a word-level tokenizer for the bundled data, and a
wrapper around any local Hugging Face `tokenizer.json`.

`encode` never adds BOS/EOS: the conversation template (conversation.py) places them, BOS
only where the tokenizer itself would add one (`add_bos`, as LLaVA's `tokenizer_image_token`).
`encode_with_offsets` also gives each token's character span, which is how the template finds
the supervised tokens of a text tokenised whole.  Every tokenizer has an `<image>` token; the
template expands the `<image>` tag of a LLaVA record into `num_image_tokens` copies of
`image_token_id`, which the model later overwrites with image embeddings.

On disk:
- WordTokenizer: `DIR/vocab.json` = {"type": "word", "version": 1, "tokens": [...]}
  (token i has id i; the special tokens come first).
- HFTokenizer: `DIR/tokenizer.json` (+ optional `tokenizer_config.json`, read for the
  names of the bos/eos/pad tokens, `add_bos_token` and the Jinja `chat_template`, which
  transformers may also save as `DIR/chat_template.jinja`).
`load_tokenizer(DIR)` picks the right one.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import DataError

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
WORD_SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 of every WordTokenizer

WORD_VOCAB_FILE = "vocab.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"

Offsets = List[Tuple[int, int]]  # per token: [start, end) in the encoded text


class Tokenizer:
    """What the data pipeline and the model need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: Optional[int]  # None for tokenizers without one (e.g. Qwen2): then no BOS is added
    eos_id: int
    image_token_id: int
    add_bos: bool  # whether a sequence starts with BOS (what the tokenizer's own encoding does)
    chat_template: Optional[str] = None  # the Jinja template of tokenizer_config.json, if any

    def encode(self, text: str) -> List[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        raise NotImplementedError

    def special_tokens(self) -> Dict[str, Optional[str]]:
        """bos_token / eos_token / pad_token strings, for a Jinja chat template."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- word level

# A special token written literally, or a run of word characters, or one punctuation mark.
_WORD_RE = re.compile("|".join(re.escape(t) for t in WORD_SPECIAL_TOKENS) + r"|\w+|[^\w\s]")
_NO_SPACE_BEFORE = set(".,?!:;)]}%")
_NO_SPACE_AFTER = set("([{")


def split_words(text: str) -> List[str]:
    """Whitespace + punctuation split: 'a red circle.' -> ['a', 'red', 'circle', '.']."""
    return _WORD_RE.findall(text)


class WordTokenizer(Tokenizer):
    """Case-sensitive word-level tokenizer; unknown words map to `<unk>`.

    `decode(encode(t))` gives `t` back with its whitespace normalised (single spaces,
    none before closing punctuation) when every word of `t` is in the vocabulary.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(WORD_SPECIAL_TOKENS)]) != WORD_SPECIAL_TOKENS:
            raise ValueError(f"a WordTokenizer vocabulary must start with {WORD_SPECIAL_TOKENS}")
        if len(set(tokens)) != len(tokens):
            dup = [t for t, n in Counter(tokens).items() if n > 1][:5]
            raise ValueError(f"duplicate tokens in vocabulary: {dup}")
        self.tokens = tokens
        self.token_to_id: Dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.vocab_size = len(tokens)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.image_token_id = range(5)
        self.add_bos = True

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1, extra_words: Iterable[str] = ()) -> "WordTokenizer":
        """Vocabulary of every word seen at least `min_freq` times, plus `extra_words`.

        Ordered by decreasing frequency, ties alphabetically, so the same corpus always
        gives the same ids.
        """
        counts: Counter = Counter()
        for text in texts:
            counts.update(split_words(text))
        for word in extra_words:
            for w in split_words(word):
                counts[w] = max(counts[w], min_freq)
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in WORD_SPECIAL_TOKENS),
                       key=lambda w: (-counts[w], w))
        return cls(list(WORD_SPECIAL_TOKENS) + words)

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        get = self.token_to_id.get
        words = list(_WORD_RE.finditer(text))
        return [get(m.group(), self.unk_id) for m in words], [m.span() for m in words]

    def special_tokens(self) -> Dict[str, Optional[str]]:
        return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: List[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if skip_special_tokens and i < len(WORD_SPECIAL_TOKENS) and i != self.unk_id:
                continue
            out.append(self.tokens[i])
        text = ""
        for k, w in enumerate(out):
            if k > 0 and w not in _NO_SPACE_BEFORE and out[k - 1] not in _NO_SPACE_AFTER:
                text += " "
            text += w
        return text

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        payload = {"type": "word", "version": 1, "tokens": self.tokens}
        _atomic_write_text(os.path.join(directory, WORD_VOCAB_FILE), json.dumps(payload, indent=0))

    @classmethod
    def load(cls, directory: str) -> "WordTokenizer":
        path = os.path.join(directory, WORD_VOCAB_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read WordTokenizer vocabulary: {e}", file=path, reason="bad_tokenizer") from e
        if not isinstance(payload, dict) or payload.get("type") != "word" or not isinstance(payload.get("tokens"), list):
            raise DataError("not a WordTokenizer vocabulary (expected {'type': 'word', 'tokens': [...]})",
                            file=path, field="type", reason="bad_tokenizer")
        return cls(payload["tokens"])


# --------------------------------------------------------------------------- Hugging Face

_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<eos>", "<|eot_id|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _import_tokenizers():
    try:
        import tokenizers  # noqa: F401  (imported lazily: only HFTokenizer needs it)
    except ImportError as e:
        raise ImportError(
            "HFTokenizer needs the Hugging Face `tokenizers` package: pip install tokenizers"
        ) from e
    return tokenizers


def _config_token(config: dict, key: str) -> Optional[str]:
    """tokenizer_config.json stores e.g. "eos_token" as a string or as {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """Wraps a local Hugging Face tokenizer directory (one with `tokenizer.json`).

    BOS/EOS/PAD are taken from `tokenizer_config.json` when it names them, else from
    well-known token strings present in the vocabulary.  No EOS is an error; no BOS
    means `bos_id = None`; no PAD falls back to EOS (pads are masked out anyway).
    `<image>` is added as a special token when absent.  `add_bos`: `add_bos_token` of the
    config when it sets one, else whether the tokenizer's post-processor starts a sequence
    with BOS (Llama: yes; Qwen2, Phi-2, StableLM-2: no, though Phi-2 names a bos_token).
    """

    def __init__(self, directory: str):
        tokenizers = _import_tokenizers()
        path = os.path.join(directory, HF_TOKENIZER_FILE)
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(f"cannot load Hugging Face tokenizer: {e}", file=path, reason="bad_tokenizer") from e
        self.directory = directory
        self.config: dict = {}
        config_path = os.path.join(directory, HF_CONFIG_FILE)
        if os.path.exists(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    self.config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"cannot read tokenizer config: {e}", file=config_path, reason="bad_tokenizer") from e

        if self._tok.token_to_id(IMAGE) is None:
            self._tok.add_special_tokens([tokenizers.AddedToken(IMAGE, special=True, normalized=False)])
        self.image_token_id = self._tok.token_to_id(IMAGE)

        self.bos_token = self._find_token("bos_token", _BOS_CANDIDATES)
        self.eos_token = self._find_token("eos_token", _EOS_CANDIDATES)
        if self.eos_token is None:
            raise DataError(f"no end-of-sequence token found (set 'eos_token' in {HF_CONFIG_FILE} or use one of "
                            f"{_EOS_CANDIDATES})", file=path, field="eos_token", reason="bad_tokenizer")
        self.pad_token = self._find_token("pad_token", _PAD_CANDIDATES) or self.eos_token
        self.bos_id = None if self.bos_token is None else self._tok.token_to_id(self.bos_token)
        self.eos_id = self._tok.token_to_id(self.eos_token)
        self.pad_id = self._tok.token_to_id(self.pad_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.add_bos = self._adds_bos()
        self.chat_template = self._read_chat_template()

    def _adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        if isinstance(self.config.get("add_bos_token"), bool):
            return self.config["add_bos_token"]
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def _read_chat_template(self) -> Optional[str]:
        """The default chat template: a string, or the one named "default" of a list of {name, template}."""
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        path = os.path.join(self.directory, HF_CHAT_TEMPLATE_FILE)
        if not isinstance(template, str) and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                template = f.read()
        return template if isinstance(template, str) and template.strip() else None

    def _find_token(self, key: str, candidates: Sequence[str]) -> Optional[str]:
        named = _config_token(self.config, key)
        if named is not None and self._tok.token_to_id(named) is not None:
            return named
        for token in candidates:
            if self._tok.token_to_id(token) is not None:
                return token
        return None

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def special_tokens(self) -> Dict[str, Optional[str]]:
        named = {key: _config_token(self.config, key) for key in ("unk_token",)}
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token, **named}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, HF_TOKENIZER_FILE))
        config = dict(self.config)
        config.update({"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                       "add_bos_token": self.add_bos})
        if self.chat_template is not None:  # (it may have come from chat_template.jinja)
            config["chat_template"] = self.chat_template
        _atomic_write_text(os.path.join(directory, HF_CONFIG_FILE), json.dumps(config, indent=2))


# --------------------------------------------------------------------------- loading

def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer saved in directory `path`: `tokenizer.json` -> HFTokenizer,
    a WordTokenizer `vocab.json` -> WordTokenizer."""
    path = str(path)
    if not os.path.isdir(path):
        raise DataError("tokenizer directory does not exist", file=path, reason="bad_tokenizer")
    if os.path.exists(os.path.join(path, HF_TOKENIZER_FILE)):
        return HFTokenizer(path)
    if os.path.exists(os.path.join(path, WORD_VOCAB_FILE)):
        return WordTokenizer.load(path)
    raise DataError(
        f"no tokenizer found: expected '{HF_TOKENIZER_FILE}' (Hugging Face) or '{WORD_VOCAB_FILE}' (WordTokenizer)",
        file=path, reason="bad_tokenizer")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)

"""Qwen-1's tiktoken vocabulary (``qwen.tiktoken``) as a Hugging Face ``tokenizer.json``.

Qwen-1 ships no tokenizer.json: its remote ``tokenization_qwen.py`` runs tiktoken on
``qwen.tiktoken`` (one ``base64(token bytes) rank`` per line). Our tokenizer loader reads
tokenizer.json, so the import writes one that encodes to the same ids, with the `tokenizers`
package alone (no tiktoken):
- text is NFC-normalised, then split by Qwen's regex (contractions, letter runs, single digits,
  punctuation runs, newlines, spaces), each piece as UTF-8 bytes;
- a piece that is itself a token is that token; otherwise byte pairs merge lowest rank first:
  a byte-level BPE whose merges are every (left, right) split of each token into two tokens,
  ordered by the token's rank, and whose whole-piece lookup comes first (``ignore_merges``);
- the special tokens follow the ranks: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<|extra_0|>`` .. ``<|extra_204|>`` (ids 151643.. in Qwen-1), matched anywhere in the text.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Dict, List, Tuple

from .errors import ConversionError

QWEN_VOCAB_FILE = "qwen.tiktoken"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ENDOFTEXT = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
QWEN_TOKENIZER_NOTE = (f"Qwen-1's {QWEN_VOCAB_FILE} written as tokenizer/tokenizer.json (byte-level BPE with the "
                       "same ids as its tiktoken tokenizer, special tokens after the ranks; tiktoken not needed)")


def read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    """{token bytes: rank} of a tiktoken file; ranks must be 0..n-1 (they become the token ids)."""
    ranks: Dict[bytes, int] = {}
    for num, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ConversionError(f"{path}:{num}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConversionError(f"{path}: ranks are not 0..{len(ranks) - 1} each once (duplicate tokens or gaps)")
    return ranks


def _byte_chars() -> Dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a ByteLevel BPE vocabulary."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _vocab_and_merges(ranks: Dict[bytes, int]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []  # (rank of the merged token, rank of left, rank of right, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges]


def qwen_tokenizer_dir(src: Path, out: Path) -> Path:
    """Write `out`/tokenizer.json (+ tokenizer_config.json) built from `src`/qwen.tiktoken; returns `out`."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError as e:  # pragma: no cover - transformers and the [test] extra bring it
        raise ConversionError(f"{src / QWEN_VOCAB_FILE}: turning it into tokenizer.json needs the `tokenizers` "
                              "package: pip install tokenizers") from e
    ranks = read_tiktoken_ranks(Path(src) / QWEN_VOCAB_FILE)
    vocab, merges = _vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    # Qwen-1 has no BOS; <|endoftext|> ends documents and pads (as its generation config does)
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}))
    return out

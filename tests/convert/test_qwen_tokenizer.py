"""Qwen-1's qwen.tiktoken -> tokenizer.json: the same ids as tiktoken's algorithm, written out here."""
import base64
import json
import unicodedata

import pytest

from megatron_evomoe.convert import ConversionError, hf_to_evomoe
from megatron_evomoe.convert.qwen_tokenizer import qwen_tokenizer_dir
from megatron_evomoe.data.tokenizer import load_tokenizer

from .helpers import SMALL_QWEN, qwen_tensors, write_qwen

# Qwen-1's tokenization_qwen.py, as published: its split pattern (single digits) and special tokens
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
CORPUS = ["the thing is that the other one", "hello world, hello there", "don't we'll they're",
          "你好世界你好", "indent\n\n    code  here", "12345 apples"]
TEXTS = ["the other thing, hello!", "don't stop: we'll see", "你好, 世界", "a\n\n  b\t\tc   ", "2024 年 12 月",
         "<|im_start|>user\nhello<|im_end|>\n", "Ca\u0301fe\u0301 na\u00efve", "<|endoftext|>the end"]


def train_ranks(corpus, num_merges=60):
    """A tiny tiktoken vocabulary: the 256 bytes (shuffled ranks, as in real files), then greedy BPE merges."""
    import regex
    order = sorted(range(256), key=lambda b: (b * 37) % 256)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    words = [[bytes([b]) for b in piece.encode()] for text in corpus for piece in regex.findall(PATTERN, text)]
    for _ in range(num_merges):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[a + b] = counts.get(a + b, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda t: (counts[t], t))
        ranks[best] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] + w[i + 1] == best:
                    w[i:i + 2] = [best]
                i += 1
    ranks[b"12"] = len(ranks)  # a digit pair the pattern never lets through (it splits single digits)
    return ranks


def tiktoken_reference(ranks, text):
    """tiktoken's encode with every special token allowed, after Qwen's NFC: a whole piece is one token,
    else the adjacent pair whose join has the lowest rank merges first (leftmost on ties)."""
    import regex
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIALS)}
    ids = []
    for seg in regex.split("(" + "|".join(regex.escape(t) for t in specials) + ")", unicodedata.normalize("NFC", text)):
        if seg in specials:
            ids.append(specials[seg])
            continue
        for piece in regex.findall(PATTERN, seg):
            parts = [bytes([b]) for b in piece.encode()]
            while piece.encode() not in ranks and len(parts) > 1:
                joins = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
                if not joins:
                    break
                i = min(joins)[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend([ranks[piece.encode()]] if piece.encode() in ranks else [ranks[p] for p in parts])
    return ids


def write_tiktoken(folder, ranks):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (folder / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    return folder


def test_ids_equal_tiktoken_algorithm(hf, tmp_path):
    ranks = train_ranks(CORPUS)
    assert len(ranks) == 317 and ranks["hello".encode()] > 255 and ranks[" the".encode()] > 255
    tok = load_tokenizer(str(qwen_tokenizer_dir(write_tiktoken(tmp_path / "src", ranks), tmp_path / "tok")))
    assert tok.eos_id == tok.pad_id == 317 and tok.bos_id is None  # <|endoftext|> right after the ranks
    assert tok.encode("<|im_end|>") == [319] and tok.encode("<|extra_204|>") == [317 + 207]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == tiktoken_reference(ranks, text), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    # merged tokens are used: fewer ids than bytes
    assert len(tok.encode("the other thing, hello!")) < len(b"the other thing, hello!") - 6


@pytest.mark.parametrize("first", [b"ab", b"bc"])
def test_lowest_rank_pair_merges_first(hf, tmp_path, first):
    """"abc" with both "ab" and "bc" in the vocabulary: the pair whose join ranks lower wins."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({first: 256, ({b"ab", b"bc"} - {first}).pop(): 257})
    tok = load_tokenizer(str(qwen_tokenizer_dir(write_tiktoken(tmp_path / "src", ranks), tmp_path / "tok")))
    want = [256, ord("c")] if first == b"ab" else [ord("a"), 256]
    assert tok.encode("abc") == want == tiktoken_reference(ranks, "abc")


def test_qwen1_import_writes_the_tokenizer(hf, tmp_path):
    ranks = train_ranks(CORPUS)
    src = write_qwen(tmp_path / "qwen", SMALL_QWEN, qwen_tensors(SMALL_QWEN), tokenizer=False)
    write_tiktoken(src, ranks)
    hf_to_evomoe(src, tmp_path / "run", echo=lambda _: None)
    from megatron_evomoe.training.restore import load_trained_model
    _, cfg, bundle, _ = load_trained_model(tmp_path / "run")
    assert bundle.tokenizer.encode("hello there") == tiktoken_reference(ranks, "hello there")
    # 317 ranks + 208 specials + <image>: the embedding grows to the tokenizer (was 64 rows)
    assert bundle.tokenizer.image_token_id == 525 and cfg.model.vocab_size == 526
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("00-*/meta.json")).read_text())
    assert any("qwen.tiktoken written as tokenizer/tokenizer.json" in n for n in meta["notes"])


def test_bad_tiktoken_line_names_file_and_line(hf, tmp_path):
    folder = write_tiktoken(tmp_path / "src", {bytes([b]): b for b in range(256)})
    with open(folder / "qwen.tiktoken", "a") as f:
        f.write("not-base64!! 256\n")
    with pytest.raises(ConversionError, match=r"qwen.tiktoken:257: expected 'base64-token rank'"):
        qwen_tokenizer_dir(folder, tmp_path / "tok")

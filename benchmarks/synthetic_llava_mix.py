#!/usr/bin/env python
"""A synthetic file shaped like LLaVA-1.5's llava_v1_5_mix665k.json, for the data-path benchmark.

    python benchmarks/synthetic_llava_mix.py --out /tmp/mix --records 665000 --seed 0

writes under --out: `mix.json` (one JSON list, streamed to disk chunk by chunk), `images/pool/`
(a pool of real PNG and JPEG files of mixed sizes that the records point at, written once) and
`bundled/` (the demo's bundled dataset, built as the demo builds it, for its tokenizer).

What it imitates, per record:
- the share of text-only records: ShareGPT's 40,688 of the mix's 665,298 (6.1 %);
- multi-turn human/gpt conversations: turns per record drawn from a geometric law truncated to
  1..10 (P(t) proportional to TURN_DECAY**(t - 1)), long answers with a lognormal tail (LLaVA-Instruct
  style) and, for text-only records, longer ShareGPT-like turns;
- the `<image>` tag in the first human turn of every image record, before or after the question
  (LLaVA has both), an id per record, an image path drawn from the pool;
- words drawn (Zipf-weighted) from the bundled word tokenizer's vocabulary, so that tokenizer sees
  no unknown word and each word is exactly one token: a record's token length is known without
  tokenising it (`record_length`), and a record that would not fit `seq_len` after its image tokens
  has its last turns dropped, then its answer (and question) shortened, as a preprocessed mix is.

Deterministic for (seed, geometry): the records come in chunks of CHUNK records, chunk c drawn from
numpy's generator seeded by (seed, c), so a file of n records is the first n records of a longer
one with the same seed (the benchmark's smaller legacy file is a prefix of the full one).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_ONLY_SHARE = 40_688 / 665_298  # ShareGPT records in llava_v1_5_mix665k
DEFAULT_RECORDS = 665_000
MAX_TURNS = 10
TURN_DECAY = 0.62
CHUNK = 10_000
POOL_SIZE = 64
WORD_STREAM = 1 << 20  # words in the shared stream that every turn's text is a slice of
# Per record: BOS and the system prompt (prefix_tokens); per turn "USER:" (2 tokens), "ASSISTANT:" (2) and the
# answer's EOS: the default template, vicuna_v1 (LLaVA-1.5's), through a word tokenizer.
TURN_TOKENS = 5
# Words per turn: lognormal (median, sigma) of (human, gpt), for image and text-only records.
IMAGE_WORDS = ((11.0, 0.7), (29.0, 1.35))
TEXT_WORDS = ((24.0, 1.0), (150.0, 0.9))


@dataclass(frozen=True)
class Geometry:
    num_image_tokens: int  # image tokens per image record (LLaVA-1.5: 576 = (336 / 14) ** 2)
    seq_len: int


LLAVA = Geometry(576, 2048)


@dataclass
class MixStats:
    path: str
    num_records: int
    num_text_only: int
    lengths: np.ndarray  # [N] token length of each record (image tokens included), int32
    turns: np.ndarray  # [N] turns of each record after fitting seq_len, int8
    drawn_turns: np.ndarray  # [N] turns drawn before fitting, int8
    num_bytes: int
    seconds: float

    @property
    def num_image_records(self) -> int:
        return self.num_records - self.num_text_only

    def num_text_tokens(self, geometry: Geometry) -> int:
        return int(self.lengths.sum(dtype=np.int64)) - geometry.num_image_tokens * self.num_image_records

    def padding(self, seq_len: int) -> float:
        """Fraction of padding when every record is one row of seq_len tokens."""
        return 1.0 - float(self.lengths.sum(dtype=np.int64)) / (len(self.lengths) * seq_len)


def turn_probabilities() -> np.ndarray:
    """[MAX_TURNS] P(turns = 1..MAX_TURNS) as drawn, before fitting seq_len."""
    p = TURN_DECAY ** np.arange(MAX_TURNS)
    return p / p.sum()


@functools.cache
def prefix_tokens() -> int:
    """BOS and the default template's system prompt, one token per word."""
    from megatron_evomoe.data.conversation_templates import DEFAULT_TEMPLATE
    from megatron_evomoe.data.tokenizer import split_words
    return 1 + len(split_words(DEFAULT_TEMPLATE.system))


def record_length(num_human_words, num_gpt_words, has_image: bool, geometry: Geometry) -> int:
    """Token length of a record whose turns hold these word counts (every word one token)."""
    words = int(np.sum(num_human_words)) + int(np.sum(num_gpt_words))
    return prefix_tokens() + TURN_TOKENS * len(num_human_words) + words + geometry.num_image_tokens * has_image


def bundled_tokenizer(cache_dir: Path) -> Path:
    """The demo's word tokenizer: the bundled dataset built with the demo's parameters (data.* defaults,
    train.seed 42), once, under cache_dir/bundled."""
    from megatron_evomoe.data.build_bundled import build_bundled_dataset
    return Path(build_bundled_dataset(str(cache_dir / "bundled"), num_images=2000, num_test_images=150,
                                      image_size=32, seed=42)["tokenizer"])


def vocabulary_words(tokenizer_dir: Path) -> list[str]:
    """The tokenizer's words that tokenise to exactly themselves (no special token, no template word)."""
    from megatron_evomoe.data.conversation_templates import all_template_words
    from megatron_evomoe.data.tokenizer import WORD_SPECIAL_TOKENS, load_tokenizer, split_words
    template = {w for text in all_template_words() for w in split_words(text)}
    tokens = load_tokenizer(str(tokenizer_dir)).tokens
    return [t for t in tokens if t not in WORD_SPECIAL_TOKENS and t not in template and split_words(t) == [t]]


def write_image_pool(image_dir: Path, sides: tuple[int, int], seed: int, num_files: int = POOL_SIZE) -> list[str]:
    """num_files pictures (half PNG, half JPEG; width and height drawn in sides), smooth gradients with
    shapes and noise (decoding cost like a photo's, not a flat colour's); returns their names. Files
    already there are kept (written once)."""
    from PIL import Image, ImageDraw
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    names = []
    for k in range(num_files):
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        name = f"img_{k:02d}.{'png' if k % 2 else 'jpg'}"
        names.append(name)
        path = image_dir / name
        colours = rng.integers(0, 256, size=(2, 3))
        noise = rng.normal(0, 12, size=(h, w, 3))
        if path.exists():
            continue
        ramp = np.linspace(0, 1, w)[None, :, None]  # [1, W, 1]
        pixels = colours[0] * (1 - ramp) + colours[1] * ramp + noise  # [H, W, 3]
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        tmp = path.with_suffix(".tmp" + path.suffix)
        img.save(tmp, format="PNG" if k % 2 else "JPEG", quality=90)
        os.replace(tmp, path)
    return names


class WordStream:
    """WORD_STREAM Zipf-weighted vocabulary words joined by spaces; text(k, n) is words k..k+n-1."""

    def __init__(self, words: list[str], seed: int):
        rng = np.random.default_rng([seed, 2])
        weights = 1.0 / np.arange(1, len(words) + 1)
        picks = rng.choice(len(words), size=WORD_STREAM, p=weights / weights.sum())
        chosen = [words[i] for i in picks]
        self.text = " ".join(chosen)
        sizes = np.fromiter((len(w) + 1 for w in chosen), dtype=np.int64, count=WORD_STREAM)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # [WORD_STREAM + 1] start of each word

    def text_of(self, start: int, num_words: int) -> str:
        return self.text[self.starts[start]:self.starts[start + num_words] - 1]


def _fit(human: np.ndarray, gpt: np.ndarray, turns: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Fit each record into `budget` tokens (in place on human/gpt [n, MAX_TURNS]); returns the turns kept.

    The last turns are dropped first; a single turn still too long has its answer, then its question
    shortened (at least one word each)."""
    live = np.arange(MAX_TURNS)[None, :] < turns[:, None]  # [n, MAX_TURNS]
    cost = np.cumsum(np.where(live, TURN_TOKENS + human + gpt, 0), axis=1)  # [n, MAX_TURNS]
    kept = np.clip(((cost <= budget[:, None]) & live).sum(axis=1), 1, None)
    over = TURN_TOKENS + human[:, 0] + gpt[:, 0] - budget  # tokens the first turn alone is over budget
    one = (kept == 1) & (over > 0)
    gpt[one, 0] = np.maximum(1, gpt[one, 0] - over[one])
    over = TURN_TOKENS + human[:, 0] + gpt[:, 0] - budget
    human[one, 0] = np.maximum(1, human[one, 0] - np.maximum(over[one], 0))
    return kept


def _words(rng, params) -> np.ndarray:
    """[CHUNK, MAX_TURNS] words per turn, lognormal with params = (median, sigma), at least one."""
    median, sigma = params
    return np.maximum(1, rng.lognormal(np.log(median), sigma, size=(CHUNK, MAX_TURNS))).astype(np.int64)


def _chunk(c: int, n: int, seed: int, geometry: Geometry, stream: WordStream, pool: list[str]):
    """Records [c * CHUNK, c * CHUNK + n): (list of record dicts, lengths, kept turns, drawn turns)."""
    rng = np.random.default_rng([seed, 3, c])  # a whole chunk's draws, then its first n: a prefix of the file
    text_only = (rng.random(CHUNK) < TEXT_ONLY_SHARE)[:n]
    drawn = (rng.choice(MAX_TURNS, size=CHUNK, p=turn_probabilities()) + 1)[:n]
    human = np.where(text_only[:, None], _words(rng, TEXT_WORDS[0])[:n], _words(rng, IMAGE_WORDS[0])[:n])
    gpt = np.where(text_only[:, None], _words(rng, TEXT_WORDS[1])[:n], _words(rng, IMAGE_WORDS[1])[:n])
    budget = geometry.seq_len - prefix_tokens() - np.where(text_only, 0, geometry.num_image_tokens)
    if budget.min() < TURN_TOKENS + 2:
        raise ValueError(f"seq_len {geometry.seq_len} leaves no room for one turn after "
                         f"{geometry.num_image_tokens} image tokens")
    kept = _fit(human, gpt, drawn, budget)
    starts = rng.integers(0, WORD_STREAM - 2 * budget.max(), size=(CHUNK, MAX_TURNS, 2))[:n]
    images = rng.integers(0, len(pool), size=CHUNK)[:n]
    tag_first = (rng.random(CHUNK) < 0.5)[:n]
    records, lengths = [], np.empty(n, dtype=np.int32)
    for j in range(n):
        t = int(kept[j])
        conv = []
        for k in range(t):
            question = stream.text_of(starts[j, k, 0], human[j, k])
            if k == 0 and not text_only[j]:
                question = f"<image>\n{question}" if tag_first[j] else f"{question}\n<image>"
            conv.append({"from": "human", "value": question})
            conv.append({"from": "gpt", "value": stream.text_of(starts[j, k, 1], gpt[j, k])})
        i = c * CHUNK + j
        record = {"id": f"sharegpt_{i:07d}" if text_only[j] else f"{i:012d}"}
        if not text_only[j]:
            record["image"] = f"pool/{pool[images[j]]}"
        record["conversations"] = conv
        records.append(record)
        lengths[j] = record_length(human[j, :t], gpt[j, :t], not text_only[j], geometry)
    return records, lengths, kept, drawn


def generate(out_path: Path, num_records: int, seed: int, geometry: Geometry, tokenizer_dir: Path,
             pool: list[str]) -> MixStats:
    """Write num_records records to out_path (a JSON list; written to a temporary name, then renamed)."""
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    t0 = time.perf_counter()
    stream = WordStream(vocabulary_words(tokenizer_dir), seed)
    lengths, kept, drawn, num_text = [], [], [], 0
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        for c in range(0, (num_records + CHUNK - 1) // CHUNK):
            n = min(CHUNK, num_records - c * CHUNK)
            records, lens, k, d = _chunk(c, n, seed, geometry, stream, pool)
            num_text += sum("image" not in r for r in records)
            f.write((",\n" if c else "") + ",\n".join(json.dumps(r) for r in records))
            lengths.append(lens), kept.append(k), drawn.append(d)
        f.write("\n]\n")
    os.replace(tmp, out_path)
    return MixStats(str(out_path), num_records, num_text, np.concatenate(lengths),
                    np.concatenate(kept).astype(np.int8), np.concatenate(drawn).astype(np.int8),
                    out_path.stat().st_size, time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-tokens", type=int, default=LLAVA.num_image_tokens)
    p.add_argument("--seq-len", type=int, default=LLAVA.seq_len)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a word tokenizer folder (default: the demo's bundled one, built under --out)")
    p.add_argument("--image-sides", type=int, nargs=2, default=(224, 640), metavar=("MIN", "MAX"),
                   help="pixel range of the pool's widths and heights")
    a = p.parse_args(argv)
    geometry = Geometry(a.image_tokens, a.seq_len)
    a.out.mkdir(parents=True, exist_ok=True)
    pool = write_image_pool(a.out / "images" / "pool", tuple(a.image_sides), a.seed)
    stats = generate(a.out / "mix.json", a.records, a.seed, geometry, a.tokenizer or bundled_tokenizer(a.out), pool)
    print(f"{stats.path}: {stats.num_records:,} records ({stats.num_text_only / stats.num_records:.1%} text-only), "
          f"{stats.num_bytes / 1e9:.3f} GB in {stats.seconds:.1f} s; mean {stats.lengths.mean():.0f} tokens at "
          f"{geometry.num_image_tokens} image tokens; padding at seq_len {geometry.seq_len}: "
          f"{stats.padding(geometry.seq_len):.1%}; images under {a.out / 'images'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

"""Build the bundled tiny multimodal dataset: drawn scenes + LLaVA-format text about them.

    python -m megatron_evomoe.data.build_bundled --out data/bundled

writes, under the output directory:

    images/train_00000.png ...   training scenes (captions.json and instruct.json use them)
    images/test_00000.png ...    held-out scenes, used only by pope_test.jsonl
    captions.json                stage-0 (projector pre-training) image-caption pairs
    instruct.json                instruction data: multi-turn scene QA, POPE-style yes/no
                                 questions, and text-only Q/A records
    pope_test.jsonl              POPE question file for the held-out scenes, balanced yes/no
    tokenizer/vocab.json         a WordTokenizer over all of the above + the chat template
    manifest.json                build parameters and counts; written last

Everything is a pure function of the arguments.  A second call with the same arguments
finds a matching manifest and returns at once; different arguments rebuild (the
`images/` folder is emptied first, so it must not hold anything else).

POPE-style negatives ("Is there a <colour> <shape>?" about an absent object) are drawn
the three ways POPE draws them, adapted to (colour, shape) categories:
- random:      any absent category;
- popular:     the absent category most frequent in the training scenes;
- adversarial: an absent category that co-occurs most often with the present ones in
               the training scenes, among those sharing a colour or a shape with a
               present object (the confusable ones: a red square when a red circle is there).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .conversation_templates import IMAGE_TAG, all_template_words
from .scenes import COLOURS, SHAPES, Scene, SceneGenerator, all_categories
from .tokenizer import WordTokenizer

BUILDER_VERSION = 1
MANIFEST = "manifest.json"
NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
POPE_STRATEGIES = ("random", "popular", "adversarial")

Category = Tuple[str, str]  # (colour, shape)
QA = Tuple[str, str]


# --------------------------------------------------------------------------- text about a scene

def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(shape: str, n: int) -> str:
    return f"a {shape}" if n == 1 else f"{NUM_WORDS[n]} {shape}s"


def caption(scene: Scene, with_positions: bool) -> str:
    """'a red circle and a blue square.' (objects left to right), optionally with positions."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    parts = [f"a {o.name}" + (f" {POSITION_PHRASES[o.position]}" if with_positions else "") for o in objs]
    return _join(parts) + "."


def _pope_question(cat: Category) -> str:
    return f"Is there a {cat[0]} {cat[1]} in the image?"


def scene_questions(scene: Scene) -> List[QA]:
    """Every question this generator asks about a scene, with its answer."""
    objs = scene.objects
    qas: List[QA] = [("How many shapes are in the image?", NUM_WORDS[len(objs)])]
    shape_counts = Counter(o.shape for o in objs)
    present_shapes = [s for s in SHAPES if shape_counts[s]]
    qas.append(("Which shapes are in the image?", _join([_plural(s, shape_counts[s]) for s in present_shapes])))
    for shape in SHAPES:
        of_shape = [o for o in objs if o.shape == shape]
        if len(of_shape) == 1:
            qas.append((f"What colour is the {shape}?", of_shape[0].colour))
        elif len(of_shape) > 1:
            qas.append((f"What colours are the {shape}s?", _join(sorted(o.colour for o in of_shape))))
        else:
            qas.append((f"What colour is the {shape}?", f"there is no {shape}"))
    colour_counts = Counter(o.colour for o in objs)
    for o in objs:
        if colour_counts[o.colour] == 1:
            qas.append((f"What shape is the {o.colour} object?", f"a {o.shape}"))
        qas.append((f"Where is the {o.name}?", POSITION_PHRASES[o.position]))
    return qas


def _with_image_tag(question: str, rng: np.random.Generator) -> str:
    # Mostly "<image>\n" first as LLaVA does, sometimes after the text: real files do both.
    return f"{question}\n{IMAGE_TAG}" if rng.random() < 0.2 else f"{IMAGE_TAG}\n{question}"


def _conversation(pairs: Sequence[QA], rng: np.random.Generator, image: bool) -> List[Dict[str, str]]:
    turns = []
    for k, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": _with_image_tag(q, rng) if (image and k == 0) else q})
        turns.append({"from": "gpt", "value": a})
    return turns


# --------------------------------------------------------------------------- POPE negatives

class NegativeSampler:
    """Absent categories for POPE-style questions, by strategy (see the module docstring)."""

    def __init__(self, train_scenes: Sequence[Scene]):
        self.categories = all_categories()
        freq = Counter(c for s in train_scenes for c in s.categories)
        # Most frequent first; ties in the fixed category order.
        self.by_popularity = sorted(self.categories, key=lambda c: (-freq[c], self.categories.index(c)))
        self.cooccur: Counter = Counter()
        for s in train_scenes:
            cats = sorted(s.categories)
            for a in cats:
                for b in cats:
                    if a != b:
                        self.cooccur[(a, b)] += 1

    def sample(self, strategy: str, present: set, exclude: set, rng: np.random.Generator) -> Category:
        absent = [c for c in self.categories if c not in present and c not in exclude]
        assert absent, "a scene has at most 3 of the 12 categories"
        if strategy == "popular":
            return next(c for c in self.by_popularity if c in absent)
        if strategy == "adversarial":
            confusable = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)] or absent
            score = {c: sum(self.cooccur[(p, c)] for p in present) for c in confusable}
            best = max(score.values())
            top = [c for c in confusable if score[c] == best]
            return top[int(rng.integers(len(top)))]
        if strategy == "random":
            return absent[int(rng.integers(len(absent)))]
        raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {POPE_STRATEGIES}")


# --------------------------------------------------------------------------- text-only records

_MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
          ("red", "white"): "pink", ("black", "white"): "grey"}
_SIDES = {"triangle": "three", "square": "four", "pentagon": "five", "hexagon": "six"}
_OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "yes": "no", "big": "small",
              "small": "big", "up": "down", "down": "up"}
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _text_qa(rng: np.random.Generator) -> QA:
    kind = int(rng.integers(6))
    if kind == 0:
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        (c1, c2), result = list(_MIXES.items())[int(rng.integers(len(_MIXES)))]
        return f"What colour do you get by mixing {c1} and {c2}?", result
    if kind == 2:
        shape = list(_SIDES)[int(rng.integers(len(_SIDES)))]
        return f"How many sides does a {shape} have?", _SIDES[shape]
    if kind == 3:
        word = list(_OPPOSITES)[int(rng.integers(len(_OPPOSITES)))]
        return f"What is the opposite of {word}?", _OPPOSITES[word]
    if kind == 4:
        d = int(rng.integers(len(_DAYS)))
        return f"Which day comes after {_DAYS[d]}?", _DAYS[(d + 1) % 7]
    start = int(rng.integers(0, 6))
    end = start + int(rng.integers(2, 5))
    return f"Count from {start} to {end}.", ", ".join(str(i) for i in range(start, end + 1))


# --------------------------------------------------------------------------- records

def caption_record(i: int, scene: Scene, rng: np.random.Generator) -> dict:
    prompts = ("Describe the image briefly.", "What is in this picture?", "Give a short caption for this image.")
    prompt = prompts[int(rng.integers(len(prompts)))]
    text = caption(scene, with_positions=bool(rng.random() < 0.5))
    return {"id": f"cap_{i:05d}", "image": f"train_{i:05d}.png",
            "conversations": _conversation([(prompt, text)], rng, image=True)}


def qa_record(i: int, scene: Scene, rng: np.random.Generator) -> dict:
    pool = scene_questions(scene)
    k = min(len(pool), int(rng.integers(2, 4)))
    pairs = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
    return {"id": f"qa_{i:05d}", "image": f"train_{i:05d}.png",
            "conversations": _conversation(pairs, rng, image=True)}


def pope_record(i: int, scene: Scene, negatives: NegativeSampler, rng: np.random.Generator) -> dict:
    """One yes and one no question (random order); the negative by a random strategy."""
    present = scene.categories
    positive = scene.objects[int(rng.integers(len(scene.objects)))].category
    strategy = POPE_STRATEGIES[int(rng.integers(len(POPE_STRATEGIES)))]
    negative = negatives.sample(strategy, present, set(), rng)
    pairs = [(_pope_question(positive), "yes"), (_pope_question(negative), "no")]
    if rng.random() < 0.5:
        pairs.reverse()
    return {"id": f"pope_{i:05d}", "image": f"train_{i:05d}.png",
            "conversations": _conversation(pairs, rng, image=True)}


def text_record(i: int, rng: np.random.Generator) -> dict:
    pairs = [_text_qa(rng) for _ in range(int(rng.integers(1, 3)))]
    return {"id": f"text_{i:05d}", "conversations": _conversation(pairs, rng, image=False)}


def pope_test_questions(scenes: Sequence[Scene], negatives: NegativeSampler, seed: int) -> List[dict]:
    """Per held-out scene: one yes per object and as many no's, strategies in rotation."""
    rng = np.random.default_rng([seed, 2])
    questions: List[dict] = []
    turn = 0
    for i, scene in enumerate(scenes):
        present = scene.categories
        lines, used = [], set()
        for obj in scene.objects:
            strategy = POPE_STRATEGIES[turn % len(POPE_STRATEGIES)]
            turn += 1
            neg = negatives.sample(strategy, present, used, rng)
            used.add(neg)
            lines.append((obj.category, "yes", strategy))
            lines.append((neg, "no", strategy))
        for j in rng.permutation(len(lines)):
            cat, label, strategy = lines[j]
            questions.append({"question_id": len(questions), "image": f"test_{i:05d}.png",
                              "text": _pope_question(cat), "label": label, "category": strategy})
    return questions


# --------------------------------------------------------------------------- the build

def _paths(out_dir: str) -> Dict[str, str]:
    return {
        "root": out_dir,
        "images": os.path.join(out_dir, "images"),
        "captions": os.path.join(out_dir, "captions.json"),
        "instruct": os.path.join(out_dir, "instruct.json"),
        "pope_test": os.path.join(out_dir, "pope_test.jsonl"),
        "tokenizer": os.path.join(out_dir, "tokenizer"),
        "manifest": os.path.join(out_dir, MANIFEST),
    }


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_list(records: Sequence[dict]) -> str:
    # One record per line: valid JSON, and still readable and diffable.
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def _interleave(main: List[dict], extra: List[dict]) -> List[dict]:
    """Spread `extra` evenly through `main` (text-only records among the image ones)."""
    out: List[dict] = []
    every = max(1, len(main) // max(1, len(extra)))
    pending = list(extra)
    for k, rec in enumerate(main):
        if k % every == 0 and pending:
            out.append(pending.pop(0))
        out.append(rec)
    return out + pending


def _matching_manifest(paths: Dict[str, str], params: dict) -> Optional[dict]:
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("params") != params:
        return None
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    return manifest


def build_bundled_dataset(
    out_dir: str,
    num_images: int = 2000,
    num_test_images: int = 150,
    image_size: int = 32,
    seed: int = 0,
    num_text_records: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, str]:
    """Build (or find already built) the bundled dataset in `out_dir`; return its paths:
    root, images, captions, instruct, pope_test, tokenizer, manifest."""
    for name, value, low in (("num_images", num_images, 1), ("num_test_images", num_test_images, 1),
                             ("image_size", image_size, 8)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_text_records is None:
        num_text_records = max(1, num_images // 10)
    out_dir = os.fspath(out_dir)
    paths = _paths(out_dir)
    params = {"version": BUILDER_VERSION, "seed": int(seed), "image_size": image_size, "num_images": num_images,
              "num_test_images": num_test_images, "num_text_records": int(num_text_records),
              "template_words": all_template_words()}  # a template's new words: a new vocabulary
    if _matching_manifest(paths, params) is not None:
        return paths

    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(paths["manifest"]):
        os.remove(paths["manifest"])  # an interrupted rebuild must not look complete
    shutil.rmtree(paths["images"], ignore_errors=True)
    os.makedirs(paths["images"])

    train_gen = SceneGenerator(seed, image_size, "train")
    test_gen = SceneGenerator(seed, image_size, "test")
    train_scenes = [train_gen(i) for i in range(num_images)]
    test_scenes = [test_gen(i) for i in range(num_test_images)]
    for prefix, scenes in (("train", train_scenes), ("test", test_scenes)):
        for i, scene in enumerate(scenes):
            scene.image.save(os.path.join(paths["images"], f"{prefix}_{i:05d}.png"), format="PNG")

    negatives = NegativeSampler(train_scenes)
    text_rng = np.random.default_rng([seed, 3])
    captions = [caption_record(i, s, np.random.default_rng([seed, 4, i])) for i, s in enumerate(train_scenes)]
    instruct: List[dict] = []
    for i, s in enumerate(train_scenes):
        rng = np.random.default_rng([seed, 5, i])
        instruct.append(qa_record(i, s, rng))
        instruct.append(pope_record(i, s, negatives, rng))
    texts = [text_record(i, text_rng) for i in range(num_text_records)]
    instruct = _interleave(instruct, texts)
    pope = pope_test_questions(test_scenes, negatives, seed)

    corpus = [t["value"] for r in captions + instruct for t in r["conversations"]] + [q["text"] for q in pope]
    extra = all_template_words() + ["yes", "no"] + list(COLOURS) + list(SHAPES)
    tokenizer = WordTokenizer.build(corpus, extra_words=extra)
    tokenizer.save(paths["tokenizer"])

    _write_text(paths["captions"], _json_list(captions))
    _write_text(paths["instruct"], _json_list(instruct))
    _write_text(paths["pope_test"], "".join(json.dumps(q) + "\n" for q in pope))
    labels = Counter(q["label"] for q in pope)
    manifest = {
        "params": params,
        "counts": {
            "train_images": num_images, "test_images": num_test_images, "caption_records": len(captions),
            "instruct_records": len(instruct), "text_only_records": len(texts),
            "pope_questions": len(pope), "pope_yes": labels["yes"], "pope_no": labels["no"],
            "vocab_size": tokenizer.vocab_size,
        },
        "files": {k: os.path.relpath(v, out_dir) for k, v in paths.items() if k != "root"},
    }
    _write_text(paths["manifest"], json.dumps(manifest, indent=2) + "\n")
    if log is not None:
        log(f"built bundled dataset in {out_dir} in {time.perf_counter() - t0:.1f}s: {manifest['counts']}")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-images", type=int, default=2000, help="training scenes")
    parser.add_argument("--num-test-images", type=int, default=150, help="held-out scenes for POPE")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_bundled_dataset(args.out, args.num_images, args.num_test_images, args.image_size, args.seed,
                                  log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scenes and the bundled dataset builder: determinism, idempotence, correct answers, POPE."""
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_evomoe.data.build_bundled import build_bundled_dataset, scene_questions
from megatron_evomoe.data.scenes import COLOURS, SceneGenerator

SMALL = dict(num_images=40, num_test_images=12, image_size=32, seed=3)
POPE_RE = re.compile(r"^Is there a (\w+) (\w+) in the image\?$")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_bundled_dataset(str(tmp_path_factory.mktemp("bundled")), **SMALL)


def _tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _load(path):
    with open(path) as f:
        return json.load(f)


def _pope_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- scenes

def test_scene_objects_are_drawn_where_and_as_they_say():
    gen = SceneGenerator(seed=0, image_size=32)
    counts = set()
    for i in range(60):
        scene = gen(i)
        counts.add(len(scene.objects))
        assert scene.image.size == (32, 32) and scene.image.mode == "RGB"
        pixels = np.asarray(scene.image, dtype=np.float32)
        for o in scene.objects:
            # The centre pixel of each shape has the shape's colour (jitter + noise < 40).
            centre = pixels[int(o.y * 32), int(o.x * 32)]
            assert np.abs(centre - np.array(COLOURS[o.colour])).max() < 40, (i, o, centre)
            dx, dy = o.x - 0.5, o.y - 0.5
            expected = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("top" if dy < 0 else "bottom")
            assert o.position == expected
        for a in scene.objects:  # non-overlapping
            for b in scene.objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius
        assert len(scene.categories) == len(scene.objects)  # distinct (colour, shape) pairs
    assert counts == {1, 2, 3}


def test_scene_generator_is_a_function_of_seed_split_index():
    a, b = SceneGenerator(0)(5), SceneGenerator(0)(5)
    assert a.objects == b.objects and a.image.tobytes() == b.image.tobytes()
    assert SceneGenerator(0, split="test")(5).image.tobytes() != a.image.tobytes()
    assert SceneGenerator(1)(5).image.tobytes() != a.image.tobytes()


def test_scene_questions_answers_match_objects():
    scene = SceneGenerator(0)(7)
    qas = dict(scene_questions(scene))
    assert qas["How many shapes are in the image?"] == ["zero", "one", "two", "three"][len(scene.objects)]
    for o in scene.objects:
        assert qas[f"Where is the {o.name}?"].endswith(o.position)


# ----------------------------------------------------------------------------- builder

def test_build_is_deterministic(tmp_path, small):
    other = build_bundled_dataset(str(tmp_path / "again"), **SMALL)
    tree_a, tree_b = _tree(small["root"]), _tree(other["root"])
    assert len(tree_a) == SMALL["num_images"] + SMALL["num_test_images"] + 5  # + 3 json + manifest + vocab
    assert tree_a == tree_b
    different = build_bundled_dataset(str(tmp_path / "seed4"), **{**SMALL, "seed": 4})
    assert _tree(different["root"])["instruct.json"] != tree_a["instruct.json"]


def test_build_is_idempotent_and_rebuilds_on_new_arguments(tmp_path):
    out = str(tmp_path / "b")
    paths = build_bundled_dataset(out, **SMALL)
    stamps = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _tree(out)}
    t0 = time.perf_counter()
    again = build_bundled_dataset(out, **SMALL)
    assert time.perf_counter() - t0 < 0.5
    assert again == paths
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _tree(out)} == stamps  # nothing rewritten

    smaller = build_bundled_dataset(out, **{**SMALL, "num_images": 30})
    manifest = _load(smaller["manifest"])
    assert manifest["params"]["num_images"] == 30 and manifest["counts"]["caption_records"] == 30
    assert len(_load(smaller["captions"])) == 30
    assert not os.path.exists(os.path.join(out, "images", "train_00035.png"))  # stale images removed

    # A build interrupted before its manifest was written is redone.
    os.remove(smaller["manifest"])
    os.remove(smaller["captions"])
    build_bundled_dataset(out, **{**SMALL, "num_images": 30})
    assert len(_load(smaller["captions"])) == 30


def test_pope_file_is_balanced_correct_and_held_out(small):
    questions = _pope_lines(small["pope_test"])
    labels = [q["label"] for q in questions]
    assert len(questions) >= 2 * SMALL["num_test_images"]
    assert labels.count("yes") == labels.count("no") == len(questions) // 2
    assert [q["question_id"] for q in questions] == list(range(len(questions)))
    assert {q["category"] for q in questions} == {"random", "popular", "adversarial"}

    test_gen = SceneGenerator(SMALL["seed"], SMALL["image_size"], "test")
    for q in questions:
        assert set(q) >= {"question_id", "image", "text", "label"}
        colour, shape = POPE_RE.match(q["text"]).groups()
        idx = int(re.match(r"test_(\d+)\.png", q["image"]).group(1))
        scene = test_gen(idx)
        assert q["label"] == ("yes" if (colour, shape) in scene.categories else "no")
        if q["label"] == "no" and q["category"] == "adversarial":
            assert any(colour == c or shape == s for c, s in scene.categories)

    # Held out: no test image file is used for training, and no test image's pixels equal a training image's.
    train_images = {r["image"] for r in _load(small["captions"]) + _load(small["instruct"]) if "image" in r}
    test_images = {q["image"] for q in questions}
    assert len(train_images) == SMALL["num_images"] and len(test_images) == SMALL["num_test_images"]
    assert not train_images & test_images
    digest = lambda name: _tree(small["images"])[name]  # noqa: E731
    assert not {digest(n) for n in train_images} & {digest(n) for n in test_images}


def test_instruct_data_has_qa_pope_and_text_only_records(small):
    records = _load(small["instruct"])
    manifest = _load(small["manifest"])
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == manifest["counts"]["text_only_records"] == max(1, SMALL["num_images"] // 10)
    assert all("<image>" not in t["value"] for r in text_only for t in r["conversations"])
    assert len(records) == 2 * SMALL["num_images"] + len(text_only)

    gen = SceneGenerator(SMALL["seed"], SMALL["image_size"], "train")
    yes = no = 0
    for r in records:
        if "image" not in r:
            continue
        turns = r["conversations"]
        assert sum("<image>" in t["value"] for t in turns) == 1 and "<image>" in turns[0]["value"]
        scene = gen(int(re.match(r"train_(\d+)\.png", r["image"]).group(1)))
        for human, gpt in zip(turns[::2], turns[1::2]):
            q = human["value"].replace("<image>", "").strip()
            m = POPE_RE.match(q)
            if m:
                truth = tuple(m.groups()) in scene.categories
                assert gpt["value"] == ("yes" if truth else "no")
                yes, no = yes + truth, no + (not truth)
            else:
                assert (q, gpt["value"]) in scene_questions(scene)
    assert yes == no == SMALL["num_images"]


def test_captions_describe_the_scene(small):
    gen = SceneGenerator(SMALL["seed"], SMALL["image_size"], "train")
    for r in _load(small["captions"]):
        scene = gen(int(r["id"].split("_")[1]))
        text = r["conversations"][1]["value"]
        assert text.endswith(".")
        named = re.findall(r"\ba (red|green|blue|yellow) (circle|square|triangle)\b", text)
        assert sorted(named) == sorted(scene.categories)


def test_default_size_build_is_fast(tmp_path):
    t0 = time.perf_counter()
    paths = build_bundled_dataset(str(tmp_path / "full"))
    elapsed = time.perf_counter() - t0
    counts = _load(paths["manifest"])["counts"]
    assert counts["train_images"] == 2000 and counts["test_images"] == 150
    assert counts["pope_yes"] == counts["pope_no"] > 150
    assert elapsed < 20, f"default build took {elapsed:.1f}s"


def test_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "megatron_evomoe.data.build_bundled", "--out", str(out),
                           "--num-images", "8", "--num-test-images", "4", "--seed", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    paths = json.loads(proc.stdout)
    assert paths["captions"] == str(out / "captions.json")
    assert len(_load(paths["captions"])) == 8
    assert _load(paths["manifest"])["params"]["seed"] == 1

"""MMBench: TSV reading, prompts, answer extraction and circular evaluation."""
import base64
import csv
import io
import json
import re

import pytest
from PIL import Image

from megatron_evomoe.eval import run_benchmark
from megatron_evomoe.eval.mmbench import DEFAULT_PROMPT_SUFFIX, extract_choice
from megatron_evomoe.eval.runner import main

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
          "l2-category", "image", "split"]


def _b64_png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(HEADER)
        for r in rows:
            w.writerow([r.get(c, "") for c in HEADER])
    return path


BASE_ROWS = [
    # 4 options; the model always finds the right text -> right in every rotation
    dict(index=0, question="What colour is the ball?", hint="nan", A="red", B="blue", C="green",
         D="pink", answer="B", category="color", **{"l2-category": "attribute"}),
    # 2 options (C, D empty); the model always says "A" -> right once, wrong once -> 0
    dict(index=1, question="Is it day?", A="day", B="night", answer="A", category="color",
         **{"l2-category": "attribute"}),
    # 3 options with a hint; the model names the option text -> text matching
    dict(index=2, question="Which animal is shown?", hint="Look closely.", A="a cat",
         B="a dog", C="a horse", answer="C", category="animal", **{"l2-category": "object"}),
]
TRUTH = {"What colour is the ball?": "blue", "Which animal is shown?": "a horse"}


def _base_tsv(tmp_path):
    rows = [dict(r, image=_b64_png((i * 60, 0, 0))) for i, r in enumerate(BASE_ROWS)]
    return _write_tsv(tmp_path / "mmbench_dev.tsv", rows)


def _model(calls):
    def answer_fn(image_path, prompt):
        calls.append((image_path, prompt))
        question = next(q for q in ("What colour", "Is it day", "Which animal") if q in prompt)
        if question == "Is it day":
            return "A"
        truth = TRUTH[next(q for q in TRUTH if q in prompt)]
        if question == "Which animal":
            return f"It is {truth}."
        letter = re.search(rf"^([A-D])\. {truth}$", prompt, re.M).group(1)
        return f"({letter})"
    return answer_fn


@pytest.mark.parametrize("response, options, expected", [
    ("B", {"A": "x", "B": "y"}, "B"),
    ("The answer is (C).", {"A": "x", "B": "y", "C": "z"}, "C"),
    ("B. night", {"A": "day", "B": "night"}, "B"),
    ("A or B", {"A": "day", "B": "night"}, None),          # two letters, no option text
    ("It is night", {"A": "day", "B": "night"}, "B"),      # text match ("It" is not "I"...)
    ("a cat", {"A": "cat", "B": "dog"}, "A"),              # lower-case "a" is not a letter
    ("cat and dog", {"A": "cat", "B": "dog"}, None),       # two option texts
    ("Z", {"A": "cat", "B": "dog"}, None),
    ("Cannot determine the answer, maybe cat", {"A": "cat", "B": "dog"}, None),
    ("I think the animal in the picture is probably a cat", {"A": "cat", "B": "dog"}, None),
])
def test_extract_choice(response, options, expected):
    assert extract_choice(response, options) == expected


def test_circular_evaluation(tmp_path):
    tsv = _base_tsv(tmp_path)
    calls = []
    res = run_benchmark("mmbench", str(tsv), str(tmp_path / "imgs"), _model(calls),
                        str(tmp_path / "out"))
    assert len(calls) == 4 + 2 + 3                       # one pass per rotation
    # rotation 1 of question 0 shows blue, green, pink, red
    rot1 = [p for _, p in calls if "What colour" in p][1]
    assert rot1 == ("What colour is the ball?\nA. blue\nB. green\nC. pink\nD. red"
                    + DEFAULT_PROMPT_SUFFIX)
    hinted = [p for _, p in calls if "Which animal" in p][0]
    assert hinted.startswith("Look closely.\nWhich animal is shown?\nA. a cat\nB. a dog\nC. a horse\n")
    m = res["metrics"]
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["by_category"] == pytest.approx({"animal": 1.0, "color": 0.5})
    assert m["by_l2_category"] == pytest.approx({"attribute": 0.5, "object": 1.0})
    assert m["num_questions"] == 3 and m["num_passes"] == 9
    saved = json.loads((tmp_path / "out" / "mmbench.json").read_text())
    day = [q for q in saved["questions"] if q["group"] == 1]
    assert [(q["question_id"], q["gt"], q["pred"], q["correct"]) for q in day] == [
        (1, "A", "A", True), (1_000_001, "B", "A", False)]
    assert [g["correct"] for g in saved["groups"]] == [True, False, True]
    assert calls[0][0].startswith(str(tmp_path / "imgs")) and calls[0][0].endswith(".png")
    with Image.open(calls[0][0]) as img:
        assert img.size == (4, 4)


def test_vanilla_evaluation(tmp_path):
    tsv = _base_tsv(tmp_path)
    calls = []
    res = run_benchmark("mmbench", str(tsv), None, _model(calls), str(tmp_path / "out"),
                        circular=False)
    assert len(calls) == 3 and res["metrics"]["accuracy"] == pytest.approx(1.0)


def test_precomputed_circular_file_via_cli(tmp_path, capsys):
    img = _b64_png((0, 0, 255))
    rows = [
        dict(index=5, question="Q5", A="x", B="y", C="z", answer="A", category="c1", image=img),
        dict(index=1_000_005, question="Q5", A="y", B="z", C="x", answer="C", category="c1", image="5"),
        dict(index=2_000_005, question="Q5", A="z", B="x", C="y", answer="B", category="c1", image="5"),
        dict(index=6, question="Q6", A="u", B="v", answer="B", category="c2", image=img),
        dict(index=1_000_006, question="Q6", A="v", B="u", answer="A", category="c2", image="6"),
    ]
    tsv = _write_tsv(tmp_path / "circular.tsv", rows)
    answers = {5: "A", 1_000_005: "C", 2_000_005: "The answer is B", 6: "B", 1_000_006: "B"}
    ans_file = tmp_path / "answers.jsonl"
    ans_file.write_text("".join(json.dumps({"question_id": k, "answer": v}) + "\n"
                                for k, v in answers.items()))
    res = main(["--benchmark", "mmbench", "--data", str(tsv), "--answers-jsonl", str(ans_file),
                "--out-dir", str(tmp_path / "out")])
    assert res["metrics"]["accuracy"] == pytest.approx(0.5)   # group 6 fails its second pass
    assert res["metrics"]["by_category"] == pytest.approx({"c1": 1.0, "c2": 0.0})
    assert res["metrics"]["num_passes"] == 5
    assert "accuracy" in capsys.readouterr().out
    assert (tmp_path / "out" / "mmbench.json").is_file()


def test_bad_rows(tmp_path):
    rows = [dict(r, image=_b64_png((1, 2, 3))) for r in BASE_ROWS]
    rows[1]["image"] = "not base64 at all!" * 8
    tsv = _write_tsv(tmp_path / "bad.tsv", rows)
    calls = []
    with pytest.raises(ValueError, match=r"bad\.tsv:3: index 1: 'image' is not valid base64"):
        run_benchmark("mmbench", str(tsv), None, _model(calls), str(tmp_path))
    assert calls == []
    rows[1]["image"] = "42"
    _write_tsv(tsv, rows)
    with pytest.raises(ValueError, match=r"bad\.tsv:3: index 1: 'image' '42' is neither"):
        run_benchmark("mmbench", str(tsv), None, _model(calls), str(tmp_path))
    rows[1] = dict(rows[1], answer="C", image=rows[0]["image"])
    _write_tsv(tsv, rows)
    with pytest.raises(ValueError, match=r"bad\.tsv:3: index 1: answer 'C' is not one of"):
        run_benchmark("mmbench", str(tsv), None, _model(calls), str(tmp_path))
    orphan = [dict(BASE_ROWS[0], index=1_000_009, image=rows[0]["image"])]
    _write_tsv(tsv, orphan)
    with pytest.raises(ValueError, match=r"bad\.tsv:2: circular copy 1000009 has no base"):
        run_benchmark("mmbench", str(tsv), None, _model(calls), str(tmp_path))

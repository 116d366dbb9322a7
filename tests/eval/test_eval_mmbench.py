"""MMBench: TSV reading, prompts, answer extraction and circular evaluation."""
import base64
import importlib.util
import csv
import io
import json
import re
import sys

import pytest
from PIL import Image

from megatron_evomoe.eval import run_benchmark
from megatron_evomoe.eval.mmbench import DEFAULT_PROMPT_SUFFIX, load_questions
from megatron_evomoe.eval.mmbench_matching import infer_choice
from megatron_evomoe.eval.mmbench_tsv import is_pandas_na
from megatron_evomoe.eval.runner import main

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
          "l2-category", "image", "split"]


def _b64_png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(c, "") for c in header])
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
    # --- rule 1, option letters among the words (".()[],:;!*#{}" become spaces)
    ("B", {"A": "x", "B": "y"}, "B"),
    ("The answer is (B).", {"A": "x", "B": "y", "C": "z"}, "B"),      # words: The answer is B
    ("The correct answer is **C**", {"A": "x", "B": "y", "C": "z", "D": "w"}, "C"),
    ("B. night", {"A": "day", "B": "night"}, "B"),
    ("In the picture I see option C", dict(zip("ABCD", "wxyz")), "C"),  # C is word 7 of 7; "I" no option
    # the last-four-words rule: a lone letter counts only among the last four words (index >= len - 4)
    ("B is wrong, the picture clearly shows a cat sitting on the sofa", {"A": "cat", "B": "dog"}, None),
    ("B is not it at all", {"A": "x", "B": "y"}, None),                 # B is word 1 of 6
    ("so B is not it", {"A": "x", "B": "y"}, "B"),                      # B is word 2 of 5: 1 >= 5 - 4
    # an article "A" is a letter only near the end: a long sentence starting with it is not option A ...
    ("A cat is sitting on the sofa", {"A": "dog", "B": "cat"}, None),   # ... and too long for rule 2
    ("A very small and cute cat", {"A": "dog", "B": "cute cat", "C": "a large brown horse"}, "B"),  # rule 2
    ("A cat", {"A": "dog", "B": "cat"}, "A"),                           # two words: VLMEvalKit reads A
    # two letters, or one too early: the first "answer is <a-d>" (any case) decides
    ("A is wrong; after checking, the answer is C", dict(zip("ABCD", "wxyz")), "C"),
    ("Answer is b", {"A": "x", "B": "y"}, "B"),                         # lower-case b is no word match
    ("The answer is a cat", {"A": "dog", "B": "cat"}, "A"),             # VLMEvalKit's regex reads "is a"
    ("answer is c; not A nor B", {"A": "x", "B": "y"}, None),            # first match c: not an option
    ("A or B", {"A": "day", "B": "night"}, None),                       # two letters, no option text
    # "Z" / refusals: no option (wrong, never sent to a judge); an API failure infers nothing
    ("Z", {"A": "cat", "B": "dog"}, "Z"),
    ("Cannot determine the answer, maybe B", {"A": "cat", "B": "dog"}, "Z"),
    ("Failed to obtain answer via API. B", {"A": "x", "B": "y"}, None),
    # --- rule 2, the option's text, when the answer is at most twice as long as all texts together
    ("It is night", {"A": "day", "B": "night"}, "B"),                   # 11 <= 2 * 8
    ("a cat", {"A": "cat", "B": "dog"}, "A"),                           # lower-case "a" is not a letter
    ("cat and dog", {"A": "cat", "B": "dog"}, None),                    # two option texts
    ("It is a cat!", {"A": "cat", "B": "dog"}, "A"),                    # 12 <= 12: the guard's edge
    ("It is a cat!!", {"A": "cat", "B": "dog"}, None),                  # 13 > 12
    ("I think the animal in the picture is probably a cat", {"A": "cat", "B": "dog"}, None),
])
def test_infer_choice(response, options, expected):
    assert infer_choice(response, options) == expected


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


# ------------------------------------------------------------------------------------------------ NA cells

NA_CELLS = {  # cell -> whether pandas' read_csv (default na_values) reads it as NaN
    "": True, "NA": True, "N/A": True, "n/a": True, "nan": True, "NaN": True, "None": True,
    "null": True, "NULL": True, "#N/A": True, "<NA>": True, "-nan": True,
    "none": False, "NONE": False, "na": False, "Na": False, "NAN": False, "Null": False,
    " NA": False, "NA ": False, "N / A": False, " ": False,
}


@pytest.mark.parametrize("cell, expected", sorted(NA_CELLS.items()))
def test_pandas_na_rule(cell, expected):
    assert is_pandas_na(cell) is expected


def test_pandas_na_rule_matches_pandas(tmp_path):
    pd = pytest.importorskip("pandas")  # (the [eval] extra; CI installs it with [test])
    cells = sorted(NA_CELLS)
    path = tmp_path / "cells.tsv"
    path.write_text("index\tA\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(cells)), encoding="utf-8")
    read = pd.read_csv(path, sep="\t")["A"]
    assert [bool(pd.isna(v)) for v in read] == [NA_CELLS[c] for c in cells]


def test_na_cells_are_not_options(tmp_path):
    img = _b64_png((9, 9, 9))
    rows = [
        dict(index=0, question="Q0", hint="NA", A="yes", B="no", C="NA", D="N/A", answer="A", image=img),
        dict(index=1, question="Q1", hint="none", A="yes", B="no", C="none", D="", answer="C", image=img),
        dict(index=2, question="Q2", hint="N/A hint", A="1", B="2", C="n/a", D="None", answer="B", image=img),
    ]
    tsv = _write_tsv(tmp_path / "na.tsv", rows)
    qs = load_questions(str(tsv), str(tmp_path / "imgs"), circular=False)
    assert [q.options for q in qs] == [("yes", "no"), ("yes", "no", "none"), ("1", "2")]
    # a hint pandas reads as NaN, or LLaVA's "none", is no hint; other text is
    assert qs[0].prompt == "Q0\nA. yes\nB. no" + DEFAULT_PROMPT_SUFFIX
    assert qs[1].prompt == "Q1\nA. yes\nB. no\nC. none" + DEFAULT_PROMPT_SUFFIX
    assert qs[2].prompt.startswith("N/A hint\nQ2\nA. 1\nB. 2\n")
    assert [len(q) for q in _passes_by_group(load_questions(str(tsv), str(tmp_path / "imgs")))] == [2, 3, 2]
    rows[0]["answer"] = "C"  # an answer naming an NA cell
    _write_tsv(tsv, rows)
    with pytest.raises(ValueError, match=r"na\.tsv:2: index 0: answer 'C' is not one of the options AB"):
        load_questions(str(tsv), str(tmp_path / "imgs"))


def _passes_by_group(questions):
    groups = {}
    for q in questions:
        groups.setdefault(q.group, []).append(q)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------ circular
# A circular TSV as the official ones: each question's rotated copies as rows k * 1e6 + index.

OFFICIAL_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                   "source", "l2-category", "comment", "split"]


def _rotated(index, question, options, answer, category, l2):
    n = len(options)
    for k in range(n):
        shown = options[k:] + options[:k]
        yield dict(index=k * 1_000_000 + index, question=question, category=category,
                   answer="ABCD"[(ord(answer) - ord("A") - k) % n], source="src", comment="nan",
                   split="dev", **dict(zip("ABCD", shown + ("NA", "N/A")[:4 - n])), **{"l2-category": l2})


CIRCULAR = [
    *_rotated(10, "Which fruit?", ("apple", "banana", "cherry"), "B", "fruit", "obj"),
    *_rotated(11, "Which side?", ("left", "right"), "A", "spatial", "rel"),
    *_rotated(12, "Which colour?", ("red", "green", "blue", "pink"), "D", "color", "attr"),
    *_rotated(13, "Is it wet?", ("yes", "no"), "B", "color", "attr"),
]
ANSWERS = {
    10: "B", 1_000_010: "The answer is (A).", 2_000_010: "banana",      # all right (letters, text)
    11: "A", 1_000_011: "A",                                            # the copy is wrong: fails
    12: "D", 1_000_012: "C", 2_000_012: "B",
    3_000_012: "I am not sure what colour it is at all",                # nothing inferred: judge, wrong
    13: "maybe\x07", 1_000_013: "= B",                                  # nothing + a wrong letter: wrong
}


def _circular_tsv(tmp_path, rows=CIRCULAR):
    img = _b64_png((0, 128, 0))
    rows = [dict(r, image=img if r["index"] < 1_000_000 else str(r["index"] % 1_000_000)) for r in rows]
    return _write_tsv(tmp_path / "mmbench_dev_circular.tsv", rows, OFFICIAL_HEADER)


def _llava_answers(path, answers, all_rounds=False):
    """An answer file as LLaVA's model_vqa_mmbench writes it (--all-rounds: rotations as round_id)."""
    with open(path, "w", encoding="utf-8") as f:
        for idx, text in answers.items():
            qid, k = (idx % 1_000_000, idx // 1_000_000) if all_rounds else (idx, 0)
            f.write(json.dumps({"question_id": qid, "round_id": k, "prompt": "p", "text": text,
                                "options": ["x"], "option_char": ["A"], "answer_id": "id",
                                "model_id": "m", "metadata": {}}) + "\n")
    return path


def _expect_circular_scores(m):
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["by_category"] == pytest.approx({"color": 0.0, "fruit": 1.0, "spatial": 0.0})
    assert m["by_l2_category"] == pytest.approx({"attr": 0.0, "obj": 1.0, "rel": 0.0})
    assert (m["num_questions"], m["num_passes"], m["num_unparsed"], m["num_judge_questions"]) == (4, 11, 2, 1)


def test_circular_score_llava_answer_file_and_submission(tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("openpyxl")
    tsv = _circular_tsv(tmp_path)
    answers = _llava_answers(tmp_path / "llava.jsonl", ANSWERS)
    xlsx = tmp_path / "upload" / "model.xlsx"
    res = main(["--benchmark", "mmbench", "--data", str(tsv), "--answers-jsonl", str(answers),
                "--out-dir", str(tmp_path / "out"), "--submission", str(xlsx)])
    _expect_circular_scores(res["metrics"])
    assert [g["needs_judge"] for g in res["groups"]] == [False, False, True, False]
    out, err = capsys.readouterr()
    assert "num_judge_questions (wrong, no LLM judge)" in out and "11 rows -> " in out
    assert "1 prediction(s) held characters an .xlsx cannot store" in err   # "\x07", dropped

    sub = pd.read_excel(xlsx)
    assert list(sub.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert list(sub["index"]) == [r["index"] for r in CIRCULAR]
    written = {**ANSWERS, 13: "maybe"}
    assert list(sub["prediction"]) == [written[r["index"]] for r in CIRCULAR]   # "= B" as text
    assert list(sub["answer"]) == [r["answer"] for r in CIRCULAR]
    row = sub[sub["index"] == 1_000_011].iloc[0]
    assert (row["A"], row["B"], row["question"]) == ("right", "left", "Which side?")
    assert pd.isna(row["C"]) and pd.isna(row["D"])   # the "NA" / "N/A" cells: no options, empty


def test_llava_all_rounds_answers_on_base_rows(tmp_path):
    """LLaVA's --all-rounds rotates like the official copies: round k is question k * 1e6 + index."""
    tsv = _circular_tsv(tmp_path, [r for r in CIRCULAR if r["index"] < 1_000_000])
    answers = _llava_answers(tmp_path / "rounds.jsonl", ANSWERS, all_rounds=True)
    res = main(["--benchmark", "mmbench", "--data", str(tsv), "--answers-jsonl", str(answers),
                "--out-dir", str(tmp_path / "out")])
    _expect_circular_scores(res["metrics"])
    assert [q["question_id"] for q in res["questions"]] == sorted(ANSWERS, key=lambda i: (i % 1_000_000, i))


def test_submission_errors(tmp_path, monkeypatch, capsys):
    tsv = _circular_tsv(tmp_path)

    def run(answers, out, *extra):
        with pytest.raises(SystemExit):
            main(["--benchmark", "mmbench", "--data", str(tsv), "--answers-jsonl", str(answers),
                  "--out-dir", str(tmp_path / out), "--submission", str(tmp_path / "s.xlsx"), *extra])
        return capsys.readouterr().err

    if importlib.util.find_spec("pandas") and importlib.util.find_spec("openpyxl"):
        # the server needs every row: --limit 1 scores question 10, the submission refuses the rest
        first = {k: v for k, v in ANSWERS.items() if k % 10**6 == 10}
        first = _llava_answers(tmp_path / "first.jsonl", first)
        err = run(first, "limited", "--limit", "1")
        assert "no answer for 8 of 11 rows, e.g. index 11, 1000011, 12" in err
    monkeypatch.setitem(sys.modules, "openpyxl", None)   # the [eval] extra not installed
    err = run(_llava_answers(tmp_path / "all.jsonl", ANSWERS), "no_extra")
    assert "openpyxl is missing" in err and "pip install 'megatron_evomoe[eval]'" in err
    assert not (tmp_path / "no_extra").exists()   # refused before scoring
    with pytest.raises(SystemExit):
        main(["--benchmark", "pope", "--data", str(tsv), "--answers-jsonl", str(tmp_path / "all.jsonl"),
              "--submission", str(tmp_path / "s.xlsx")])
    assert "--submission applies to --benchmark mmbench only" in capsys.readouterr().err

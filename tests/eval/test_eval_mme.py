"""MME: both release layouts, the eval-tool template, acc / acc+ scores and errors."""
import json

import pytest
from PIL import Image

from megatron_evomoe.eval import run_benchmark
from megatron_evomoe.eval.mme import parse_yes_no_other
from megatron_evomoe.eval.runner import main

# category -> image stem -> [(question, gt, model answer)]
EXISTENCE = {  # flat layout, a perception category
    "0001": [("Is there a cat? Please answer yes or no.", "Yes", "Yes"),
             ("Is there a dog? Please answer yes or no.", "No", "No, there is not.")],
    "0002": [("Is there a car? Please answer yes or no.", "Yes", "no"),          # wrong
             ("Is there a bus? Please answer yes or no.", "No", "No")],
}
CODE = {  # images/ + questions_answers_YN/ layout, a cognition category
    "0001": [("Does the code print 3? Please answer yes or no.", "Yes", "The answer is yes"),  # other
             ("Does the code print 4? Please answer yes or no.", "No", "no")],
    "0002": [("Does the code print 5? Please answer yes or no.", "Yes", "yes"),
             ("Does the code print 6? Please answer yes or no.", "No", "Yes")],           # wrong
}


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def _write_release(root, skip_image=None):
    for stem, qas in EXISTENCE.items():
        if stem != skip_image:
            _image(root / "existence" / f"{stem}.jpg")
        (root / "existence" / f"{stem}.txt").write_text(
            "".join(f"{q}\t{gt}\n" for q, gt, _ in qas))
    for stem, qas in CODE.items():
        _image(root / "code_reasoning" / "images" / f"{stem}.png")
        qa_dir = root / "code_reasoning" / "questions_answers_YN"
        qa_dir.mkdir(parents=True, exist_ok=True)
        (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{gt}\n" for q, gt, _ in qas))


def _answer_fn(calls=None):
    table = {q: a for cat in (EXISTENCE, CODE) for qas in cat.values() for q, _, a in qas}

    def fn(image_path, prompt):
        if calls is not None:
            calls.append(image_path)
        return table[prompt]
    return fn


# calculation.py: lower-cased, never stripped; exact yes/no, else "yes" / "no" within the first 4 characters.
@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes.", "yes"),
    ("Not sure", "no"), ("The answer is yes", "other"), ("maybe", "other"),
    (" Yes", "yes"), ("  Yes", "other"), ("  no", "no"), ("   No", "other"), (" yes\n", "yes"),
    ("\nyes", "yes"), ("No\nbecause yes", "no"), ("\tNo", "no"), ("Yes!", "yes"), ("", "other"),
    ("noyes", "no"), ("I think yes", "other"),
])
def test_parse_yes_no_other(answer, parsed):
    assert parse_yes_no_other(answer) == parsed


def test_run_mme_release_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    _write_release(root)
    calls = []
    res = run_benchmark("mme", str(root), None, _answer_fn(calls), str(tmp_path / "out"))
    assert len(calls) == 8
    assert str(root / "code_reasoning" / "images" / "0001.png") in calls
    cats = res["metrics"]["categories"]
    assert list(cats) == ["existence", "code_reasoning"]          # official order
    assert cats["existence"]["acc"] == pytest.approx(75.0)        # 3 of 4
    assert cats["existence"]["acc_plus"] == pytest.approx(50.0)   # 1 of 2 images
    assert cats["existence"]["score"] == pytest.approx(125.0)
    assert cats["code_reasoning"]["acc"] == pytest.approx(50.0)
    assert cats["code_reasoning"]["acc_plus"] == pytest.approx(0.0)
    assert cats["code_reasoning"]["score"] == pytest.approx(50.0)
    assert cats["code_reasoning"]["num_other"] == 1
    assert res["metrics"]["perception"] == pytest.approx(125.0)
    assert res["metrics"]["cognition"] == pytest.approx(50.0)
    assert res["metrics"]["perception_num_categories"] == 1
    saved = json.loads((tmp_path / "out" / "mme.json").read_text())
    first = saved["questions"][0]
    assert first["question_id"] == "existence/0001.jpg#0" and first["gt"] == "yes"
    assert [q["pred"] for q in saved["questions"][4:]] == ["other", "no", "yes", "yes"]


def test_run_mme_eval_tool_template(tmp_path):
    results = tmp_path / "Your_Results"
    results.mkdir()
    (results / "count.txt").write_text(
        "a.jpg\tAre there two cats? Please answer yes or no.\tYes\n"
        "a.jpg\tAre there three cats? Please answer yes or no.\tNo\n")
    _image(tmp_path / "release" / "count" / "a.jpg")
    answers = {"Are there two cats? Please answer yes or no.": "Yes",
               "Are there three cats? Please answer yes or no.": "No"}
    res = run_benchmark("mme", str(results), str(tmp_path / "release"),
                        lambda i, p: answers[p], str(tmp_path / "out"))
    assert res["metrics"]["categories"]["count"]["score"] == pytest.approx(200.0)
    assert res["metrics"]["perception"] == pytest.approx(200.0)
    assert res["metrics"]["cognition"] == 0


def test_missing_image(tmp_path):
    root = tmp_path / "mme"
    _write_release(root, skip_image="0002")
    calls = []
    with pytest.raises(ValueError) as err:
        run_benchmark("mme", str(root), None, _answer_fn(calls), str(tmp_path / "out"))
    msg = str(err.value)
    assert str(root / "existence" / "0002.txt") in msg
    assert "existence/0002.jpg#0" in msg and str(root / "existence" / "0002.jpg") in msg
    assert calls == []


def test_malformed_line(tmp_path):
    root = tmp_path / "mme"
    _write_release(root)
    bad = root / "code_reasoning" / "questions_answers_YN" / "0002.txt"
    bad.write_text("Does it print 5?\tYes\nno tab here\n")
    with pytest.raises(ValueError, match=r"0002\.txt:2: expected"):
        run_benchmark("mme", str(root), None, _answer_fn(), str(tmp_path / "out"))
    bad.write_text("Does it print 5?\tMaybe\n")
    with pytest.raises(ValueError, match=r"0002\.txt:1: answer is 'Maybe'"):
        run_benchmark("mme", str(root), None, _answer_fn(), str(tmp_path / "out"))


def _llava_answers(path, rows):
    path.write_text("".join(json.dumps({"question_id": qid, "prompt": prompt, "text": text, "answer_id": "a",
                                        "model_id": "m", "metadata": {}}) + "\n" for qid, prompt, text in rows))
    return path


def test_llava_answer_file_with_shared_keys(tmp_path, capsys):
    root = tmp_path / "MME_Benchmark_release_version"
    for stem, lines in {"0001": "Is there a cat? Please answer yes or no.\tYes\n"
                                "Is there a dog? Please answer yes or no.\tNo\n",
                        "0002": "Is there a car?  Please answer yes or no.\tYes\n"   # MME's double space
                                "Is there a bus? Please answer yes or no.\tNo\n"}.items():
        _image(root / "existence" / f"{stem}.jpg")
        (root / "existence" / f"{stem}.txt").write_text(lines)
    _image(root / "code_reasoning" / "images" / "0001.png")
    (root / "code_reasoning" / "questions_answers_YN").mkdir()
    (root / "code_reasoning" / "questions_answers_YN" / "0001.txt").write_text(
        "Does it print 3? Please answer yes or no.\tYes\nDoes it print 4? Please answer yes or no.\tNo\n")
    # As LLaVA's model_vqa_loader writes them: an image's two questions share one question_id.
    answers = _llava_answers(tmp_path / "llava-v1.5.jsonl", [
        ("code_reasoning/0001.png", "Does it print 4? Please answer yes or no.", "Yes, it does"),  # wrong
        ("existence/0001.jpg", "Is there a dog?\nAnswer the question using a single word or phrase.",
         "  No"),                                                                  # no: "  no" holds "no"
        ("existence/0002.jpg", "Is there a car?", "  Yes"),                        # other: "  ye"
        ("existence/0001.jpg", "Is there a cat? Please answer yes or no.", " Yes"),           # yes
        ("existence/0002.jpg", "Is there a bus? Please answer yes or no.", "No\nThere is no bus."),  # no
        ("code_reasoning/0001.png", "Does it print 3? Please answer yes or no.", "yes"),
    ])
    res = main(["--benchmark", "mme", "--data", str(root), "--answers-jsonl", str(answers),
                "--out-dir", str(tmp_path / "out")])
    cats = res["metrics"]["categories"]
    ex, code = cats["existence"], cats["code_reasoning"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == pytest.approx((75.0, 50.0, 125.0))
    assert (ex["num_other"], ex["num_multiline"]) == (1, 1)
    assert (code["acc"], code["acc_plus"], code["score"]) == pytest.approx((50.0, 0.0, 50.0))
    assert (res["metrics"]["perception"], res["metrics"]["cognition"]) == pytest.approx((125.0, 50.0))
    by_id = {q["question_id"]: q for q in res["questions"]}
    assert by_id["existence/0002.jpg#0"]["answer"] == "  Yes" and by_id["existence/0002.jpg#0"]["pred"] == "other"
    assert by_id["existence/0001.jpg#1"]["answer"] == "  No"
    assert res["metrics"]["notes"] == [
        "perception: the sum over 1 of its 10 categories (calculation.py stops on a missing category file)",
        "cognition: the sum over 1 of its 4 categories (calculation.py stops on a missing category file)",
        "existence: 1 answer(s) hold a newline or tab, which break calculation.py's results file "
        "(lines skipped or a failed pair assertion); read here as written"]
    assert "note: existence: 1 answer(s)" in capsys.readouterr().out
    assert res["num_unmatched_answers"] == 0


def test_answer_file_matching_no_question(tmp_path, capsys):
    root = tmp_path / "mme"
    _write_release(root)
    answers = _llava_answers(tmp_path / "a.jsonl", [("count/0001.jpg", "Are there 2? Please answer yes or no.", "Yes")])
    with pytest.raises(SystemExit):
        main(["--benchmark", "mme", "--data", str(root), "--answers-jsonl", str(answers), "--out-dir", str(tmp_path)])
    assert capsys.readouterr().err == (f"error: {answers}: no answer matches a question of {root} "
                                       f"(first unmatched: question_id 'count/0001.jpg' at line 1)\n")


def test_llava_answers_written_by_run_benchmark_score_the_same(tmp_path):
    root = tmp_path / "mme"
    _write_release(root)
    res = run_benchmark("mme", str(root), None, _answer_fn(), str(tmp_path / "out"), model_id="tiny")
    lines = [json.loads(l) for l in open(res["answers_jsonl"])]
    assert lines[0] == {"question_id": "existence/0001.jpg", "prompt": "Is there a cat? Please answer yes or no.",
                        "text": "Yes", "answer_id": "tiny-0", "model_id": "tiny", "metadata": {}}
    assert lines[1]["question_id"] == "existence/0001.jpg"      # shared by the image's two questions
    again = main(["--benchmark", "mme", "--data", str(root), "--answers-jsonl", res["answers_jsonl"],
                  "--out-dir", str(tmp_path / "again")])
    assert again["metrics"]["categories"] == res["metrics"]["categories"]

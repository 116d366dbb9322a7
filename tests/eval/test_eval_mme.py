"""MME: both release layouts, the eval-tool template, acc / acc+ scores and errors."""
import json

import pytest
from PIL import Image

from megatron_evomoe.eval import run_benchmark
from megatron_evomoe.eval.mme import parse_yes_no_other

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


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes.", "yes"),
    ("Not sure", "no"), ("The answer is yes", "other"), ("  Yes", "yes"), ("maybe", "other"),
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

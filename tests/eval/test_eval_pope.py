"""POPE: answer parsing, metrics, file reading and errors."""
import json

import pytest
from PIL import Image

from megatron_evomoe.eval import pope_metrics, run_benchmark
from megatron_evomoe.eval.pope import parse_yes_no

# (label, model answer, category): TP=2, FN=1 in "random"; FP=2, TN=1 in "adversarial".
CASES = [
    ("yes", "Yes, there is a cat.", "random"),         # TP
    ("yes", "yes", "random"),                          # TP
    ("yes", "No, there is no dog.", "random"),         # FN
    ("no", "Yes. No, wait.", "adversarial"),           # FP: only the first sentence counts
    ("no", "Nope", "adversarial"),                     # FP: "Nope" is not a "no" word
    ("no", "There is not a cat in the image", "adversarial"),  # TN
]


def _write(tmp_path, cases=CASES, missing=()):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i, (label, _, cat) in enumerate(cases):
        name = f"img{i}.jpg"
        if i not in missing:
            Image.new("RGB", (4, 4)).save(images / name)
        lines.append(json.dumps({"question_id": 100 + i, "image": name, "category": cat,
                                 "text": f"Is there a thing {i} in the image?", "label": label}))
    qfile = tmp_path / "pope.jsonl"
    qfile.write_text("\n".join(lines) + "\n")
    return qfile, images


@pytest.mark.parametrize("answer, parsed", [
    ("No", "no"), ("no.", "no"), ("No, there is not.", "no"), ("It is not there", "no"),
    ("Yes", "yes"), ("NO", "yes"), ("Nope", "yes"), ("There is none", "yes"),
    ("Yes. No.", "yes"), ("not", "no"), ("No\n", "no"), ("I see no,cat", "yes"),
])
def test_parse_yes_no(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_metrics_exact_numbers():
    m = pope_metrics([a for _, a, _ in CASES], [l for l, _, _ in CASES])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(4 / 6)


def test_pope_metrics_bools_and_zero_division():
    m = pope_metrics([True, False, 1, 0], [1, 1, "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["f1"] == pytest.approx(0.5)
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0
    assert none_yes["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        pope_metrics(["yes"] * 3, ["yes"] * 2)
    with pytest.raises(ValueError, match="label 0"):
        pope_metrics(["yes"], ["maybe"])


def test_run_pope(tmp_path, capsys):
    qfile, images = _write(tmp_path)
    answers = {f"Is there a thing {i} in the image?": a for i, (_, a, _) in enumerate(CASES)}
    seen = []

    def answer_fn(image_path, prompt):
        seen.append(image_path)
        return answers[prompt]

    res = run_benchmark("pope", str(qfile), str(images), answer_fn, str(tmp_path / "out"))
    assert seen[0] == str(images / "img0.jpg") and len(seen) == 6
    m = res["metrics"]
    assert m["f1"] == pytest.approx(4 / 7) and m["accuracy"] == pytest.approx(0.5)
    rnd, adv = m["by_category"]["random"], m["by_category"]["adversarial"]
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"]) == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert rnd["f1"] == pytest.approx(0.8)
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["f1"]) == pytest.approx(
        (1 / 3, 0.0, 0.0, 0.0))
    saved = json.loads((tmp_path / "out" / "pope.json").read_text())
    assert saved["metrics"]["tp"] == 2
    assert [q["pred"] for q in saved["questions"]] == ["yes", "yes", "no", "yes", "yes", "no"]
    assert saved["questions"][3]["question_id"] == 103 and saved["questions"][3]["correct"] is False
    out = capsys.readouterr().out
    assert "f1" in out and "0.5714" in out


def test_limit(tmp_path):
    qfile, images = _write(tmp_path)
    res = run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path), limit=2)
    assert res["metrics"]["num_questions"] == 2 and res["metrics"]["accuracy"] == 1.0


def test_missing_image_is_reported_before_asking(tmp_path, assert_missing_image_reported):
    qfile, images = _write(tmp_path, missing=(5,))
    assert_missing_image_reported("pope", qfile, images, "105", images / "img5.jpg")


def test_malformed_lines(tmp_path):
    qfile, images = _write(tmp_path)
    lines = qfile.read_text().splitlines()
    lines[2] = '{"question_id": 7, "image": "x.jpg"'
    qfile.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"pope\.jsonl:3: not valid JSON"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path))
    lines[2] = '{"question_id": 7, "image": "x.jpg", "text": "q", "label": "maybe"}'
    qfile.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"pope\.jsonl:3: field 'label'"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path))
    lines[2] = '{"question_id": 7, "image": "x.jpg", "label": "no"}'
    qfile.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"pope\.jsonl:3: missing field 'text'"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path))

"""POPE: answer parsing, metrics, file reading and errors."""
import json

import pytest
from PIL import Image

from megatron_evomoe.eval import pope_metrics, run_benchmark
from megatron_evomoe.eval.runner import main
from megatron_evomoe.eval.pope import parse_yes_no
from megatron_evomoe.pope_metrics import undefined_metrics

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


# eval_pope.py: first sentence (before the first "."), commas deleted, split on " " only, never stripped.
@pytest.mark.parametrize("answer, parsed", [
    ("No", "no"), ("no.", "no"), ("No, there is not.", "no"), ("It is not there", "no"),
    ("Yes", "yes"), ("NO", "yes"), ("Nope", "yes"), ("There is none", "yes"),
    ("Yes. No.", "yes"), ("not", "no"), ("I see no,cat", "yes"), ("no,", "no"),
    (" No", "no"),            # words "", "No"
    ("No ", "no"),            # words "No", ""
    ("No\n", "yes"),          # one word "No\n"
    ("No\t", "yes"), ("\tno", "yes"), ("yes\tno", "yes"),   # a tab is not a separator
    ("Yes\nNo, it is not", "no"),   # the words "Yes\nNo" and "it", "is", "not"
    ("There is no cat. Yes.", "no"), ("No.Yes", "no"), ("Yes there is.\nNo", "yes"),
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
    assert undefined_metrics(none_yes) == ["precision", "f1"]
    assert undefined_metrics(pope_metrics(["yes", "no"], ["no", "no"])) == ["recall", "f1"]  # no "yes" label
    assert undefined_metrics(pope_metrics(["yes", "no"], ["no", "yes"])) == ["f1"]  # P = R = 0
    assert undefined_metrics(m) == []
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


def _llava_pope(tmp_path, splits):
    """LLaVA's layout: llava_pope_test.jsonl (no labels, ids unique over the splits, the suffix in
    the text) + coco/coco_pope_<split>.json (ids restarting at 1, labels)."""
    images, coco = tmp_path / "val2014", tmp_path / "coco"
    images.mkdir()
    coco.mkdir()
    questions, qid = [], 0
    for split, labels in splits.items():
        lines = []
        for k, label in enumerate(labels):
            image = f"COCO_val2014_{split}{k}.jpg"
            Image.new("RGB", (4, 4)).save(images / image)
            text = f"Is there a thing {k} in the image?"
            lines.append(json.dumps({"question_id": k + 1, "image": image, "text": text, "label": label}))
            qid += 1
            questions.append(json.dumps({"question_id": qid, "image": image, "category": split,
                                         "text": text + "\nAnswer the question using a single word or phrase."}))
        (coco / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    qfile = tmp_path / "llava_pope_test.jsonl"
    qfile.write_text("\n".join(questions) + "\n")
    return qfile, images, coco


def test_llava_pope_test_with_annotation_folder_three_splits(tmp_path, capsys):
    splits = {"adversarial": ["yes", "no", "yes", "no"], "popular": ["yes", "no", "no"],
              "random": ["yes", "yes", "no", "no"]}
    qfile, images, coco = _llava_pope(tmp_path, splits)
    answers = [  # one LLaVA answers file for the three splits, in question order (ids 1..11)
        "Yes", "No", "No", "Yes, there is.",    # adversarial: TP FN... -> TP=1 TN=1 FN=1 FP=1
        "No", "No", "No",                       # popular: no "yes" answer at all: TN=2 FN=1
        "\tNo", "Yes", " No", "No\n",            # random: "\tNo" and "No\n" are yes -> TP=2 TN=1 FP=1
    ]
    afile = tmp_path / "answers.jsonl"
    afile.write_text("".join(json.dumps({"question_id": i + 1, "prompt": "p", "text": a, "answer_id": "x",
                                         "model_id": "m", "metadata": {}}) + "\n"
                             for i, a in enumerate(answers)))
    res = main(["--benchmark", "pope", "--data", str(qfile), "--images", str(images),
                "--annotations", str(coco), "--answers-jsonl", str(afile), "--out-dir", str(tmp_path / "out")])
    by = res["metrics"]["by_category"]
    adv, pop, rnd = by["adversarial"], by["popular"], by["random"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 1, 1, 1)
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["f1"], adv["yes_ratio"]) == pytest.approx(
        (0.5, 0.5, 0.5, 0.5, 0.5))
    assert (pop["tp"], pop["fp"], pop["tn"], pop["fn"]) == (0, 0, 2, 1)
    assert (pop["accuracy"], pop["precision"], pop["recall"], pop["f1"], pop["yes_ratio"]) == pytest.approx(
        (2 / 3, 0.0, 0.0, 0.0, 0.0))
    assert (rnd["tp"], rnd["fp"], rnd["tn"], rnd["fn"]) == (2, 1, 1, 0)
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"], rnd["yes_ratio"]) == pytest.approx(
        (0.75, 2 / 3, 1.0, 0.8, 0.75))
    mean = res["metrics"]["mean_over_categories"]
    assert mean["f1"] == pytest.approx((0.5 + 0.0 + 0.8) / 3)
    assert mean["accuracy"] == pytest.approx((0.5 + 2 / 3 + 0.75) / 3)
    m = res["metrics"]  # pooled: TP=3 FP=2 TN=4 FN=2
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 4, 2)
    assert m["notes"] == [
        "split popular: precision divides by zero (eval_pope.py stops with ZeroDivisionError); reported as 0.0",
        "split popular: f1 divides by zero (eval_pope.py stops with ZeroDivisionError); reported as 0.0"]
    out = capsys.readouterr().out
    assert "popular/f1" in out and "mean/f1" in out and "note: split popular: precision divides by zero" in out
    assert res["questions"][8]["answer"] == "Yes" and res["questions"][7]["pred"] == "yes"


def test_annotation_folder_errors(tmp_path):
    qfile, images, coco = _llava_pope(tmp_path, {"random": ["yes", "no"], "popular": ["no"]})
    (coco / "coco_pope_popular.json").unlink()
    with pytest.raises(ValueError, match=r"^POPE: annotation file not found: .*coco_pope_popular\.json "
                                         r"\(split 'popular' of the questions\)$"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path), annotations=str(coco))
    (coco / "coco_pope_popular.json").write_text("")
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json: 0 labels for the 1 questions of split 'popular'"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path), annotations=str(coco))
    (coco / "coco_pope_popular.json").write_text('{"image": "other.jpg", "label": "no"}\n')
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:1: image 'other\.jpg', but the question"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path), annotations=str(coco))
    with pytest.raises(ValueError, match=r"missing field 'label'"):  # no labels and no annotation folder
        run_benchmark("pope", str(qfile), str(images), lambda i, p: "yes", str(tmp_path))

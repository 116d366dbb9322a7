"""TextVQA: file reading, VQA accuracy end to end, errors."""
import json

import pytest
from PIL import Image

from megatron_evomoe.eval import run_benchmark, score_answers
from megatron_evomoe.eval.answer_records import read_answer_records
from megatron_evomoe.eval.runner import main
from megatron_evomoe.eval.textvqa import DEFAULT_PROMPT_SUFFIX, prompt_question


def _humans(match, n):
    return [match] * n + [f"noise {i}" for i in range(10 - n)]


# (question, human answers, model answer, expected accuracy)
CASES = [
    ("How many?", _humans("two", 3), "Two", 0.9),
    ("What animal?", _humans("cat", 2), "the cat.", 0.6),
    ("What brand?", _humans("Coca-Cola", 1), "coca cola", 0.3),
    ("What word?", _humans("stop", 0), "stop", 0.0),
    ("What year?", _humans("1999", 4), "1999", 1.0),
]


def _write(tmp_path, missing=None, cases=CASES):
    images = tmp_path / "train_images"
    images.mkdir()
    data = []
    for i, (q, humans, _, _) in enumerate(cases):
        image_id = f"abc{i:03d}"
        if image_id != missing:
            Image.new("RGB", (4, 4)).save(images / f"{image_id}.jpg")
        data.append({"question_id": 34000 + i, "question": q, "image_id": image_id,
                     "answers": humans, "image_classes": ["Thing"]})
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return path, images


def test_run_textvqa(tmp_path):
    path, images = _write(tmp_path)
    model = {q + DEFAULT_PROMPT_SUFFIX: a for q, _, a, _ in CASES}
    seen = []

    def answer_fn(image_path, prompt):
        seen.append(image_path)
        return model[prompt]

    res = run_benchmark("textvqa", str(path), str(images), answer_fn, str(tmp_path / "out"))
    assert seen[1] == str(images / "abc001.jpg")
    assert [q["score"] for q in res["questions"]] == pytest.approx([0.9, 0.6, 0.3, 0.0, 1.0])
    assert res["metrics"]["accuracy"] == pytest.approx(0.56)
    saved = json.loads((tmp_path / "out" / "textvqa.json").read_text())
    assert saved["questions"][0]["normalized"] == "2"
    assert saved["questions"][1]["normalized"] == "cat"
    assert saved["metrics"]["num_scored"] == 5


def test_test_split_without_answers_is_not_scored(tmp_path):
    path, images = _write(tmp_path)
    doc = json.loads(path.read_text())
    for entry in doc["data"]:
        del entry["answers"]
    path.write_text(json.dumps(doc))
    res = run_benchmark("textvqa", str(path), str(images), lambda i, p: "x", str(tmp_path / "o"),
                        prompt_suffix="")
    assert res["metrics"]["accuracy"] is None and res["metrics"]["num_questions"] == 5


def test_missing_image(tmp_path, assert_missing_image_reported):
    path, images = _write(tmp_path, missing="abc003")
    assert_missing_image_reported("textvqa", path, images, "34003", images / "abc003.jpg")


def test_malformed(tmp_path):
    path, images = _write(tmp_path)
    doc = json.loads(path.read_text())
    doc["data"][2]["answers"] = ["only", "three", "answers"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"data\[2\] \(question 34002\): 'answers' must be"):
        run_benchmark("textvqa", str(path), str(images), lambda i, p: "x", str(tmp_path))
    path.write_text('{"data": [\n{"question_id": 1,\n}')
    with pytest.raises(ValueError, match=r"TextVQA_0\.5\.1_val\.json:3: not valid JSON"):
        run_benchmark("textvqa", str(path), str(images), lambda i, p: "x", str(tmp_path))


def test_ocr_prompt_as_llava_textvqa_val_v051_ocr_jsonl(tmp_path):
    path, images = _write(tmp_path, cases=[("what is the brand of this camera?", _humans("dakota", 3), "", 0)])
    doc = json.loads(path.read_text())
    doc["data"][0]["ocr_tokens"] = ["DAKOTA", "DIGITAL", "Single-Use", "Camera"]
    path.write_text(json.dumps(doc))
    prompts = []
    run_benchmark("textvqa", str(path), str(images), lambda i, p: prompts.append(p) or "dakota",
                  str(tmp_path / "out"), ocr_tokens=True)
    assert prompts == ["What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, "
                       "Camera\nAnswer the question using a single word or phrase."]
    del doc["data"][0]["ocr_tokens"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"data\[0\] \(question 34000\): no 'ocr_tokens' for the OCR prompt"):
        run_benchmark("textvqa", str(path), str(images), lambda i, p: "x", str(tmp_path / "out"), ocr_tokens=True)


@pytest.mark.parametrize("prompt, question", [
    ("What brand?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.", "what brand?"),
    ("Reference OCR token: A, B\nWhat Brand?\nAnswer briefly.", "what brand?"),
    ("What brand?\nAnswer the question using a single word or phrase.", "what brand?"),
    ("OCR tokens: a, b. Question: What\nbrand? Short answer: ", "what\nbrand?"),
])
def test_prompt_question(prompt, question):
    assert prompt_question(prompt, "f:1") == question


def test_llava_answer_file_keys_shared_by_an_images_questions(tmp_path):
    humans = {"what brand is it?": _humans("dakota", 3), "what year is it?": _humans("1999", 4),
              "how many?": _humans("2", 1)}
    images = tmp_path / "train_images"
    images.mkdir()
    data = []
    for i, (q, h) in enumerate(humans.items()):
        image_id = "shared0001" if i < 2 else "other0002"
        Image.new("RGB", (4, 4)).save(images / f"{image_id}.jpg")
        data.append({"question_id": 34000 + i, "question": q, "image_id": image_id, "answers": h,
                     "ocr_tokens": ["DAKOTA", "1998"]})
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": data}))
    suffix = "\nAnswer the question using a single word or phrase."
    rows = [  # LLaVA's model_vqa_loader on llava_textvqa_val_v051_ocr.jsonl: question_id = image id
        ("shared0001", "What year is it?\nReference OCR token: DAKOTA, 1998" + suffix, "1998"),   # 0.0
        ("shared0001", "What brand is it?\nReference OCR token: DAKOTA, 1998" + suffix, "Dakota"),  # 0.9
        ("other0002", "How many?" + suffix, "two"),                                          # 0.3
    ]
    afile = tmp_path / "llava-v1.5.jsonl"
    afile.write_text("".join(json.dumps({"question_id": k, "prompt": p, "text": t, "answer_id": "a",
                                         "model_id": "m", "metadata": {}}) + "\n" for k, p, t in rows))
    res = main(["--benchmark", "textvqa", "--data", str(ann), "--images", str(images),
                "--answers-jsonl", str(afile), "--out-dir", str(tmp_path / "out")])
    assert [q["score"] for q in res["questions"]] == pytest.approx([0.9, 0.0, 0.3])
    assert res["metrics"]["accuracy"] == pytest.approx(1.2 / 3)
    afile.write_text(json.dumps({"question_id": "shared0001", "prompt": "a\nb\nc\nd", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"llava-v1\.5\.jsonl:1: prompt 'a\\nb\\nc\\nd' is in none of the forms"):
        score_answers("textvqa", str(ann), str(images), read_answer_records(str(afile)), str(tmp_path))


def test_llava_answers_written_by_run_benchmark_score_the_same(tmp_path):
    path, images = _write(tmp_path)
    answers = {q + DEFAULT_PROMPT_SUFFIX: a for q, _, a, _ in CASES}
    res = run_benchmark("textvqa", str(path), str(images), lambda i, p: answers[p], str(tmp_path / "out"))
    first = json.loads(open(res["answers_jsonl"]).readline())
    assert (first["question_id"], first["prompt"], first["text"]) == ("abc000", "How many?" + DEFAULT_PROMPT_SUFFIX, "Two")
    again = main(["--benchmark", "textvqa", "--data", str(path), "--images", str(images),
                  "--answers-jsonl", res["answers_jsonl"], "--out-dir", str(tmp_path / "again")])
    assert again["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"]) == pytest.approx(2.8 / 5)

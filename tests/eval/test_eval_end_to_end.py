"""MME, MMBench and TextVQA end to end: the tiny trained checkpoint (session fixture `trained`, see
tests/conftest.py) answers small hand-made files in each benchmark's format through
`python -m megatron_evomoe.eval.model_answers`, and the reported scores equal the scores this test
computes by hand, with the official rules written out here, from the answers read back from the
written JSON.

The ground truths are chosen from what the model answers (asked once beforehand through
`make_answer_fn`, the runner's own decoding): the prompts do not depend on them, so the runner sees
exactly those answers and the files get right and wrong answers whatever the model says (the tiny
model's answers are mostly not yes/no or letters: "other" and text matching are what get exercised).
"""
import base64
import importlib.util
import csv
import json
import re
import string

import pytest
from PIL import Image

from megatron_evomoe.eval import mmbench, textvqa
from megatron_evomoe.eval.model_answers import main as answers_main
from megatron_evomoe.eval.model_answers import make_answer_fn

MAX_NEW = 4
FILLER = "xylophone"  # not in the tiny tokenizer's vocabulary: the model can never answer it


@pytest.fixture(scope="module")
def answer(trained):
    return make_answer_fn(trained["model"], trained["cfg"], trained["bundle"], max_new_tokens=MAX_NEW)


def png(trained, i):
    """A test image of the bundled data (16x16)."""
    return trained["data"] / "images" / f"test_{i:05d}.png"


def run(trained, benchmark, data, out, images=None, extra=()):
    args = ["--ckpt", str(trained["run"]), "--benchmark", benchmark, "--data", str(data), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), *extra]
    result = answers_main(args + (["--images", str(images)] if images else []))
    saved = json.loads((out / f"{benchmark}.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))  # what is printed is what is stored
    return saved


# ------------------------------------------------------------------------------------------------ MME

def mme_parse(answer):
    """Official MME rule: exactly yes/no, else 'yes' / 'no' within the first 4 characters, else other."""
    text = answer.strip().lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def write_mme(root, trained, rows):
    """rows: {stem: [(question, gt)]} -> the flat release layout: existence/<stem>.png + <stem>.txt."""
    folder = root / "existence"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (stem, qas) in enumerate(rows.items()):
        Image.open(png(trained, i)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text("".join(f"{q}\t{gt}\n" for q, gt in qas))


def test_mme_end_to_end(trained, answer, tmp_path):
    questions = {"0001": ["Is there a red circle in the image? Please answer yes or no.",
                          "Is there a blue square in the image? Please answer yes or no."],
                 "0002": ["Is there a green triangle in the image? Please answer yes or no.",
                          "Is there a yellow circle in the image? Please answer yes or no."]}
    asked = {(stem, q): answer(str(png(trained, i)), q)
             for i, (stem, qs) in enumerate(questions.items()) for q in qs}
    flip = {"yes": "No", "no": "Yes", "other": "Yes"}
    # image 0001: both answers taken as right (when the model says yes/no); 0002: the second made wrong
    gts = {k: (mme_parse(a).capitalize() if mme_parse(a) != "other" else "No") for k, a in asked.items()}
    gts[("0002", questions["0002"][1])] = flip[mme_parse(asked[("0002", questions["0002"][1])])]
    write_mme(tmp_path / "mme", trained, {s: [(q, gts[(s, q)]) for q in qs] for s, qs in questions.items()})

    saved = run(trained, "mme", tmp_path / "mme", tmp_path / "out")
    recs = saved["questions"]
    assert [r["answer"] for r in recs] == list(asked.values())  # the runner decodes as make_answer_fn does
    right = [mme_parse(r["answer"]) == r["gt"] for r in recs]
    acc = sum(right) / 4
    acc_plus = sum(all(right[2 * i:2 * i + 2]) for i in range(2)) / 2
    cat = saved["metrics"]["categories"]["existence"]
    assert cat["acc"] == pytest.approx(100 * acc) and cat["acc_plus"] == pytest.approx(100 * acc_plus)
    assert cat["num_other"] == sum(mme_parse(r["answer"]) == "other" for r in recs)
    assert cat["score"] == pytest.approx(100 * acc + 100 * acc_plus)
    assert saved["metrics"]["perception"] == pytest.approx(100 * acc + 100 * acc_plus)
    assert saved["metrics"]["perception_num_categories"] == 1 and saved["metrics"]["cognition"] == 0
    assert not right[3]  # the flipped question is wrong whatever the model said


# ------------------------------------------------------------------------------------------------ MMBench

def mmbench_pred(response, options):
    """VLMEvalKit's exact matching: one option letter among the last four words, else the first
    "answer is <a-d>", else one option text inside a short enough answer; "Z" for a refusal."""
    if "Cannot determine the answer" in response:
        return "Z"
    words = response
    for ch in ".()[],:;!*#{}":
        words = words.replace(ch, " ")
    words = words.split()
    found = [c for c in options if c in words]
    if len(found) == 1 and words.index(found[0]) > len(words) - 5:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    m = re.search(r"answer\s+is\s+\**([a-d])", response, re.I)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    if len(response) > 2 * sum(len(o) for o in options.values()):
        return None
    texts = [c for c, o in options.items() if o.lower() in response.lower()]
    return texts[0] if len(texts) == 1 else None


def b64(path):
    return base64.b64encode(path.read_bytes()).decode()


def write_tsv(path, rows):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(c, "") for c in header])


def test_mmbench_circular_end_to_end(trained, answer, tmp_path):
    word = answer(str(png(trained, 0)), "What is in the image?").split()[0].strip(".,?!")
    rows = [  # q0 offers the model's favourite word, q1 too but marks the other option, q2 never
        dict(index=0, question="What colour is the circle?", A=word, B="zebra", C="ocean", D="violin",
             category="color", **{"l2-category": "attribute"}),
        dict(index=1, question="Which animal is shown?", hint="Look closely.", A="zebra", B=word,
             category="animal", **{"l2-category": "object"}),
        dict(index=2, question="What is the weather?", A="zebra", B="ocean", C="violin", category="color",
             **{"l2-category": "attribute"}),
    ]
    for i, r in enumerate(rows):
        r.update(image=b64(png(trained, i)), answer="A")
    tsv = tmp_path / "mmbench_dev.tsv"
    write_tsv(tsv, rows)
    passes = mmbench.load_questions(str(tsv), str(tmp_path / "probe"))  # prompts do not depend on the answers
    asked = {q.question_id: answer(q.image_path, q.prompt) for q in passes}
    first = {q.group: mmbench_pred(asked[q.question_id], dict(zip(string.ascii_uppercase, q.options)))
             for q in passes if q.rotation == 0}
    rows[0]["answer"] = first[0] if first[0] in ("A", "B", "C", "D") else "A"   # (not None / "Z")
    rows[1]["answer"] = "A" if first[1] == "B" else "B"
    write_tsv(tsv, rows)

    xlsx = tmp_path / "submission.xlsx"
    with_extra = bool(importlib.util.find_spec("pandas") and importlib.util.find_spec("openpyxl"))
    saved = run(trained, "mmbench", tsv, tmp_path / "out", images=tmp_path / "images",
                extra=["--submission", str(xlsx)] if with_extra else [])
    recs = saved["questions"]
    if with_extra:  # the server's file: one row per TSV row, its rotation-0 answer as the prediction
        import pandas as pd
        sub = pd.read_excel(xlsx)
        assert list(sub["index"]) == [0, 1, 2]
        assert list(sub["prediction"].fillna("")) == [asked[i] for i in range(3)]
    assert len(recs) == 4 + 2 + 3 and {r["question_id"]: r["response"] for r in recs} == asked
    by_group = {}
    for r, q in zip(recs, passes):
        assert r["question_id"] == q.question_id
        pred = mmbench_pred(r["response"], dict(zip(string.ascii_uppercase, q.options)))
        assert r["pred"] == pred  # the library's extraction agrees with the rule written out above
        by_group.setdefault(q.group, []).append(pred == r["gt"])
    right = {g: all(v) for g, v in by_group.items()}
    m = saved["metrics"]
    assert m["accuracy"] == pytest.approx(sum(right.values()) / 3)
    assert m["num_unparsed"] == sum(r["pred"] is None for r in recs)
    assert m["by_category"] == pytest.approx({"animal": float(right[1]), "color": (right[0] + right[2]) / 2})
    assert not right[1] and not right[2]  # q1's marked answer is never what the model picks; q2 has no match


# ------------------------------------------------------------------------------------------------ TextVQA

def vqa_accuracy(pred, humans):
    """Leave-one-out VQA accuracy (the strings compared here need no normalisation beyond case)."""
    match = [h.strip().lower() == pred.strip().lower() for h in humans]
    m = sum(match)
    return sum(min(1.0, (m - x) / 3) for x in match) / len(match)


def test_textvqa_end_to_end(trained, answer, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, q in enumerate(["What is written on the sign?", "What brand is shown?", "What number is shown?",
                           "What does the label say?"]):
        Image.open(png(trained, i)).convert("RGB").save(images / f"img{i}.jpg")
        entries.append({"question_id": 100 + i, "question": q, "image_id": f"img{i}"})
    doc = tmp_path / "textvqa_val.json"
    doc.write_text(json.dumps({"data": entries}))
    asked = [answer(q.image_path, q.prompt) for q in textvqa.load_questions(str(doc), str(images))]
    # 4 humans agree with the model on q0 (-> 1.0), 2 on q1 (-> 0.6), none on q2 (-> 0); q3 is unscored
    for i, agree in enumerate((4, 2, 0)):
        entries[i]["answers"] = [asked[i]] * agree + [FILLER] * (10 - agree)
    doc.write_text(json.dumps({"data": entries}))

    saved = run(trained, "textvqa", doc, tmp_path / "out", images=images)
    recs = saved["questions"]
    assert [r["answer"] for r in recs] == asked
    scores = [vqa_accuracy(r["answer"], e["answers"]) for r, e in zip(recs[:3], entries)]
    assert scores == pytest.approx([1.0, 0.6, 0.0])
    assert [r["score"] for r in recs] == pytest.approx(scores + [None])
    m = saved["metrics"]
    assert m["accuracy"] == pytest.approx(sum(scores) / 3) and (m["num_questions"], m["num_scored"]) == (4, 3)

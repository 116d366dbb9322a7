"""Runner: dispatch, precomputed answers, command line, report table."""
import json

import pytest
from PIL import Image

from megatron_evomoe.eval import run_benchmark, score_answers
from megatron_evomoe.eval.report import format_table
from megatron_evomoe.eval.answer_records import read_answer_records
from megatron_evomoe.eval.runner import main, read_answers_jsonl


def _pope(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    lines = []
    for i, label in enumerate(["yes", "no", "yes", "no"]):
        Image.new("RGB", (4, 4)).save(images / f"{i}.jpg")
        lines.append(json.dumps({"question_id": i, "image": f"{i}.jpg",
                                 "text": f"Is there a q{i}?", "label": label}))
    qfile = tmp_path / "coco_pope_random.json"
    qfile.write_text("\n".join(lines) + "\n")
    return qfile, images


def test_cli_scores_precomputed_answers(tmp_path, capsys):
    qfile, images = _pope(tmp_path)
    answers = tmp_path / "answers.jsonl"
    # LLaVA answer files call the answer "text"; both keys are read.
    answers.write_text('{"question_id": 0, "answer": "Yes"}\n{"question_id": 1, "text": "No"}\n'
                       '{"question_id": 2, "answer": "No"}\n\n{"question_id": 3, "answer": "yes"}\n')
    res = main(["--benchmark", "pope", "--data", str(qfile), "--images", str(images),
                "--answers-jsonl", str(answers), "--out-dir", str(tmp_path / "out")])
    m = res["metrics"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    assert res["output_json"] == str(tmp_path / "out" / "pope.json")
    out = capsys.readouterr().out
    assert "accuracy" in out and "0.5000" in out


def test_missing_answers_and_unknown_benchmark(tmp_path):
    qfile, images = _pope(tmp_path)
    with pytest.raises(ValueError, match=r"no answer for 2 of 4 questions, e\.g\. question_id 2, 3"):
        score_answers("pope", str(qfile), str(images), {0: "yes", "1": "no"}, str(tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark 'gqa'"):
        run_benchmark("gqa", str(qfile), str(images), lambda i, p: "yes", str(tmp_path))
    with pytest.raises(ValueError, match="answer_fn returned NoneType for question 0"):
        run_benchmark("pope", str(qfile), str(images), lambda i, p: None, str(tmp_path))


def test_read_answers_jsonl_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 1, "answer": "x"}\n{"question_id": 1, "answer": "y"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: duplicate question_id 1"):
        read_answers_jsonl(str(path))
    path.write_text('{"question_id": 1, "answer": "x"}\n{"answer": "y"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: expected an object with a 'question_id'"):
        read_answers_jsonl(str(path))
    path.write_text('[1, 2\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:1: not valid JSON"):
        read_answers_jsonl(str(path))


def test_format_table():
    table = format_table("pope", [("f1", 0.5714285), ("tp", 2), ("missing", None)])
    lines = table.splitlines()
    assert lines[0] == "pope"
    assert lines[4] == "f1       0.5714"
    assert lines[5] == "tp            2"
    assert lines[6] == "missing       -"


def test_empty_question_file(tmp_path):
    qfile = tmp_path / "empty.jsonl"
    qfile.write_text("\n")
    with pytest.raises(ValueError, match="pope: no questions found in"):
        run_benchmark("pope", str(qfile), str(tmp_path), lambda i, p: "yes", str(tmp_path))


def test_answers_file_lines_matched_and_counted(tmp_path, capsys):
    qfile, images = _pope(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n"
                               for i, a in enumerate(["Yes", "No", "No", "yes", "no"])))  # id 4: no question
    res = main(["--benchmark", "pope", "--data", str(qfile), "--images", str(images), "--limit", "2",
                "--answers-jsonl", str(answers), "--out-dir", str(tmp_path / "out")])
    assert res["metrics"]["num_questions"] == 2 and res["metrics"]["accuracy"] == 1.0
    assert res["num_unmatched_answers"] == 3       # ids 2, 3 past --limit, and 4
    answers.write_text('{"question_id": 1, "text": "x"}\n{"question_id": 1, "text": "y"}\n')
    with pytest.raises(ValueError, match=r"answers\.jsonl:2: duplicate question_id 1"):
        score_answers("pope", str(qfile), str(images), read_answer_records(str(answers)), str(tmp_path))


def test_flag_of_another_benchmark_is_a_usage_error(tmp_path, capsys):
    qfile, images = _pope(tmp_path)
    for flag in (["--annotations", str(tmp_path)], ["--textvqa-ocr"], ["--no-circular"]):
        with pytest.raises(SystemExit):
            main(["--benchmark", "mme", "--data", str(qfile), "--answers-jsonl", str(qfile)] + flag)
        assert f"{flag[0]} applies to --benchmark" in capsys.readouterr().err


def test_run_benchmark_strips_model_answers_as_llava_writes_them(tmp_path):
    qfile, images = _pope(tmp_path)
    res = run_benchmark("pope", str(qfile), str(images), lambda i, p: "\tNo\n", str(tmp_path))
    assert [q["answer"] for q in res["questions"]] == ["No"] * 4
    assert res["metrics"]["tn"] == 2 and res["metrics"]["fn"] == 2

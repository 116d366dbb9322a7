"""Run or score a benchmark: POPE, MME, MMBench or TextVQA.

`run_benchmark` loads and checks the benchmark (every image present before the
model sees anything), asks ``answer_fn(image_path, prompt) -> str`` each question,
scores the answers like the official scripts, writes ``<out_dir>/<name>.json``
(metrics + per-question answers and scores) and prints a table of the metrics; for POPE,
MME and TextVQA it also writes the answers as LLaVA writes them, ``<out_dir>/<name>_answers.jsonl``,
which the official scripts (and `score_answers`) read.

`score_answers` does the same with answers computed beforehand: a ``{question_id: answer}``
mapping, or the lines of an answers file (`answer_records.read_answer_records`); it backs the
command line:

    python -m megatron_evomoe.eval.runner --benchmark pope --data FILE --images DIR \\
        --answers-jsonl FILE [--annotations DIR] [--textvqa-ocr] [--out-dir DIR] [--limit N] [--no-circular] \\
        [--submission FILE.xlsx]

The answers file has one ``{"question_id": ..., "answer": "..."}`` per line (``"text"`` is
accepted for ``"answer"``: LLaVA's answer files are read as they are, their ``prompt`` used where
the official scripts use it).  Question ids: POPE and TextVQA use the question file's
``question_id``; MMBench the row ``index``, with rotated passes numbered ``k * 1000000 + index``;
MME ``"<category>/<image>#<n>"`` with n = 0, 1 the question's position among its image's
questions.  LLaVA's own keys work too: MME ``"<category>/<image file>"`` and TextVQA's image id,
each shared by the questions of one image and told apart by the answer's ``prompt`` (see
`mme.match_answers`, `textvqa.match_answers`).  An answers file of which no line answers a
question is an error naming it; lines that answer nothing (e.g. past ``--limit``) are counted in
``num_unmatched_answers``.  `run_benchmark` strips the model's answers, as LLaVA's answer writer
does; answers read from a file are scored as written.

``limit`` (N >= 1) keeps the first N questions of the file (MMBench: the first N base
questions, each with all its circular passes; MME: N questions, so a cut may leave
an image with one question, scored on that one).

Benchmark options (keyword arguments / flags): ``prompt_suffix`` for all four,
``circular`` for MMBench, ``annotations`` (the COCO POPE annotation folder, which holds the
labels of LLaVA's ``llava_pope_test.jsonl``) for POPE, ``ocr_tokens`` (LLaVA-1.5's
"Reference OCR token:" prompt) for TextVQA.  For MMBench ``image_root`` is where the TSV's
images are decoded to (a temporary folder when None); for MME it defaults to ``data_path``.
``--submission FILE.xlsx`` (MMBench) also writes the evaluation server's file
(`mmbench_submission`; pandas + openpyxl, the ``[eval]`` extra).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
from . import mmbench, mmbench_submission, mme, pope, textvqa
from .answer_records import (Answers, by_question_id, check_some_matched, match_by_id,
                             not_utf8, read_answer_records, write_llava_answers)
from .report import write_report

AnswerFn = Callable[[Optional[str], str], str]

BENCHMARKS = {"pope": pope, "mme": mme, "mmbench": mmbench, "textvqa": textvqa}


def _module(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def _load(name: str, data_path: str, image_root: Optional[str], limit: Optional[int],
          options: Mapping[str, Any], stack: contextlib.ExitStack):
    if name == "mmbench" and image_root is None:
        image_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench_images_"))
    if limit is not None and limit < 1:  # questions[:-1] would silently drop the last question
        raise ValueError(f"{name}: limit must be >= 1 (None: every question), got {limit}")
    if image_root is None and name in ("pope", "textvqa"):
        raise ValueError(f"{name}: an image folder is needed (image_root / --images)")
    try:
        questions = _module(name).load_questions(data_path, image_root, limit=limit, **options)
    except UnicodeDecodeError as e:  # a binary or Latin-1 file given as the questions
        raise ValueError(f"{name}: {not_utf8(data_path, e)}") from None
    if not questions:
        raise ValueError(f"{name}: no questions found in {data_path}")
    return questions


def _finish(name: str, data_path: str, questions: Sequence[Any], responses: Mapping[str, str],
            out_dir: str, num_unmatched: int = 0, model_id: Optional[str] = None) -> Dict[str, Any]:
    result = _module(name).score(questions, responses)
    result["data"] = data_path
    result["num_unmatched_answers"] = num_unmatched
    key = getattr(_module(name), "llava_question_id", None)
    if model_id is not None and key is not None:  # the official scripts can read these answers
        result["answers_jsonl"] = write_llava_answers(
            os.path.join(out_dir, f"{name}_answers.jsonl"), questions, responses, key, model_id)
    rows = _module(name).summary_rows(result["metrics"])
    result["output_json"] = write_report(result, rows, out_dir)
    return result


def run_benchmark(
    name: str, data_path: str, image_root: Optional[str], answer_fn: AnswerFn, out_dir: str,
    limit: Optional[int] = None, model_id: str = "megatron_evomoe", write: bool = True, **options: Any,
) -> Dict[str, Any]:
    """Ask `answer_fn` every question of benchmark `name`, score, write JSON + print a table.

    POPE, MME and TextVQA answers are also written as LLaVA writes them,
    ``<out_dir>/<name>_answers.jsonl`` (``model_id`` in each line), for the official scripts.
    Returns ``{"benchmark", "data", "metrics", "questions", "output_json", ...}``; with
    ``write=False`` only ``{"responses"}``: a parallel run's other ranks ask the same questions in
    step with the main rank (their decoding is collective) and leave the files to it.
    """
    with contextlib.ExitStack() as stack:
        questions = _load(name, data_path, image_root, limit, options, stack)
        responses: Dict[str, str] = {}
        for q in questions:
            answer = answer_fn(q.image_path, q.prompt)
            if not isinstance(answer, str):
                raise ValueError(f"{name}: answer_fn returned {type(answer).__name__} for question "
                                 f"{q.question_id!r}, expected str")
            responses[str(q.question_id)] = answer.strip()  # as LLaVA's answer files hold it
        if not write:
            return {"responses": responses}
        return _finish(name, data_path, questions, responses, out_dir, model_id=model_id)


def score_answers(
    name: str, data_path: str, image_root: Optional[str], answers: Answers,
    out_dir: str, limit: Optional[int] = None, **options: Any,
) -> Dict[str, Any]:
    """Score answers computed beforehand like `run_benchmark`: a ``{question_id: answer}``
    mapping, or `AnswerRecord` lines of an answers file (matched as the module says)."""
    with contextlib.ExitStack() as stack:
        questions = _load(name, data_path, image_root, limit, options, stack)
    num_unmatched = 0
    if isinstance(answers, Mapping):
        by_id = {str(k): v for k, v in answers.items()}
    else:
        match = getattr(_module(name), "match_answers", match_by_id)
        by_id, unmatched = match(questions, answers)
        check_some_matched(answers, by_id, data_path)
        num_unmatched = len(unmatched)
    missing = [q.question_id for q in questions if str(q.question_id) not in by_id]
    if missing:
        raise ValueError(f"{name}: no answer for {len(missing)} of {len(questions)} questions, "
                         f"e.g. question_id {', '.join(repr(m) for m in missing[:5])}")
    return _finish(name, data_path, questions, by_id, out_dir, num_unmatched)


def read_answers_jsonl(path: str) -> Dict[str, str]:
    """``{str(question_id): answer}`` from a JSON-lines file of precomputed answers."""
    return by_question_id(read_answer_records(path))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = ArgumentParser(prog="python -m megatron_evomoe.eval.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--data", required=True,
                        help="question file (POPE jsonl, MMBench tsv, TextVQA json) or MME root")
    parser.add_argument("--images", default=None, help="image folder (MMBench: where to decode)")
    parser.add_argument("--answers-jsonl", required=True, help='lines {"question_id", "answer"}')
    parser.add_argument("--out-dir", default="eval_results")
    parser.add_argument("--limit", type=int_at_least(1), default=None,
                        help="score only the first N questions (N >= 1)")
    add_benchmark_flags(parser)
    args = parser.parse_args(argv)
    options = benchmark_options(parser, args)
    try:
        submission = start_submission(args)
        result = score_answers(args.benchmark, args.data, args.images,
                               read_answer_records(args.answers_jsonl), args.out_dir,
                               limit=args.limit, **options)
        return finish_submission(result, submission)
    except USER_ERRORS as e:  # a bad question or answers file, a missing image
        raise SystemExit(user_error(e)) from None


def add_benchmark_flags(parser) -> None:
    """The flags of one benchmark each (shared with `model_answers`): read by `benchmark_options`."""
    parser.add_argument("--no-circular", action="store_true", help="MMBench: vanilla evaluation")
    parser.add_argument("--annotations", default=None,
                        help="POPE: the folder of coco_pope_<split>.json label files (LLaVA's llava_pope_test.jsonl)")
    parser.add_argument("--textvqa-ocr", action="store_true",
                        help="TextVQA: LLaVA-1.5's prompt with the question's 'Reference OCR token:' line")
    parser.add_argument("--submission", default=None, metavar="FILE.xlsx",
                        help="MMBench: also write the evaluation server's .xlsx (the [eval] extra)")


def benchmark_options(parser, args) -> Dict[str, Any]:
    """Benchmark options from the flags; a flag of another benchmark is a usage error."""
    flags = (("no_circular", "--no-circular", "mmbench", "circular", False),
             ("annotations", "--annotations", "pope", "annotations", args.annotations),
             ("textvqa_ocr", "--textvqa-ocr", "textvqa", "ocr_tokens", True),
             ("submission", "--submission", "mmbench", None, None))
    options: Dict[str, Any] = {}
    for attr, flag, benchmark, option, value in flags:
        if getattr(args, attr) in (None, False):
            continue
        if args.benchmark != benchmark:
            parser.error(f"{flag} applies to --benchmark {benchmark} only")
        if option is not None:  # (--submission is a file written after scoring, not a load option)
            options[option] = value
    return options


def start_submission(args) -> Optional[str]:
    """The ``--submission`` path, its [eval] extra checked before any scoring or model call."""
    if args.submission:
        mmbench_submission.require_eval_extra()
    return args.submission


def finish_submission(result: Dict[str, Any], submission: Optional[str]) -> Dict[str, Any]:
    """Write the MMBench server's file of a scored run when ``--submission`` asked for it."""
    if submission:
        result["submission"] = mmbench_submission.write_result_submission(result, submission)
    return result


if __name__ == "__main__":
    main()

"""Run or score a benchmark: POPE, MME, MMBench or TextVQA.

`run_benchmark` loads and checks the benchmark (every image present before the
model sees anything), asks ``answer_fn(image_path, prompt) -> str`` each question,
scores the answers like the official scripts, writes ``<out_dir>/<name>.json``
(metrics + per-question answers and scores) and prints a table of the metrics.

`score_answers` does the same with answers computed beforehand, keyed by
question id; it backs the command line:

    python -m megatron_evomoe.eval.runner --benchmark pope --data FILE --images DIR \\
        --answers-jsonl FILE [--out-dir DIR] [--limit N] [--no-circular] [--submission FILE.xlsx]

The answers file has one ``{"question_id": ..., "answer": "..."}`` per line
(``"text"`` is accepted for ``"answer"``, as in LLaVA answer files).  Question ids:
POPE and TextVQA use the file's ``question_id``; MMBench the row ``index``, with
rotated passes numbered ``k * 1000000 + index`` (LLaVA's ``round_id`` k is read so);
MME ``"<category>/<image>#<n>"`` with n = 0, 1 the question's position among its image's questions.

``limit`` (N >= 1) keeps the first N questions of the file (MMBench: the first N base
questions, each with all its circular passes; MME: N questions, so a cut may leave
an image with one question, scored on that one).

Benchmark options (keyword arguments / flags): ``prompt_suffix`` for all four,
``circular`` for MMBench.  For MMBench ``image_root`` is where the TSV's images
are decoded to (a temporary folder when None); for MME it defaults to ``data_path``.
``--submission FILE.xlsx`` (MMBench) also writes the evaluation server's file
(`mmbench_submission`; pandas + openpyxl, the ``[eval]`` extra).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
from . import mmbench, mmbench_submission, mme, pope, textvqa
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
            out_dir: str) -> Dict[str, Any]:
    result = _module(name).score(questions, responses)
    result["data"] = data_path
    rows = _module(name).summary_rows(result["metrics"])
    result["output_json"] = write_report(result, rows, out_dir)
    return result


def run_benchmark(
    name: str, data_path: str, image_root: Optional[str], answer_fn: AnswerFn, out_dir: str,
    limit: Optional[int] = None, **options: Any,
) -> Dict[str, Any]:
    """Ask `answer_fn` every question of benchmark `name`, score, write JSON + print a table.

    Returns ``{"benchmark", "data", "metrics", "questions", "output_json", ...}``.
    """
    with contextlib.ExitStack() as stack:
        questions = _load(name, data_path, image_root, limit, options, stack)
        responses: Dict[str, str] = {}
        for q in questions:
            answer = answer_fn(q.image_path, q.prompt)
            if not isinstance(answer, str):
                raise ValueError(f"{name}: answer_fn returned {type(answer).__name__} for question "
                                 f"{q.question_id!r}, expected str")
            responses[str(q.question_id)] = answer
        return _finish(name, data_path, questions, responses, out_dir)


def score_answers(
    name: str, data_path: str, image_root: Optional[str], answers: Mapping[Any, str],
    out_dir: str, limit: Optional[int] = None, **options: Any,
) -> Dict[str, Any]:
    """Score answers computed beforehand (``{question_id: answer}``) like `run_benchmark`."""
    by_id = {str(k): v for k, v in answers.items()}
    with contextlib.ExitStack() as stack:
        questions = _load(name, data_path, image_root, limit, options, stack)
    missing = [q.question_id for q in questions if str(q.question_id) not in by_id]
    if missing:
        raise ValueError(f"{name}: no answer for {len(missing)} of {len(questions)} questions, "
                         f"e.g. question_id {', '.join(repr(m) for m in missing[:5])}")
    return _finish(name, data_path, questions, by_id, out_dir)


def not_utf8(path, e: UnicodeDecodeError) -> str:
    return f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"


def read_answers_jsonl(path: str,
                       key_fn: Optional[Callable[[Mapping[str, Any]], str]] = None) -> Dict[str, str]:
    """``{key_fn(record): answer}`` from a JSON-lines file of precomputed answers.

    `key_fn` (default ``str(record["question_id"])``) is the benchmark's ``answer_key`` where it has one.
    """
    answers: Dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")  # (not splitlines: U+2028 may sit inside a JSON string)
    except UnicodeDecodeError as e:  # (name the file and where: the decoder's message names neither)
        raise ValueError(not_utf8(path, e)) from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise ValueError(f"{where}: expected an object with a 'question_id'")
        key = "answer" if "answer" in rec else "text"
        if not isinstance(rec.get(key), str):
            raise ValueError(f"{where}: expected a string 'answer' (or 'text')")
        try:
            qid = key_fn(rec) if key_fn is not None else str(rec["question_id"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if qid in answers:
            raise ValueError(f"{where}: duplicate question_id {rec['question_id']!r}")
        answers[qid] = rec[key]
    return answers


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
    parser.add_argument("--no-circular", action="store_true", help="MMBench: vanilla evaluation")
    parser.add_argument("--submission", default=None, metavar="FILE.xlsx",
                        help="MMBench: also write the evaluation server's .xlsx (the [eval] extra)")
    args = parser.parse_args(argv)
    for flag, given in (("--no-circular", args.no_circular), ("--submission", args.submission)):
        if given and args.benchmark != "mmbench":
            parser.error(f"{flag} applies to --benchmark mmbench only")
    options = {"circular": False} if args.no_circular else {}
    try:
        if args.submission:
            mmbench_submission.require_eval_extra()  # before scoring, not after
        key_fn = getattr(_module(args.benchmark), "answer_key", None)   # MMBench: LLaVA's round_id
        answers = read_answers_jsonl(args.answers_jsonl, key_fn)
        result = score_answers(args.benchmark, args.data, args.images, answers, args.out_dir,
                               limit=args.limit, **options)
        if args.submission:
            result["submission"] = mmbench_submission.write_submission(args.data, answers, args.submission)
        return result
    except USER_ERRORS as e:  # a bad question or answers file, a missing image
        raise SystemExit(user_error(e)) from None


if __name__ == "__main__":
    main()

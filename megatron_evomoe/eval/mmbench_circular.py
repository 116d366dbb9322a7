"""MMBench scoring: VLMEvalKit's circular (and vanilla) evaluation with exact matching only.

Every pass (one rotation of a question's options) gets a prediction from
`mmbench_matching.infer_choice`.  A question (all passes sharing ``index % 1e6``)
is right when every pass predicts its correct letter.  VLMEvalKit, with no
judge, decides a question from these predictions alone when one pass predicts a
wrong letter (or "Z") or when all are right; otherwise (some pass inferred
nothing, none wrong) it would ask its LLM judge for the passes left.  Here no
judge is asked: such a question is wrong, and ``num_judge_questions`` counts
them (``num_unparsed``: the passes with nothing inferred).  With one pass per
question (vanilla evaluation) the same rule applies to that pass.
"""
from __future__ import annotations

import string
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .mmbench_matching import infer_choice


def _pass_record(q: Any, response: str) -> Dict[str, Any]:
    pred = infer_choice(response, dict(zip(string.ascii_uppercase, q.options)))
    return {
        "question_id": q.question_id, "group": q.group, "rotation": q.rotation,
        "category": q.category, "l2-category": q.l2_category, "prompt": q.prompt,
        "gt": q.answer, "response": response, "pred": pred,
        "correct": None if q.answer is None else pred == q.answer,
    }


def _group_record(group: int, passes: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    scored = all(p["correct"] is not None for p in passes)
    # VLMEvalKit's pre-fetch: a pass that inferred a wrong letter decides the question.
    decided_wrong = any(p["pred"] is not None and not p["correct"] for p in passes)
    correct: Optional[bool] = all(p["correct"] for p in passes) if scored else None
    return {
        "group": group, "category": passes[0]["category"], "l2-category": passes[0]["l2-category"],
        "num_passes": len(passes), "correct": correct,
        "needs_judge": bool(scored and not correct and not decided_wrong),
    }


def _accuracy_by(groups: Sequence[Dict[str, Any]], key: str) -> Dict[str, float]:
    buckets: Dict[str, List[bool]] = {}
    for g in groups:
        if g[key] is not None:
            buckets.setdefault(g[key], []).append(g["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(buckets.items())}


def score_passes(questions: Sequence[Any], responses: Mapping[str, str]) -> Dict[str, Any]:
    """Score `responses` (keyed by ``str(question_id)``) of MMBench `questions` (their passes).

    -> ``{"metrics", "questions": per-pass records, "groups": per-question records}``.
    """
    records = [_pass_record(q, responses[str(q.question_id)]) for q in questions]
    grouped: Dict[int, List[Dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r["group"], []).append(r)
    groups = [_group_record(g, rs) for g, rs in grouped.items()]
    scored = [g for g in groups if g["correct"] is not None]
    metrics: Dict[str, Any] = {
        "accuracy": sum(g["correct"] for g in scored) / len(scored) if scored else None,
        "num_questions": len(groups), "num_scored": len(scored),
        "num_passes": len(records),
        "num_unparsed": sum(r["pred"] is None for r in records),
        "num_judge_questions": sum(g["needs_judge"] for g in groups),
        "by_category": _accuracy_by(scored, "category"),
        "by_l2_category": _accuracy_by(scored, "l2-category"),
    }
    return {"metrics": metrics, "questions": records, "groups": groups}


def summary_rows(metrics: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = [(k, metrics[k]) for k in (
        "accuracy", "num_questions", "num_scored", "num_passes", "num_unparsed")]
    # (the questions VLMEvalKit would have sent to its LLM judge, counted wrong here)
    rows.append(("num_judge_questions (wrong, no LLM judge)", metrics["num_judge_questions"]))
    rows += [(f"l2/{k}", v) for k, v in metrics["by_l2_category"].items()]
    rows += [(f"category/{k}", v) for k, v in metrics["by_category"].items()]
    return rows

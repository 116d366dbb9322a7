"""Benchmark scorers: POPE, MME, MMBench and TextVQA, scored like their official scripts.

Model-agnostic: a run asks ``answer_fn(image_path, prompt) -> str`` each question
(see `runner.run_benchmark`); `pope.pope_metrics` is also usable on its own.
"""
from .pope import pope_metrics

__all__ = ["pope_metrics", "run_benchmark", "score_answers"]


def __getattr__(name):
    # Imported lazily so `python -m megatron_evomoe.eval.runner` does not find the
    # runner module already imported by its own package.
    if name in ("run_benchmark", "score_answers"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Shared checks of the benchmark loaders."""
from __future__ import annotations

import pytest

from megatron_evomoe.eval import run_benchmark


@pytest.fixture
def assert_missing_image_reported(tmp_path):
    """run_benchmark on a question file with a missing image fails before the model is asked anything,
    naming the file, the question id and the missing path."""
    def check(benchmark: str, question_file, image_root, question_id: str, missing_path) -> None:
        calls = []
        with pytest.raises(ValueError) as err:
            run_benchmark(benchmark, str(question_file), str(image_root), lambda i, p: calls.append(p) or "x",
                          str(tmp_path / "out"))
        msg = str(err.value)
        assert str(question_file) in msg and question_id in msg and str(missing_path) in msg
        assert calls == []
    return check

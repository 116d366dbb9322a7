"""Fixtures of the converter tests (helpers live in helpers.py)."""
import pytest

from .helpers import write_tokenizer


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers", reason="HF parity tests need `transformers` (pip install .[test])")


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, name, **kw) -> folder with the model (safetensors) and a tokenizer."""
    def save(model, name, tokenizer=True, **kwargs):
        out = tmp_path / name
        model.save_pretrained(out, **kwargs)
        if tokenizer:
            write_tokenizer(out)
        return out
    return save

"""parallel/compile.py::apply_compile: every decoder layer compiled in place, names kept, absent
pipeline slots skipped, idempotent, and a compiled layer follows a child swapped by a stage change."""
import pytest
import torch

import megatron_evomoe.parallel.compile as compile_mod
from megatron_evomoe.model.absent import AbsentModule
from megatron_evomoe.model.llm import FFN, DecoderLM
from megatron_evomoe.model.mllm import MultimodalLM
from megatron_evomoe.parallel.compile import apply_compile, is_compiled

from tests.model.test_llm import tiny_cfg


@pytest.fixture(autouse=True)
def cheap_backend(monkeypatch):
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")  # inductor is checked in tests/moe/test_moe_compile.py
    torch._dynamo.reset()


def forward(lm, h):
    return lm(h, torch.zeros(h.shape[:2], dtype=torch.long))[0]


def test_decoder_lm_layers_compile_in_place_with_the_same_names_and_values():
    torch.manual_seed(0)
    lm = DecoderLM(tiny_cfg().model)
    keys = list(lm.state_dict())
    h = torch.randn(2, 8, 32)
    eager = forward(lm, h)
    assert apply_compile(lm) is lm
    assert all(is_compiled(layer) for layer in lm.layers) and not is_compiled(lm)
    assert list(lm.state_dict()) == keys
    torch.testing.assert_close(forward(lm, h), eager, rtol=1e-5, atol=1e-6)
    calls = [layer._compiled_call_impl for layer in lm.layers]
    apply_compile(lm)  # parallelize runs again after each stage change: nothing is compiled twice
    assert [layer._compiled_call_impl for layer in lm.layers] == calls


def test_multimodal_lm_skips_absent_pipeline_slots():
    model = MultimodalLM(tiny_cfg(), image_token_id=3)
    model.llm.layers[0] = AbsentModule("decoder layer 0")
    apply_compile(model)
    assert not is_compiled(model.llm.layers[0]) and is_compiled(model.llm.layers[1])


def test_a_compiled_layer_runs_the_child_a_stage_change_installed():
    torch.manual_seed(0)
    lm = DecoderLM(tiny_cfg().model)
    h = torch.randn(2, 8, 32)
    apply_compile(lm)
    before = forward(lm, h)
    lm.layers[1].mlp = FFN(32, 48)  # new weights, as a structure change installs them
    after = forward(lm, h)
    assert not torch.allclose(after, before)
    torch._dynamo.reset()
    for layer in lm.layers:
        layer._compiled_call_impl = None  # back to eager: the reference
    torch.testing.assert_close(after, forward(lm, h), rtol=1e-5, atol=1e-6)


def test_a_model_without_decoder_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="train.compile"):
        apply_compile(torch.nn.Linear(2, 2))

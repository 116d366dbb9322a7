"""Clear errors: unsupported architectures, missing tensors, mismatched shapes, bad destinations.

The Hugging Face folders here are written by our own exporter (a LLaMA-layout folder) and then
edited, so these tests need neither transformers nor a download.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_evomoe.convert import ConversionError, evomoe_to_hf, hf_to_evomoe
from megatron_evomoe.convert.__main__ import main as convert_main

from .helpers import make_run

quiet = dict(echo=lambda s: None)


@pytest.fixture
def llama_dir(tmp_path):
    """A valid LLaMA-layout HF folder (4 layers, hidden 32, FFN 48)."""
    run, _, _ = make_run(tmp_path / "ours", "--vision.enabled=false", "--moe.layers=none",
                         "--stages=[{name: s, steps: 1}]")
    out = tmp_path / "hf"
    evomoe_to_hf(run, out, "llama", **quiet)
    return out


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_valid_folder_converts(llama_dir, tmp_path):
    assert hf_to_evomoe(llama_dir, tmp_path / "run", **quiet).is_dir()


@pytest.mark.parametrize("model_type, arch, words", [
    ("gemma", "GemmaForCausalLM", ["sqrt(hidden)", "GeGLU"]),
    ("gpt2", "GPT2LMHeadModel", ["not a supported decoder", "llama, mistral, qwen2, mixtral, qwen2_moe, phi, stablelm"]),
])
def test_unsupported_architecture_names_model_type(llama_dir, tmp_path, model_type, arch, words):
    edit_config(llama_dir, model_type=model_type, architectures=[arch])
    with pytest.raises(ConversionError) as err:
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)
    msg = str(err.value)
    assert f"model_type={model_type!r}" in msg and arch in msg and "config.json" in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("changes, words", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling 'llama3'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(head_dim=16), "head_dim=16"),
    (dict(model_type="stablelm", architectures=["StableLmForCausalLM"], qk_layernorm=True), "qk_layernorm=true"),
    (dict(model_type="phi", architectures=["PhiForCausalLM"], hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=1),
     "num_experts_per_tok=1"),
])
def test_unsupported_features(llama_dir, tmp_path, changes, words):
    edit_config(llama_dir, **changes)
    with pytest.raises(ConversionError, match="unsupported checkpoint") as err:
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)
    assert words in str(err.value)


def test_missing_tensor_names_tensor_and_file(llama_dir, tmp_path):
    edit_tensors(llama_dir, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(ConversionError) as err:
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)
    assert "'model.layers.2.self_attn.k_proj.weight' not found in model.safetensors" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_missing_shard_named(llama_dir, tmp_path):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="missing: model-00001-of-00002.safetensors"):
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)


def test_shape_mismatch_names_tensor_shapes_and_file(llama_dir, tmp_path):
    edit_config(llama_dir, intermediate_size=64)  # the tensors are 48 wide
    with pytest.raises(ConversionError) as err:
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "'model.layers.0.mlp.gate_proj.weight' has shape [48, 32], expected [64, 32]" in msg


def test_unmapped_tensor_is_an_error(llama_dir, tmp_path):
    """A tensor the conversion would silently drop (here an o_proj bias) means a feature we lack."""
    edit_tensors(llama_dir, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.ones(32)))
    with pytest.raises(ConversionError, match="does not map: model.layers.0.self_attn.o_proj.bias"):
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)


def test_source_and_destination_errors(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        hf_to_evomoe(tmp_path, tmp_path / "run", **quiet)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        hf_to_evomoe(llama_dir, tmp_path / "full", **quiet)
    edit_config(llama_dir, model_type="clip_vision_model")
    with pytest.raises(ConversionError, match="--vision-src"):
        hf_to_evomoe(llama_dir, tmp_path / "run", **quiet)


def test_cli_reports_one_line_and_exit_2(llama_dir, tmp_path, capsys):
    edit_config(llama_dir, model_type="phi", architectures=["PhiForCausalLM"])
    assert convert_main(["hf-to-evomoe", "--src", str(llama_dir), "--dst", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conversion error: ") and "PhiForCausalLM" in err and err.count("\n") == 1

"""Export to Hugging Face: transformers loads the folder with the same logits, and re-importing the
export gives back exactly the same state dict (and, for the project's own format, the same model)."""
import json

import pytest
import torch

from megatron_evomoe.convert import ConversionError, evomoe_to_hf, hf_to_evomoe
from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.data.conversation_templates import NAMED_TEMPLATES
from megatron_evomoe.training.restore import load_trained_model

from .helpers import EVO_STAGES, IMAGE_ID, SMALL_LLM, SMALL_VISION, make_run, randomize, text_ids

TOL = 1e-4
quiet = dict(echo=lambda s: None)


def reimport_state(src, dst):
    hf_to_evomoe(src, dst, **quiet)
    return ckpt.load_checkpoint(ckpt.find_latest(dst))


def assert_same_state(a, b):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def ids_without_image(seed=1):
    return torch.randint(5, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral", "phi", "stablelm", "qwen2_moe"])
def test_import_export_roundtrip(hf, save_hf, tmp_path, kind):
    cls, cfg_cls, extra = {"llama": ("LlamaForCausalLM", "LlamaConfig", {}),
                           "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
                           "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                                       dict(num_local_experts=4, num_experts_per_tok=2)),
                           "phi": ("PhiForCausalLM", "PhiConfig", {}),
                           "stablelm": ("StableLmForCausalLM", "StableLmConfig",
                                        dict(use_qkv_bias=True, use_parallel_residual=True)),
                           "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",  # with a shared expert
                                         dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                              shared_expert_intermediate_size=40, mlp_only_layers=[0]))}[kind]
    m = randomize(getattr(hf, cls)(getattr(hf, cfg_cls)(**SMALL_LLM, **extra)))
    hf_to_evomoe(save_hf(m, kind), tmp_path / "run", **quiet)
    assert convert_main(["evomoe-to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "out"),
                         "--max-shard-size", "20KB"]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    back = hf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = text_ids()
    with torch.no_grad():
        assert float((back(input_ids=ids).logits - m(input_ids=ids).logits).abs().max()) < TOL
    before = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "run"))["model"]
    assert_same_state(before, reimport_state(out, tmp_path / "again")["model"])


def test_alternate_layer_top1_moe_exports_as_qwen2_moe(hf, tmp_path):
    """EvoMoE's layout (MoE on alternate layers, linear router, top-1 gate = its probability)."""
    run, model, cfg = make_run(tmp_path, "--vision.enabled=false", "--moe.init=copy", "--router.type=linear",
                               "--moe.top_k=1", "--stages=[{name: moe, steps: 1, moe_mode: sparse}]")
    with pytest.raises(ConversionError, match="MoE on every layer"):
        evomoe_to_hf(run, tmp_path / "mixtral", "mixtral", **quiet)
    evomoe_to_hf(run, tmp_path / "out", **quiet)
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["model_type"] == "qwen2_moe" and hf_cfg["mlp_only_layers"] == [0, 2]
    assert hf_cfg["norm_topk_prob"] is False and hf_cfg["num_experts_per_tok"] == 1
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = ids_without_image()
    with torch.no_grad():
        assert float((back(input_ids=ids).logits - model(ids).logits).abs().max()) < TOL
    state = ckpt.load_checkpoint(ckpt.find_latest(run))["model"]
    assert_same_state(state, reimport_state(tmp_path / "out", tmp_path / "again")["model"])


def test_llava_export_roundtrip(hf, save_hf, tmp_path):
    cfg = hf.LlavaConfig(vision_config=hf.CLIPVisionConfig(**SMALL_VISION), text_config=hf.LlamaConfig(**SMALL_LLM),
                         image_token_index=IMAGE_ID)
    m = randomize(hf.LlavaForConditionalGeneration(cfg))
    hf_to_evomoe(save_hf(m, "llava"), tmp_path / "run", **quiet)
    evomoe_to_hf(tmp_path / "run", tmp_path / "out", **quiet)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_token_index"] == IMAGE_ID
    back = hf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = text_ids()
    ids[:, 1:5] = IMAGE_ID
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert float((back(input_ids=ids, pixel_values=x).logits -
                      m(input_ids=ids, pixel_values=x).logits).abs().max()) < TOL
    before = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "run"))["model"]
    assert_same_state(before, reimport_state(tmp_path / "out", tmp_path / "again")["model"])



def test_pad_llava_exports_a_padding_processor_and_reimports_as_pad(hf, save_hf, tmp_path):
    """do_pad=true in -> image_mode pad -> an export whose AutoProcessor pads a non-square image as we do
    (same pixels, same logits) -> re-imported as pad."""
    from PIL import Image
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from megatron_evomoe.generate import image_processor_for
    cfg = hf.LlavaConfig(vision_config=hf.CLIPVisionConfig(**SMALL_VISION), text_config=hf.LlamaConfig(**SMALL_LLM),
                         image_token_index=IMAGE_ID)
    src = save_hf(randomize(hf.LlavaForConditionalGeneration(cfg), seed=5), "llava")
    LlavaImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                           do_pad=True).save_pretrained(src)
    hf_to_evomoe(src, tmp_path / "run", **quiet)
    model, ours, _, _ = load_trained_model(tmp_path / "run")
    assert ours.vision.image_mode == "pad"
    evomoe_to_hf(tmp_path / "run", tmp_path / "out", **quiet)
    processor = hf.AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil" and processor.image_processor.do_pad
    arr = torch.randint(0, 256, (11, 29, 3), generator=torch.Generator().manual_seed(2)).to(torch.uint8).numpy()
    image = Image.fromarray(arr)  # 29 x 11: padding, not cropping, keeps its left and right thirds
    pixels = image_processor_for(ours)(image)[None]
    hf_pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    assert float((hf_pixels - pixels).abs().max()) < 1e-5
    back = hf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = text_ids(batch=1)
    ids[:, 1:5] = IMAGE_ID
    with torch.no_grad():
        assert float((back(input_ids=ids, pixel_values=hf_pixels).logits
                      - model(ids, pixels).logits).abs().max()) < TOL
    hf_to_evomoe(tmp_path / "out", tmp_path / "again", **quiet)
    assert load_trained_model(tmp_path / "again")[1].vision.image_mode == "pad"


def test_dtr_model_roundtrips_through_own_format(tmp_path):
    """DTR has no HF class: the project's format keeps every tensor and the training config."""
    run, model, cfg = make_run(tmp_path, EVO_STAGES)
    evomoe_to_hf(run, tmp_path / "out", **quiet)  # auto -> evomoe
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["model_type"] == "evomoe" and hf_cfg["router_type"] == "dtr"
    assert hf_cfg["layer_kinds"] == ["dense", "moe_dtr", "dense", "moe_dtr"]
    state = ckpt.load_checkpoint(ckpt.find_latest(run))
    again = reimport_state(tmp_path / "out", tmp_path / "again")
    assert_same_state(state["model"], again["model"])
    assert again["stage_idx"] == 2 and again["config"]["stages"] == state["config"]["stages"]
    a, _, _, _ = load_trained_model(run)
    b, _, _, _ = load_trained_model(tmp_path / "again")
    ids = ids_without_image()
    ids[:, 2:6] = 4  # image slots
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(ids, x).logits, b(ids, x).logits)


def test_stage2_checkpoint_exports_ffn1_dense(hf, tmp_path):
    """An evolve-stage checkpoint runs its MoE layers dense: HF (LLaMA) gets that forward exactly."""
    run, model, cfg = make_run(tmp_path, "--vision.enabled=false", EVO_STAGES, stage_idx=1)
    lines = []
    evomoe_to_hf(run, tmp_path / "out", echo=lines.append)
    assert any("evolved experts" in s for s in lines)
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == "llama"
    ids = ids_without_image()
    with torch.no_grad():
        assert float((back(input_ids=ids).logits - model(ids).logits).abs().max()) < TOL


def test_llm_only_export_of_multimodal_model(hf, tmp_path):
    run, model, cfg = make_run(tmp_path, "--moe.layers=none", "--stages=[{name: warmup, steps: 1}]")
    with pytest.raises(ConversionError, match="--llm-only"):
        evomoe_to_hf(run, tmp_path / "x", "llama", **quiet)
    evomoe_to_hf(run, tmp_path / "out", "llama", llm_only=True, **quiet)
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = ids_without_image()
    with torch.no_grad():
        assert float((back(input_ids=ids).logits - model(ids).logits).abs().max()) < TOL


def test_export_refuses_what_a_format_cannot_hold(tmp_path):
    run, _, _ = make_run(tmp_path, "--vision.enabled=false", EVO_STAGES)
    with pytest.raises(ConversionError, match="DTR"):
        evomoe_to_hf(run, tmp_path / "a", "qwen2_moe", **quiet)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        evomoe_to_hf(run, tmp_path / "full", **quiet)
    with pytest.raises(ConversionError, match="neither a checkpoint folder"):
        evomoe_to_hf(tmp_path / "nothing", tmp_path / "b", **quiet)


def test_export_checks_the_family_options(tmp_path):
    """A decoder whose options match no HF class goes to the project's format; a forced family says why."""
    run, model, cfg = make_run(tmp_path, "--vision.enabled=false", "--moe.layers=none", "--model.norm=layernorm",
                               "--model.mlp_bias=true", "--stages=[{name: s, steps: 1}]")
    with pytest.raises(ConversionError, match="model.norm='layernorm'"):
        evomoe_to_hf(run, tmp_path / "a", "llama", **quiet)
    with pytest.raises(ConversionError, match="model.mlp_bias=True"):
        evomoe_to_hf(run, tmp_path / "b", "stablelm", **quiet)
    lines = []
    evomoe_to_hf(run, tmp_path / "out", echo=lines.append)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "evomoe"
    assert any("no Hugging Face decoder class" in s for s in lines)


# ------------------------------------------------------------------ AutoProcessor + generate parity

PROMPT_WORDS = ["USER", ":", "ASSISTANT"]
CHAT_IMAGE_ID = SMALL_LLM["vocab_size"] - 1
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"


def write_chat_tokenizer(directory):
    """A word-level tokenizer.json that knows the template's words and adds BOS as LLaMA's does; with
    <image> (added by our wrapper) it fills the model's vocabulary, so every generated id decodes to a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<unk>", "<s>", "</s>"] + PROMPT_WORDS
    words += [f"w{i}" for i in range(len(words), SMALL_LLM["vocab_size"] - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "chat_template": CHAT_TEMPLATE}))


def test_exported_llava_generates_our_tokens_through_auto_processor(hf, save_hf, tmp_path):
    """AutoProcessor + LlavaForConditionalGeneration on the export = `python -m megatron_evomoe.generate`."""
    import numpy as np
    from PIL import Image
    from megatron_evomoe.generate import generate_texts, image_processor_for, load_for_inference, prompt_ids, prompt_text
    cfg = hf.LlavaConfig(vision_config=hf.CLIPVisionConfig(**SMALL_VISION), text_config=hf.LlamaConfig(**SMALL_LLM),
                         image_token_index=CHAT_IMAGE_ID)
    src = save_hf(randomize(hf.LlavaForConditionalGeneration(cfg), seed=3), "llava", tokenizer=False)
    write_chat_tokenizer(src)
    hf_to_evomoe(src, tmp_path / "run", **quiet)
    out = tmp_path / "out"
    assert convert_main(["evomoe-to-hf", "--src", str(tmp_path / "run"), "--dst", str(out)]) == 0
    proc_cfg = json.loads((out / "processor_config.json").read_text())
    assert proc_cfg["patch_size"] == 8 and proc_cfg["num_additional_image_tokens"] == 1

    question = "w20 w31 w7"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    model, ours_cfg, bundle, state = load_for_inference(tmp_path / "run")
    ids = prompt_ids(question, bundle.tokenizer, ours_cfg, has_image=True)
    pixels = image_processor_for(ours_cfg)(image)[None]
    ours = generate_texts(model, bundle.tokenizer, [ids], pixels, max_new_tokens=10)[0]

    processor = hf.AutoProcessor.from_pretrained(out)
    # the checkpoint's stage template (data's default, vicuna_v1) replaces the tokenizer's own CHAT_TEMPLATE
    assert json.loads((out / "config.json").read_text())["evomoe_conversation_template"] == "vicuna_v1"
    assert processor.chat_template == processor.tokenizer.chat_template == NAMED_TEMPLATES["vicuna_v1"].chat_template()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == prompt_text(question, bundle.tokenizer, ours_cfg, has_image=True, stage_idx=state["stage_idx"])
    tagged = [{"role": "user", "content": question + " <image>"}]  # the tag in the text: put first, as LLaVA does
    assert processor.apply_chat_template(tagged, add_generation_prompt=True) == text
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids  # (2 x 2 = 4 image tokens expanded from one <image>)
    assert float((inputs["pixel_values"] - pixels).abs().max()) < 1e-5
    back = hf.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        gen = back.generate(**inputs, max_new_tokens=10, do_sample=False, suppress_tokens=[CHAT_IMAGE_ID])
    new = gen[0, len(ids):].tolist()
    assert len(new) == 10 and bundle.tokenizer.eos_id not in new
    assert bundle.tokenizer.encode(ours) == new

"""CLIP / SigLIP towers and LLaVA models -> our VisionEncoder / MultimodalLM, checked against transformers;
their image processors -> our `vision` image settings and back."""
import json

import pytest
import torch

from megatron_evomoe.convert import hf_to_evomoe
from megatron_evomoe.training.restore import load_trained_model

from .helpers import IMAGE_ID, SMALL_LLM, SMALL_VISION, randomize, text_ids

TOL = 1e-4


def _pixels(n=2, size=16, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tower_features_match_llava_selection(hf, save_hf, tmp_path, family):
    """Our patch features = HF hidden_states[-2] without the class token (what LLaVA's projector reads)."""
    if family == "clip":
        tower = randomize(hf.CLIPVisionModel(hf.CLIPVisionConfig(**SMALL_VISION)))
    else:
        tower = randomize(hf.SiglipVisionModel(hf.SiglipVisionConfig(**SMALL_VISION)))
    llm = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM)))
    hf_to_evomoe(save_hf(llm, "llm"), tmp_path / "run", vision_src=save_hf(tower, family, tokenizer=False),
                 echo=lambda s: None)
    model, cfg, _, state = load_trained_model(tmp_path / "run")
    x = _pixels()
    with torch.no_grad():
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states
        ours = model.vision(x)
    skip = 1 if family == "clip" else 0
    ref = hidden[-2][:, skip:]
    assert ours.shape == ref.shape == (2, 4, 32)
    assert float((ours - ref).abs().max()) < TOL
    assert float((ours - hidden[-1][:, skip:]).abs().max()) > 0.1  # the layer choice matters
    assert cfg.vision.num_layers == 2 and cfg.vision.cls_token is (family == "clip")
    assert cfg.vision.activation == {"clip": "quick_gelu", "siglip": "gelu_tanh"}[family]
    # no preprocessor_config.json: the family's defaults, in the config (no separate record in the state)
    mean = {"clip": 0.48145466, "siglip": 0.5}[family]
    assert cfg.vision.image_mean[0] == pytest.approx(mean) and "image_processor" not in state
    assert cfg.vision.image_mode == {"clip": "crop", "siglip": "resize"}[family]
    # the projector is new (trained in stage 0) and maps into the LLM width
    assert model.image_features(x).shape == (2, 4, 32)


def test_llava_logit_parity(hf, save_hf, tmp_path):
    cfg = hf.LlavaConfig(vision_config=hf.CLIPVisionConfig(**SMALL_VISION), text_config=hf.LlamaConfig(**SMALL_LLM),
                         image_token_index=IMAGE_ID)
    m = randomize(hf.LlavaForConditionalGeneration(cfg))
    hf_to_evomoe(save_hf(m, "llava"), tmp_path / "run", echo=lambda s: None)
    model, ours, bundle, _ = load_trained_model(tmp_path / "run")
    assert bundle.tokenizer.image_token_id == IMAGE_ID == model.image_token_id
    ids = text_ids()
    ids[:, 1:5] = IMAGE_ID  # 4 patches per 16x16 image
    x = _pixels()
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=x).logits
        out = model(ids, x)
    assert float((out.logits - ref).abs().max()) < TOL
    assert out.modality[:, 1:5].eq(1).all() and out.modality[:, 5:].eq(0).all()
    assert ours.vision.projector == "mlp2x_gelu" and ours.vision.num_image_tokens == 4


def test_tower_options_default_to_the_projects_own_vit():
    """The options added for pretrained towers leave the default modules (and checkpoints) unchanged."""
    from megatron_evomoe.config import ConfigError, load_config
    from megatron_evomoe.model.mllm import MultimodalLM
    one = "--stages=[{name: s}]"
    cfg = load_config(None, ["--model.vocab_size=16", one])
    keys = set(MultimodalLM(cfg, 4).state_dict())
    assert "vision.norm.weight" in keys and "vision.pos_embed" in keys
    assert not any(k.startswith(("vision.cls_embed", "vision.pre_norm")) or k.endswith("attn.wq.bias") for k in keys)
    clip = load_config(None, ["--model.vocab_size=16", one, "--model.qkv_bias=true", "--vision.cls_token=true",
                              "--vision.pre_norm=true", "--vision.final_norm=false", "--vision.activation=quick_gelu"])
    model = MultimodalLM(clip, 4)
    sd = model.state_dict()
    assert sd["vision.pos_embed"].shape[0] == clip.vision.num_image_tokens + 1 and "vision.norm.weight" not in sd
    assert sd["llm.layers.0.attn.wq.bias"].abs().sum() == 0  # zero-initialised biases
    x = torch.randn(2, 3, clip.vision.image_size, clip.vision.image_size)
    assert model.vision(x).shape == (2, clip.vision.num_image_tokens, clip.vision.hidden_size)  # class token dropped
    with pytest.raises(ConfigError, match="vision.activation"):
        load_config(None, [one, "--vision.activation=relu"])


def test_llava_with_stablelm_text_model(hf, save_hf, tmp_path):
    """convert/llava.py reads the text model through the same LLM spec: a StableLM LLaVA loads exactly."""
    cfg = hf.LlavaConfig(vision_config=hf.CLIPVisionConfig(**SMALL_VISION),
                         text_config=hf.StableLmConfig(**SMALL_LLM, use_qkv_bias=True), image_token_index=IMAGE_ID)
    m = randomize(hf.LlavaForConditionalGeneration(cfg))
    hf_to_evomoe(save_hf(m, "llava"), tmp_path / "run", echo=lambda s: None)
    model, ours, _, _ = load_trained_model(tmp_path / "run")
    ids = text_ids()
    ids[:, 1:5] = IMAGE_ID
    x = _pixels()
    with torch.no_grad():
        diff = float((model(ids, x).logits - m(input_ids=ids, pixel_values=x).logits).abs().max())
    assert diff < TOL and ours.model.norm == "layernorm" and ours.model.rotary_pct == 0.25


# ----------------------------------------------------------------------------- image preprocessing

def _tower_with_processor(hf, save_hf, family, **processor):
    """A tiny CLIP/SigLIP folder whose preprocessor_config.json transformers' own PIL processor wrote."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    if family == "clip":
        tower = randomize(hf.CLIPVisionModel(hf.CLIPVisionConfig(**SMALL_VISION)))
        proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, **processor)
    else:
        tower = randomize(hf.SiglipVisionModel(hf.SiglipVisionConfig(**SMALL_VISION)))
        proc = SiglipImageProcessorPil(size={"height": 16, "width": 16}, **processor)
    folder = save_hf(tower, family, tokenizer=False)
    proc.save_pretrained(folder)
    return folder, proc


def _odd_image(w=23, h=37, seed=5):
    from PIL import Image
    arr = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(arr.numpy(), "RGB")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_image_settings_imported_recorded_and_used_by_generate(hf, save_hf, tmp_path, family, monkeypatch):
    """preprocessor_config.json -> the converted config's vision section -> generate's and model_answers'
    processor, which equals transformers' processor of that file on a non-square image."""
    from megatron_evomoe.eval import model_answers
    from megatron_evomoe.generate import image_processor_for, load_for_inference
    custom = dict(image_mean=[0.25, 0.5, 0.75], image_std=[0.2, 0.3, 0.4]) if family == "clip" else {}
    folder, proc = _tower_with_processor(hf, save_hf, family, **custom)
    llm = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM)))
    path = hf_to_evomoe(save_hf(llm, "llm"), tmp_path / "run", vision_src=folder, echo=lambda s: None)
    model, cfg, bundle, state = load_for_inference(tmp_path / "run")
    want = {"clip": ("crop", [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]), "siglip": ("resize", [0.5] * 3, [0.5] * 3)}[family]
    assert (cfg.vision.image_mode, cfg.vision.image_mean, cfg.vision.image_std) == want
    assert state["config"]["vision"]["image_mode"] == want[0]  # recorded in the checkpoint
    meta = json.loads((path / "meta.json").read_text())
    assert meta["image_processor_source"] == str(folder / "preprocessor_config.json")
    img = _odd_image()
    ref = torch.from_numpy(proc(img, return_tensors="np")["pixel_values"][0])
    assert float((image_processor_for(cfg)(img) - ref).abs().max()) <= 1e-5
    seen = []  # the pixels model_answers hands to the decoder
    monkeypatch.setattr(model_answers, "generate_texts", lambda m, t, ids, pixels, **kw: seen.append(pixels) or [""])
    img.save(tmp_path / "q.png")
    model_answers.make_answer_fn(model, cfg, bundle, max_new_tokens=1)(str(tmp_path / "q.png"), "w3 w4")
    assert float((seen[0][0] - ref).abs().max()) <= 1e-5


def test_old_style_clip_file_and_llava_pad(tmp_path):
    """CLIP's original file (int sizes, a feature extractor) -> crop; LLaVA-1.5's image_aspect_ratio pad -> pad."""
    from megatron_evomoe.convert.hf_image_processor import image_fields_from_hf
    old = {"crop_size": 16, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
           "feature_extractor_type": "CLIPFeatureExtractor", "size": 16,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert image_fields_from_hf("clip", 16, old, "p.json")["image_mode"] == "crop"
    pad = image_fields_from_hf("clip", 16, old, "p.json", aspect_ratio="pad")
    assert pad == {"image_mode": "pad", "image_mean": old["image_mean"], "image_std": old["image_std"],
                   "resample": "bicubic"}
    assert image_fields_from_hf("siglip", 16, None, "p.json")["image_mode"] == "resize"
    assert image_fields_from_hf("clip", 16, dict(old, resample=2), "p.json")["resample"] == "bilinear"


@pytest.mark.parametrize("change, field", [
    ({"crop_size": {"height": 224, "width": 224}}, "crop_size"),
    ({"size": {"shortest_edge": 18}}, "size"),
    ({"resample": 0}, "resample"),
    ({"do_normalize": False}, "do_normalize"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
])
def test_processor_settings_we_cannot_reproduce_are_refused(change, field):
    from megatron_evomoe.convert.errors import ConversionError
    from megatron_evomoe.convert.hf_image_processor import image_fields_from_hf
    base = {"do_center_crop": True, "size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}
    with pytest.raises(ConversionError, match=rf"^tower/preprocessor_config.json: {field}="):
        image_fields_from_hf("clip", 16, dict(base, **change), "tower/preprocessor_config.json")


@pytest.mark.parametrize("mode", ["crop", "pad", "resize"])
def test_exported_preprocessor_config_reproduces_our_processor(hf, mode, tmp_path):
    """The exported file, loaded the way AutoProcessor loads it (no torchvision: the PIL backend), gives our
    pixels on a non-square image (pad: LlavaImageProcessor's do_pad, not CLIP's crop), and imports back."""
    from megatron_evomoe.config.schema import VisionConfig
    from megatron_evomoe.convert.hf_image_processor import image_fields_from_hf, preprocessor_config
    from megatron_evomoe.data.image_processing import ImageProcessor
    v = VisionConfig(image_size=24, patch_size=8, image_mode=mode, image_mean=[0.3, 0.4, 0.5],
                     image_std=[0.2, 0.25, 0.3], resample="bilinear")
    d = preprocessor_config(v)
    kind = {"crop": "CLIPImageProcessor", "pad": "LlavaImageProcessor", "resize": "SiglipImageProcessor"}[mode]
    assert d["image_processor_type"] == kind and d.get("do_pad", False) == (mode == "pad")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    hf_proc = hf.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(hf_proc).__name__ == kind + "Pil"  # torchvision is not installed here
    for w, h in [(37, 23), (23, 37)]:
        img = _odd_image(w, h)
        ref = torch.from_numpy(hf_proc(img, return_tensors="np")["pixel_values"][0])
        assert float((ImageProcessor.from_config(v)(img) - ref).abs().max()) <= 1e-5
    fields = image_fields_from_hf("siglip" if mode == "resize" else "clip", 24, d, "x.json")
    assert fields == {"image_mode": mode, "image_mean": v.image_mean, "image_std": v.image_std,
                      "resample": "bilinear"}  # and back, pad from do_pad alone


def test_do_pad_needs_a_centre_cropping_processor():
    from megatron_evomoe.convert.errors import ConversionError
    from megatron_evomoe.convert.hf_image_processor import image_fields_from_hf
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 16, "width": 16}, "do_pad": True}
    with pytest.raises(ConversionError, match=r"^p.json: do_pad=true needs a centre-cropping"):
        image_fields_from_hf("siglip", 16, siglip, "p.json")
    off = {"image_processor_type": "LlavaImageProcessor", "size": {"shortest_edge": 16}, "do_pad": False}
    assert image_fields_from_hf("clip", 16, off, "p.json")["image_mode"] == "crop"


def test_llava_export_refusal_names_a_siglip_tower():
    from megatron_evomoe.config.schema import VisionConfig
    from megatron_evomoe.convert.hf_vision import clip_compatible
    siglip = VisionConfig(image_size=16, patch_size=8, cls_token=False, pre_norm=False, final_norm=False,
                          activation="gelu_tanh")
    assert clip_compatible(siglip) == "a SigLIP tower (no class token, no pre-LayerNorm) is not exported as LLaVA yet"
    own = VisionConfig(image_size=16, patch_size=8, cls_token=False, pre_norm=False, final_norm=True)
    assert "the project's own ViT" in clip_compatible(own)
    clip = VisionConfig(image_size=16, patch_size=8, cls_token=True, pre_norm=True, final_norm=False)
    assert clip_compatible(clip) is None


def test_old_checkpoint_mean_std_and_init_from_contradictions(hf, save_hf, tmp_path):
    """A checkpoint from before vision.image_mean keeps its recorded mean/std; a run whose image settings
    contradict the imported processor is a ConfigError naming the field and the processor file."""
    from megatron_evomoe import checkpointing as ckpt
    from megatron_evomoe.config import ConfigError, load_config
    from megatron_evomoe.training.restore import check_init_image_processing, config_from_state
    folder, _ = _tower_with_processor(hf, save_hf, "siglip")
    llm = randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**SMALL_LLM)))
    path = hf_to_evomoe(save_hf(llm, "llm"), tmp_path / "run", vision_src=folder, echo=lambda s: None)
    state = ckpt.load_checkpoint(path)
    old = dict(state, config=json.loads(json.dumps(state["config"])), image_processor={"mean": [0.5] * 3,
                                                                                         "std": [0.5] * 3})
    for key in ("image_mean", "image_std"):
        del old["config"]["vision"][key]
    assert config_from_state(old).vision.image_std == [0.5, 0.5, 0.5]
    assert config_from_state(dict(old, image_processor=None)).vision.image_std[0] == pytest.approx(0.26862954)
    tree = state["config"]
    vision = [f"--vision.{k}={json.dumps(tree['vision'][k])}" for k in ("image_size", "patch_size", "hidden_size",
                                                                        "num_heads")]
    run = ["--stages=[{name: s}]", *vision, "--vision.image_mean=[0.5, 0.5, 0.5]", "--vision.image_std=[0.5, 0.5, 0.5]"]
    check_init_image_processing(load_config(None, run + ["--vision.image_mode=resize"]), state, path)
    source = str(folder / "preprocessor_config.json").replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^vision.image_mode: 'crop' contradicts the 'resize' processor .*{source}"):
        check_init_image_processing(load_config(None, run), state, path)
    with pytest.raises(ConfigError, match=r"^vision.image_std: \[0.26862954"):
        check_init_image_processing(load_config(None, run[:-1] + ["--vision.image_mode=resize"]), state, path)
    clip_folder, _ = _tower_with_processor(hf, save_hf, "clip")
    clip = hf_to_evomoe(save_hf(llm, "llm2"), tmp_path / "run2", vision_src=clip_folder, echo=lambda s: None)
    pad = load_config(None, ["--stages=[{name: s}]", *vision, "--vision.image_mode=pad"])
    check_init_image_processing(pad, ckpt.load_checkpoint(clip), clip)  # LLaVA-1.5's pad on a CLIP processor


def test_llava_logits_on_a_non_square_image_through_each_sides_processor(hf, save_hf, tmp_path):
    """An imported LLaVA fed the same picture through our processor and through transformers' gives the same
    logits (a straight resize instead of CLIP's crop moved them by more than 1 in the issue's measurement)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from megatron_evomoe.generate import image_processor_for
    cfg = hf.LlavaConfig(vision_config=hf.CLIPVisionConfig(**SMALL_VISION), text_config=hf.LlamaConfig(**SMALL_LLM),
                         image_token_index=IMAGE_ID)
    m = randomize(hf.LlavaForConditionalGeneration(cfg))
    folder = save_hf(m, "llava")
    proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc.save_pretrained(folder)
    hf_to_evomoe(folder, tmp_path / "run", echo=lambda s: None)
    model, ours, _, _ = load_trained_model(tmp_path / "run")
    img = _odd_image(29, 17)
    ids = text_ids(batch=1)
    ids[:, 1:5] = IMAGE_ID
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=proc(img, return_tensors="pt")["pixel_values"]).logits
        out = model(ids, image_processor_for(ours)(img)[None]).logits
    assert float((out - ref).abs().max()) < TOL

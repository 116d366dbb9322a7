"""CLIP / SigLIP towers and LLaVA models -> our VisionEncoder / MultimodalLM, checked against transformers."""
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
    mean = {"clip": 0.48145466, "siglip": 0.5}[family]
    assert state["image_processor"]["mean"][0] == pytest.approx(mean)
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

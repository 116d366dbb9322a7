"""Hugging Face CLIP / SigLIP vision towers <-> our VisionEncoder.

Both are pre-LN ViTs with separate q/k/v projections (fused into our ``qkv``) and a GELU
MLP; the differences map onto `vision.*` options:

| | CLIP | SigLIP |
|---|---|---|
| class token (`cls_token`) | yes, dropped from the features | no |
| LayerNorm on the embeddings (`pre_norm`) | ``pre_layrnorm`` | no |
| activation (`activation`) | quick_gelu | gelu_tanh (``gelu_pytorch_tanh``) |
| patch-embedding bias | none (ours is set to zero) | yes |
| LayerNorm eps (`norm_eps`) | 1e-5 | 1e-6 |

The features are what a LLaVA projector reads: ``hidden_states[feature_layer]`` of the
HF tower without the class token (LLaVA's ``vision_feature_select_strategy='default'``),
so the tower is cut after the layer that ``feature_layer`` (default -2, as LLaVA-1.5 and
MoE-LLaVA) selects and has no final LayerNorm (``final_norm=false``); SigLIP's attention
pooling head is not used. The tower's image preprocessing (mode, mean/std, resize filter:
`hf_image_processor.py`) becomes the `vision` image fields of the converted config, which
training, evaluation and generation read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .config_fields import config_float, config_int
from .errors import ConversionError, unsupported
from .hf_checkpoint import HFCheckpoint
from .hf_image_processor import image_fields_from_hf
from .weight_map import Src

_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}
VISION_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}


@dataclass
class VisionSpec:
    family: str  # clip | siglip
    vision: dict  # VisionConfig fields, the image preprocessing included
    notes: List[str] = field(default_factory=list)


def vision_config_of(cfg: dict) -> dict:
    """The vision part of a CLIP/SigLIP config (a full CLIP model nests it in vision_config)."""
    if cfg.get("model_type") in ("clip", "siglip"):
        return dict(cfg.get("vision_config") or {}, model_type=cfg["model_type"] + "_vision_model")
    return cfg


def vision_spec_from_hf(cfg: dict, where: str = "config.json", feature_layer: int = -2,
                        select_strategy: str = "default", preprocessor: Optional[dict] = None,
                        preprocessor_file: str = "preprocessor_config.json",
                        aspect_ratio: Optional[str] = None) -> VisionSpec:
    """`preprocessor`: the parsed `preprocessor_file` (None: the family's defaults); `aspect_ratio`: a
    LLaVA config's image_aspect_ratio ("pad": LLaVA-1.5's pad-to-square)."""
    cfg = vision_config_of(cfg)
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []

    def fail(feature: str) -> ConversionError:
        return unsupported(mt, archs, feature, where)

    if mt not in VISION_TYPES:
        raise fail(f"not a supported vision tower (supported model_type: {', '.join(VISION_TYPES)})")
    family = VISION_TYPES[mt]
    act = cfg.get("hidden_act", "quick_gelu" if family == "clip" else "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise fail(f"hidden_act={act!r} (supported: {', '.join(_ACTIVATIONS)})")
    if int(cfg.get("num_channels", 3)) != 3:
        raise fail(f"num_channels={cfg.get('num_channels')} (images are RGB)")
    if select_strategy != "default":
        raise fail(f"vision_feature_select_strategy={select_strategy!r}: only 'default' (patch features, "
                   "no class token) is supported")
    if not isinstance(feature_layer, int):
        raise fail(f"vision_feature_layer={feature_layer!r}: features from several layers are not supported")
    n = config_int(cfg, "num_hidden_layers", where, 12)
    used = n + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= used <= n:
        raise ConversionError(f"{where}: vision_feature_layer={feature_layer} selects no transformer layer "
                              f"of a {n}-layer tower")
    image, patch = config_int(cfg, "image_size", where, 224), config_int(cfg, "patch_size", where, 32)
    if image % patch:
        raise fail(f"image_size={image} is not a multiple of patch_size={patch}")
    vision = dict(enabled=True, image_size=image, patch_size=patch,
                  hidden_size=config_int(cfg, "hidden_size", where, 768), num_layers=used,
                  num_heads=config_int(cfg, "num_attention_heads", where, 12),
                  ffn_hidden_size=config_int(cfg, "intermediate_size", where, 3072),
                  cls_token=family == "clip", pre_norm=family == "clip", final_norm=False,
                  activation=_ACTIVATIONS[act],
                  norm_eps=config_float(cfg, "layer_norm_eps", where, 1e-5 if family == "clip" else 1e-6),
                  **image_fields_from_hf(family, image, preprocessor, preprocessor_file, aspect_ratio))
    notes = []
    if used < n:
        notes.append(f"vision tower cut after layer {used} of {n} (features = hidden_states[{feature_layer}])")
    return VisionSpec(family, vision, notes)


def vision_prefix(ck: HFCheckpoint, candidates: List[str]) -> str:
    """The first prefix under which the tower's patch embedding is stored."""
    for p in candidates:
        if ck.has(f"{p}embeddings.patch_embedding.weight"):
            return p
    raise ConversionError(f"{ck.dir}: tensor 'embeddings.patch_embedding.weight' not found under any of the "
                          f"prefixes {candidates} in {', '.join(ck.files)}")


def vision_weight_map(spec: VisionSpec, prefix: str = "", ours: str = "vision.") -> Dict[str, Src]:
    """Our VisionEncoder name -> Src (HF names under `prefix`)."""
    v = spec.vision
    emb = f"{prefix}embeddings."
    out: Dict[str, Src] = {
        f"{ours}patch_embed.weight": Src((emb + "patch_embedding.weight",)),
        # CLIP's patch embedding has no bias: ours must stay zero
        f"{ours}patch_embed.bias": (Src((emb + "patch_embedding.bias",)) if spec.family == "siglip"
                                    else Src((), "zeros")),
        f"{ours}pos_embed": Src((emb + "position_embedding.weight",)),
    }
    if v["cls_token"]:
        out[f"{ours}cls_embed"] = Src((emb + "class_embedding",))
    if v["pre_norm"]:
        for k in ("weight", "bias"):
            out[f"{ours}pre_norm.{k}"] = Src((f"{prefix}pre_layrnorm.{k}",))
    for j in range(v["num_layers"]):
        hf, us = f"{prefix}encoder.layers.{j}.", f"{ours}blocks.{j}."
        for k in ("weight", "bias"):
            out[f"{us}norm1.{k}"] = Src((f"{hf}layer_norm1.{k}",))
            out[f"{us}norm2.{k}"] = Src((f"{hf}layer_norm2.{k}",))
            out[f"{us}qkv.{k}"] = Src(tuple(f"{hf}self_attn.{p}_proj.{k}" for p in "qkv"), "cat0")
            out[f"{us}proj.{k}"] = Src((f"{hf}self_attn.out_proj.{k}",))
            out[f"{us}fc1.{k}"] = Src((f"{hf}mlp.fc1.{k}",))
            out[f"{us}fc2.{k}"] = Src((f"{hf}mlp.fc2.{k}",))
    if v["final_norm"]:
        for k in ("weight", "bias"):
            out[f"{ours}norm.{k}"] = Src((f"{prefix}post_layernorm.{k}",))
    return out


def hf_clip_vision_config(vision_cfg) -> dict:
    """A CLIP vision config.json dict for a CLIP-shaped VisionEncoder (see `clip_compatible`)."""
    v = vision_cfg
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[v.activation]
    return {"model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": act, "layer_norm_eps": v.norm_eps, "num_channels": 3,
            "attention_dropout": 0.0, "projection_dim": v.hidden_size}


def clip_compatible(vision_cfg) -> Optional[str]:
    """None if the tower is CLIP-shaped (exportable inside LLaVA), else why not."""
    v = vision_cfg
    if not v.cls_token and not v.pre_norm and not v.final_norm:  # how a SigLIP tower imports
        return "a SigLIP tower (no class token, no pre-LayerNorm) is not exported as LLaVA yet"
    if not v.cls_token or not v.pre_norm:
        return "the vision tower has no class token / pre-LayerNorm (the project's own ViT, not CLIP)"
    if v.final_norm:
        return "the vision tower ends in a LayerNorm (LLaVA reads un-normalised hidden states)"
    return None

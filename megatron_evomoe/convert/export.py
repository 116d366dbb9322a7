"""Export: a checkpoint of this project -> a folder `transformers` loads (`evomoe_to_hf`).

Formats (``fmt``; ``auto`` picks the first that represents the model exactly):
- ``llama``: dense decoder without q/k/v biases (LlamaForCausalLM);
- ``qwen2``: dense decoder with q/k/v biases (Qwen2ForCausalLM);
- ``mixtral``: every layer MoE with a linear router, k > 1, renormalised gates
  (MixtralForCausalLM renormalises the top-k, also for k = 1, so top-1 cannot go there);
- ``qwen2_moe``: MoE on any subset of layers with a linear router, gates renormalised
  or not (``norm_topk_prob``), with or without a shared expert (Qwen2MoeForCausalLM);
- ``phi`` / ``stablelm``: dense decoders with those families' options (LayerNorm, partial
  rotary, ...; `hf_llm.FAMILY_OPTIONS`): PhiForCausalLM / StableLmForCausalLM;
- ``llava``: the above inside LlavaForConditionalGeneration when the vision tower is
  CLIP-shaped (class token, pre-LN, no final LN, i.e. imported from CLIP) and the projector
  is ``mlp2x_gelu``; with the processor files (hf_processor.py), so ``AutoProcessor`` loads the
  folder and expands ``<image>`` into the tower's number of image tokens;
- every Hugging Face format carries the checkpoint's stage's conversation template as its chat
  template (``chat_template.jinja``, ``tokenizer_config.json``) and its name in ``config.json``
  (``evomoe_conversation_template``);
- ``evomoe``: the project's own format for what Hugging Face has no class for (the DTR,
  per-modality routers, the project's own ViT, evolved experts of a stage-II checkpoint):
  ``config.json`` (``model_type: evomoe`` + the full training config) and
  ``model.safetensors`` under our own tensor names; `hf_to_evomoe` reads it back.
``llm_only`` exports just the decoder of a multimodal model.
A stage-II (evolve) checkpoint runs its MoE layers dense (FFN1): the HF formats export that
forward exactly and drop the evolved copies (kept by ``evomoe``).
Weights are written as safetensors, sharded with an index above ``max_shard_size`` bytes.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..data.conversation_templates import stage_chat_template
from .errors import ConversionError
from .hf_llm import FAMILY_OPTIONS, LLMSpec, export_extras, family_mismatch, hf_llm_config, llm_weight_map
from .hf_processor import chat_template_files, llava_processor_files
from .hf_vision import clip_compatible, hf_clip_vision_config, vision_weight_map, VisionSpec
from .weight_map import write_mapped

FORMATS = ("auto", "llama", "qwen2", "mixtral", "qwen2_moe", "phi", "stablelm", "llava", "evomoe")
DENSE_FAMILIES = ("llama", "qwen2", "phi", "stablelm")
NATIVE_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# =============================================================================== inspecting

def layer_kinds(state: Dict[str, torch.Tensor], num_layers: int) -> List[str]:
    """Per decoder layer: dense | evolving | moe_linear | moe_per_modality | moe_dtr."""
    kinds = []
    for i in range(num_layers):
        p = f"llm.layers.{i}.mlp."
        if p + "experts.w_up" in state:  # (w_up: every expert activation has one)
            if p + "router.w1" in state:
                kinds.append("moe_dtr")
            elif state[p + "router.weight"].dim() == 3:
                kinds.append("moe_per_modality")
            else:
                kinds.append("moe_linear")
        elif p + "evolved_w_up" in state:
            kinds.append("evolving")
        else:
            kinds.append("dense")
    return kinds


def _llm_family(cfg, kinds: List[str]) -> Tuple[Optional[str], str]:
    """(family, reason) for the decoder: the simplest exact HF class, or None and why not."""
    moe = [k for k in kinds if k.startswith("moe")]
    if _custom_routers(kinds):
        return None, "the routers are DTR / per-modality routers, which Hugging Face has no class for"
    model = dataclasses.asdict(cfg.model)
    if not moe:
        for family in ("llama", "qwen2", "stablelm", "phi"):
            if family_mismatch(model, family) is None:
                return family, ""
        return None, (f"no Hugging Face decoder class has this combination of model options (as llama: "
                      f"{family_mismatch(model, 'llama')})")
    why = family_mismatch(model, "qwen2_moe")
    if why:
        return None, f"MoE layers in a decoder that the Hugging Face MoE classes cannot hold: {why}"
    renorm = cfg.moe.renormalize and cfg.moe.top_k > 1
    if len(moe) == len(kinds) and renorm and not cfg.model.qkv_bias and not cfg.moe.shared_expert_size:
        return "mixtral", ""
    return "qwen2_moe", ""


def _custom_routers(kinds: List[str]) -> bool:
    return any(k in ("moe_dtr", "moe_per_modality") for k in kinds)


def _check_family(cfg, kinds: List[str], family: str) -> None:
    moe = [k for k in kinds if k.startswith("moe")]
    auto, why = _llm_family(cfg, kinds)
    if auto is None:
        if family in FAMILY_OPTIONS and not _custom_routers(kinds):  # say what the asked-for family lacks
            why = family_mismatch(dataclasses.asdict(cfg.model), family) or why
        raise ConversionError(f"--format {family}: {why}; use --format evomoe")
    if family in DENSE_FAMILIES and moe:
        layers = [i for i, k in enumerate(kinds) if k in moe]
        raise ConversionError(f"--format {family}: the model has MoE layers {layers}; use mixtral, qwen2_moe or evomoe")
    if family == "llama" and cfg.model.qkv_bias:
        raise ConversionError("--format llama: the model has q/k/v biases (model.qkv_bias); use qwen2")
    if family == "mixtral":
        if len(moe) != len(kinds):
            raise ConversionError("--format mixtral: Mixtral has MoE on every layer, this model on layers "
                                  f"{[i for i, k in enumerate(kinds) if k in moe]} only; use qwen2_moe")
        if not (cfg.moe.renormalize and cfg.moe.top_k > 1):
            raise ConversionError(f"--format mixtral: Mixtral renormalises the top-k gates (1.0 for top-1); this "
                                  f"model has top_k={cfg.moe.top_k}, renormalize={cfg.moe.renormalize}; use qwen2_moe")
        if cfg.model.qkv_bias:
            raise ConversionError("--format mixtral: Mixtral has no q/k/v biases; use qwen2_moe")
        if cfg.moe.shared_expert_size:
            raise ConversionError("--format mixtral: Mixtral has no shared expert (moe.shared_expert_size); "
                                  "use qwen2_moe")
    if family == "qwen2_moe" and not moe:
        raise ConversionError("--format qwen2_moe: the model has no MoE layers; use llama or qwen2")
    mismatch = family_mismatch(dataclasses.asdict(cfg.model), family)
    if mismatch:
        raise ConversionError(f"--format {family}: {mismatch}; use --format {auto} or evomoe")


def _llm_spec(cfg, kinds: List[str], family: str) -> LLMSpec:
    model = dataclasses.asdict(cfg.model)
    moe_layers = [i for i, k in enumerate(kinds) if k.startswith("moe")]
    return LLMSpec(family, model, moe_layers, cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.renormalize,
                   shared_expert_size=cfg.moe.shared_expert_size if moe_layers else 0)


# =============================================================================== writing

def save_safetensors(tensors: Dict[str, torch.Tensor], dst: Path, max_shard_size: int) -> List[str]:
    """model.safetensors, or shards + model.safetensors.index.json; returns the file names."""
    from safetensors.torch import save_file
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _tokenizer_dir(cfg) -> Optional[Path]:
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.root) / "tokenizer"
    return tok if tok.is_dir() else None


def _tokenizer_ids(tok_dir: Optional[Path]) -> dict:
    if tok_dir is None:
        return {}
    try:
        from ..data.tokenizer import load_tokenizer
        tok = load_tokenizer(str(tok_dir))
    except Exception:  # a tokenizer that cannot be read only costs the special-token ids
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "image_token_index": tok.image_token_id}


def _copy_hf_tokenizer(tok_dir: Optional[Path], dst: Path, notes: List[str]) -> None:
    if tok_dir is None:
        notes.append("no tokenizer found next to the checkpoint: none exported")
        return
    if (tok_dir / "tokenizer.json").is_file():
        try:  # saved through our wrapper, so the <image> token the model was trained with is in it
            from ..data.tokenizer import load_tokenizer
            load_tokenizer(str(tok_dir)).save(str(dst))
        except ImportError:
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tok_dir / f).is_file():
                    shutil.copyfile(tok_dir / f, dst / f)
    else:
        shutil.copytree(tok_dir, dst / "evomoe_tokenizer", dirs_exist_ok=True)
        notes.append("the run's word-level tokenizer has no Hugging Face form: copied to evomoe_tokenizer/")


def _write_processor(dst: Path, cfg, stage_idx: int, hf_cfg: dict, notes: List[str], llava: bool) -> None:
    """The chat template of the checkpoint's stage (its name in config.json) and, for a LLaVA,
    processor_config.json, preprocessor_config.json: AutoProcessor loads the folder."""
    name, template = stage_chat_template(cfg, stage_idx)
    hf_cfg["evomoe_conversation_template"] = name
    notes.append(f"chat template: the tokenizer's own (stage template '{name}')" if template is None else
                 f"chat template: the stage's conversation template '{name}', replacing the tokenizer's own")
    tok_cfg_path = dst / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else None
    files = (llava_processor_files(cfg.vision, tok_cfg, template) if llava
             else chat_template_files(tok_cfg, template))
    for file_name, content in files.items():
        if isinstance(content, str):
            (dst / file_name).write_text(content)
        else:
            _write_json(dst / file_name, content)


def _cast(tensors: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    if dtype == "auto":
        return tensors
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}


def _dtype_name(tensors: Dict[str, torch.Tensor]) -> str:
    t = next(iter(tensors.values()))
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(t.dtype, "float32")


# =============================================================================== formats

def _export_llm(state, cfg, kinds, family, extra_cfg: dict) -> Tuple[dict, dict]:
    spec = _llm_spec(cfg, kinds, family)
    tensors = write_mapped(state, llm_weight_map(spec))
    tensors.update(export_extras(spec, "model.", state["llm.embed.weight"].dtype))
    hf_cfg = hf_llm_config(cfg.model, family, spec.moe_layers, spec.num_experts, spec.top_k, spec.renormalize,
                           _dtype_name(tensors), spec.shared_expert_size)
    hf_cfg.update({k: v for k, v in extra_cfg.items() if k != "image_token_index"})
    return tensors, hf_cfg


def _export_llava(state, cfg, kinds, family, extra_cfg: dict):
    why = clip_compatible(cfg.vision)
    if why:
        raise ConversionError(f"--format llava: {why}; use --format evomoe (or --llm-only)")
    if cfg.vision.projector != "mlp2x_gelu":
        raise ConversionError(f"--format llava: projector {cfg.vision.projector!r} is not LLaVA's mlp2x_gelu; "
                              "use --format evomoe")
    spec = _llm_spec(cfg, kinds, family)
    tensors = write_mapped(state, llm_weight_map(spec, "language_model.model.", "language_model.lm_head."))
    tensors.update(export_extras(spec, "language_model.model.", state["llm.embed.weight"].dtype))
    vspec = VisionSpec("clip", {f: getattr(cfg.vision, f) for f in ("num_layers", "cls_token", "pre_norm",
                                                                    "final_norm")})
    tensors.update(write_mapped(state, vision_weight_map(vspec, "vision_tower.vision_model.")))
    D = cfg.vision.hidden_size
    ref = state["vision.pos_embed"]
    # LLaVA reads hidden_states[-1] (no LayerNorm), so post_layernorm is never applied: identity.
    tensors["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(D, dtype=ref.dtype)
    tensors["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(D, dtype=ref.dtype)
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for k in ("weight", "bias"):
            tensors[f"multi_modal_projector.{theirs}.{k}"] = state[f"projector.{ours}.{k}"].detach().contiguous()
    text_cfg = hf_llm_config(cfg.model, family, spec.moe_layers, spec.num_experts, spec.top_k, spec.renormalize,
                             _dtype_name(tensors), spec.shared_expert_size)
    for k in ("architectures", "torch_dtype", "dtype"):
        text_cfg.pop(k, None)
    hf_cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": text_cfg, "vision_config": hf_clip_vision_config(cfg.vision),
              "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
              "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
              "image_seq_length": cfg.vision.num_image_tokens, "tie_word_embeddings": cfg.model.tie_embeddings,
              "torch_dtype": _dtype_name(tensors), "dtype": _dtype_name(tensors)}
    if "image_token_index" in extra_cfg:
        hf_cfg["image_token_index"] = extra_cfg["image_token_index"]
    text_cfg.update({k: v for k, v in extra_cfg.items() if k != "image_token_index"})
    return tensors, hf_cfg


def _export_native(state, cfg, stage_idx, image_processor, kinds, notes) -> Tuple[dict, dict]:
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    if cfg.model.tie_embeddings:
        tensors.pop("llm.lm_head.weight", None)  # safetensors stores no aliases; it is llm.embed.weight
    hf_cfg = {"architectures": ["EvoMoEForCausalLM"], "model_type": "evomoe", "format_version": NATIVE_VERSION,
              "stage_idx": stage_idx, "stage": cfg.stages[stage_idx].name, "layer_kinds": kinds,
              "router_type": cfg.router.type, "image_processor": image_processor, "notes": notes,
              "evomoe_config": cfg.to_dict()}
    return tensors, hf_cfg


# =============================================================================== entry point

def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder's latest complete checkpoint (ConversionError if neither)."""
    from .. import checkpointing as ckpt
    try:
        return ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None


def evomoe_to_hf(ckpt_path, dst, fmt: str = "auto", *, llm_only: bool = False, dtype: str = "auto",
                 max_shard_size: int = 5 * 1024 ** 3, force: bool = False,
                 echo: Callable[[str], None] = print) -> Path:
    """Export the checkpoint at `ckpt_path` (or a run's latest) into the folder `dst`; returns `dst`."""
    from .. import checkpointing as ckpt
    from ..training.restore import config_from_state
    if fmt not in FORMATS:
        raise ConversionError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not force:
        raise ConversionError(f"{dst}: destination exists and is not empty (use --force to write into it)")
    path = resolve_checkpoint(ckpt_path)
    state = ckpt.load_checkpoint(path)
    cfg = config_from_state(state)
    model_state = state["model"]
    kinds = layer_kinds(model_state, cfg.model.num_layers)
    has_vision = cfg.vision.enabled and not llm_only
    notes: List[str] = []
    if "evolving" in kinds and fmt != "evomoe":
        notes.append("stage-II checkpoint: MoE-designated layers exported as their dense FFN1 (the forward of "
                     "this stage); the evolved experts are only kept by --format evomoe")
    if fmt == "auto":
        family, why = _llm_family(cfg, kinds)
        if family is None:
            fmt = "evomoe"
            notes.append(f"exported in the project's own format: {why}")
        elif has_vision:
            reason = clip_compatible(cfg.vision) or (None if cfg.vision.projector == "mlp2x_gelu"
                                                     else "the projector is not mlp2x_gelu")
            fmt = "evomoe" if reason else "llava"
            if reason:
                notes.append(f"exported in the project's own format: {reason} (--llm-only exports the decoder "
                             f"as {family})")
        else:
            fmt = family
    if fmt in ("llava",) and not cfg.vision.enabled:
        raise ConversionError("--format llava: the model has no vision tower")
    if fmt not in ("evomoe", "llava") and cfg.vision.enabled and not llm_only:
        raise ConversionError(f"--format {fmt}: the model has a vision tower and projector; add --llm-only to "
                              "export the decoder alone, or use --format llava / evomoe")

    tok_dir = _tokenizer_dir(cfg)
    extra = {k: v for k, v in _tokenizer_ids(tok_dir).items() if v is not None}
    dst.mkdir(parents=True, exist_ok=True)
    if fmt == "evomoe":
        tensors, hf_cfg = _export_native(model_state, cfg, state["stage_idx"], state.get("image_processor"), kinds,
                                         notes)
        if tok_dir is not None:
            shutil.copytree(tok_dir, dst / "tokenizer", dirs_exist_ok=True)
    else:
        family = _llm_family(cfg, kinds)[0] if fmt == "llava" else fmt
        _check_family(cfg, kinds, family)
        if fmt == "llava":
            tensors, hf_cfg = _export_llava(model_state, cfg, kinds, family, extra)
        else:
            tensors, hf_cfg = _export_llm(model_state, cfg, kinds, family, extra)
        _copy_hf_tokenizer(tok_dir, dst, notes)
        _write_processor(dst, cfg, state["stage_idx"], hf_cfg, notes, llava=fmt == "llava")
    tensors = _cast(tensors, dtype)
    if dtype != "auto":
        for key in ("torch_dtype", "dtype"):
            if key in hf_cfg:
                hf_cfg[key] = dtype
    files = save_safetensors(tensors, dst, max_shard_size)
    _write_json(dst / "config.json", hf_cfg)
    for n in notes:
        echo(f"note: {n}")
    echo(f"wrote {dst} as {fmt} ({', '.join(files)}) from {path}")
    return dst

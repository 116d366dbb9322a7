"""Import: a Hugging Face folder -> a checkpoint of this project (`hf_to_evomoe`).

Sources, by ``model_type`` of ``config.json``:
- a decoder LLM (hf_llm.py: llama, mistral, qwen2, mixtral, qwen2_moe, phi, stablelm), optionally with a
  CLIP/SigLIP tower from a second folder (``vision_src``) and a freshly initialised
  projector: the starting point of an EvoMoE run;
- ``llava`` (LlavaForConditionalGeneration): LLM + vision tower + projector, all loaded;
- ``evomoe``: the project's own export format (export.py), e.g. a DTR model.

The destination is a run folder in the trainer's layout (checkpointing.py):
``DST/checkpoints/00-imported/{state.pt, meta.json}``, ``DST/checkpoints/latest`` and the
tokenizer in ``DST/tokenizer``; so `training.restore.load_trained_model(DST)`, the
generation CLI and the eval CLI load it. The stored config has one stage, 'imported'
(steps 0; ``moe_mode: sparse`` for an MoE source, so the layers are built as MoE layers with
a linear TopKRouter), and ``data.root = DST`` (absolute; the CLIs fall back to the folder
itself when it was moved). See docs/checkpoint_format.md.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..config import Config, ConfigError, _from_dict, validate
from ..stages.structure import build_model
from ..training.restore import IMPORTED_FORMAT as FORMAT  # what the trainer refuses to resume from
from ..training.restore import legacy_image_fields
from .errors import ConversionError, unsupported
from .hf_checkpoint import HFCheckpoint, read_config
from .hf_llm import LLMSpec, llm_spec_from_hf, llm_weight_map, moe_layers_string
from .hf_vision import VISION_TYPES, VisionSpec, vision_prefix, vision_spec_from_hf, vision_weight_map
from .qwen_tokenizer import QWEN_TOKENIZER_NOTE, QWEN_VOCAB_FILE, qwen_tokenizer_dir
from .weight_map import Src, read_mapped

log = logging.getLogger("megatron_evomoe")

CHECKPOINT_NAME = "00-imported"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tensors an import may leave unread without changing the model's function.
IGNORABLE = ("*rotary_emb.inv_freq", "*position_ids", "*post_layernorm.*", "*vision_model.head.*", "head.*",
             "*text_model.*", "*visual_projection*", "*text_projection*", "*logit_scale*", "*logit_bias*")


# =============================================================================== helpers

def expected_state(cfg: Config, stage_idx: int = 0) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the state dict `load_trained_model` builds for `cfg` (meta device)."""
    with torch.device("meta"):
        model = build_model(cfg, 0, up_to_stage=stage_idx)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def build_config(tree: dict, where: str) -> Config:
    try:
        cfg = _from_dict(Config, tree, "")
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"{where}: the converted configuration is invalid: {e}") from None
    return cfg


def _base_tree(dst: Path) -> dict:
    tree = Config().to_dict()
    tree["data"].update(root=str(dst.resolve()), build_if_missing=False, tokenizer="")
    tree["train"].update(save_dir=str(dst.resolve()), tensorboard=False)
    return tree


def _import_tree(dst: Path, spec: LLMSpec, vision: Optional[VisionSpec], projector: str) -> dict:
    tree = _base_tree(dst)
    tree["model"].update(spec.model)
    if vision is None:
        tree["vision"]["enabled"] = False
    else:
        tree["vision"].update(vision.vision, projector=projector)
    L = spec.model["num_layers"]
    if spec.is_moe:
        tree["moe"].update(num_experts=spec.num_experts, top_k=spec.top_k, renormalize=spec.renormalize,
                           layers=moe_layers_string(spec.moe_layers, L), init="copy", aux_loss_coeff=0.01,
                           shared_expert_size=spec.shared_expert_size)
        tree["router"]["type"] = "linear"
    else:
        tree["moe"].update(layers="none", init="copy")
    seq = min(2048, spec.model["max_seq_len"])
    tree["data"]["seq_len"] = seq
    tree["stages"] = [{"name": "imported", "trainable": ["*"], "steps": 0, "lr": 0.0,
                       "moe_mode": "sparse" if spec.is_moe else "dense", "eval": False}]
    return tree


def _first_prefix(ck: HFCheckpoint, probe: str, candidates: List[str]) -> str:
    for p in candidates:
        if ck.has(p + probe):
            return p
    raise ConversionError(f"{ck.dir}: tensor {probe!r} not found under any of the prefixes {candidates} "
                          f"in {', '.join(ck.files)}")


def _check_all_read(ck: HFCheckpoint, extra_ignorable: Tuple[str, ...] = ()) -> List[str]:
    """Tensors left unread: ignorable ones are returned, any other is an error."""
    left = ck.unused()
    bad = [k for k in left if not any(fnmatch.fnmatchcase(k, p) for p in IGNORABLE + extra_ignorable)]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ConversionError(f"{ck.dir}: tensors that the conversion does not map: {', '.join(bad[:8])}{more}; "
                              "the checkpoint has parts our model cannot represent")
    return left


def _fresh_projector(kind: str, vdim: int, cdim: int, seed: int) -> Dict[str, torch.Tensor]:
    from ..model.vision import build_projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = build_projector(kind, vdim, cdim)
    return {f"projector.{k}": v.detach() for k, v in proj.state_dict().items()}


def _projector_map(prefix: str, bias: bool) -> Dict[str, Src]:
    out = {}
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        out[f"projector.{ours}.weight"] = Src((f"{prefix}{theirs}.weight",))
        out[f"projector.{ours}.bias"] = Src((f"{prefix}{theirs}.bias",)) if bias else Src((), "zeros")
    return out


def _preprocessor(directory: Path) -> Optional[dict]:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(found, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(found).__name__}")
    return found


def _vision_spec(vision_cfg: dict, where: str, directory: Path, feature_layer: int, **kw) -> Tuple[VisionSpec, str]:
    """The tower's spec with its image preprocessing from `directory`'s preprocessor_config.json, and
    where that came from (for meta.json: what `training.restore` checks a run's vision settings against)."""
    path = directory / "preprocessor_config.json"
    found = _preprocessor(directory)
    spec = vision_spec_from_hf(vision_cfg, where, feature_layer, preprocessor=found, preprocessor_file=str(path), **kw)
    return spec, str(path) if found is not None else f"{where} (no preprocessor_config.json: {spec.family} defaults)"


# =============================================================================== tokenizer

def _copy_tokenizer(tok_src: Optional[Path], dst: Path) -> Optional[Path]:
    if tok_src is None:
        return None
    files = [tok_src / f for f in TOKENIZER_FILES if (tok_src / f).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.json") for f in files):
        raise ConversionError(f"{tok_src}: no tokenizer.json (Hugging Face) or vocab.json (WordTokenizer) to copy")
    out = dst / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, out / f.name)
    return out


def _tokenizer_vocab(tok_dir: Optional[Path]) -> Optional[int]:
    if tok_dir is None:
        return None
    from ..data.tokenizer import load_tokenizer
    try:
        return load_tokenizer(str(tok_dir)).vocab_size
    except ImportError as e:  # HF tokenizer without the `tokenizers` package: cannot check here
        log.warning("cannot check the tokenizer's vocabulary size: %s", e)
        return None


def _resize_vocab(tensors: dict, cfg: Config, new_vocab: int, notes: List[str]) -> None:
    """Grow the embedding (and untied LM head) to the tokenizer's size, new rows = mean of the old ones.

    A text-only LLM's tokenizer has no `<image>` token; the tokenizer wrapper adds it past
    the end of the vocabulary, so the tables need one more row (as LLaVA does).
    """
    old = cfg.model.vocab_size
    for name in ("llm.embed.weight", "llm.lm_head.weight"):
        if name == "llm.lm_head.weight" and cfg.model.tie_embeddings:
            tensors[name] = tensors["llm.embed.weight"]
            continue
        t = tensors[name]
        extra = t.float().mean(0, keepdim=True).expand(new_vocab - old, -1).to(t.dtype)
        tensors[name] = torch.cat([t, extra])
    cfg.model.vocab_size = new_vocab
    notes.append(f"vocabulary grown from {old} to {new_vocab} rows for the tokenizer (incl. <image>); "
                 "new rows = mean embedding")


# =============================================================================== import

@dataclasses.dataclass
class _Plan:
    cfg: Config
    tensors: Dict[str, torch.Tensor]
    stage_idx: int
    image_processor_source: Optional[str]  # the file the vision image fields were imported from
    notes: List[str]
    ignored: List[str]
    tokenizer_src: Optional[Path]


def _plan_llm(ck: HFCheckpoint, dst: Path, vision_src, max_seq_len, feature_layer, projector, seed) -> _Plan:
    spec = llm_spec_from_hf(ck.config, str(ck.dir / "config.json"), max_seq_len)
    vspec, vck, image_source = None, None, None
    if vision_src is not None:
        vck = HFCheckpoint(vision_src)
        vspec, image_source = _vision_spec(vck.config, str(vck.dir / "config.json"), vck.dir,
                                           -2 if feature_layer is None else feature_layer)
    cfg = build_config(_import_tree(dst, spec, vspec, projector), str(ck.dir))
    expected = {k: s for k, (s, _) in expected_state(cfg).items()}
    head = "lm_head."
    tensors = read_mapped(ck, llm_weight_map(spec, "model.", head), expected)
    ignored = _check_all_read(ck, spec.ignorable)
    notes = list(spec.notes)
    if vspec is not None:
        prefix = vision_prefix(vck, ["", "vision_model.", "vision_tower.", "vision_tower.vision_model."])
        tensors.update(read_mapped(vck, vision_weight_map(vspec, prefix), expected))
        ignored += _check_all_read(vck, (f"{prefix}encoder.layers.*",))
        tensors.update(_fresh_projector(projector, vspec.vision["hidden_size"], spec.model["hidden_size"], seed))
        notes += vspec.notes + [f"projector '{projector}' freshly initialised (seed {seed}): train it (stage 0)"]
    _check_complete(tensors, expected, ck.dir)
    return _Plan(cfg, tensors, 0, image_source, notes, ignored, ck.dir)


def _plan_llava(ck: HFCheckpoint, dst: Path, max_seq_len, feature_layer) -> _Plan:
    c = ck.config
    where = str(ck.dir / "config.json")
    text, vision = c.get("text_config"), c.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConversionError(f"{where}: a llava config needs 'text_config' and 'vision_config' objects")
    if "model_type" not in text:  # older LLaVA configs default to a LLaMA text model
        text = dict(text, model_type="llama")
    if "model_type" not in vision:
        vision = dict(vision, model_type="clip_vision_model")
    spec = llm_spec_from_hf(dict(text, architectures=c.get("architectures")), where, max_seq_len)
    act = c.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise unsupported("llava", c.get("architectures"), f"projector_hidden_act={act!r} (our projector uses GELU)",
                          where)
    layer = c.get("vision_feature_layer", -2) if feature_layer is None else feature_layer
    vspec, image_source = _vision_spec(vision, where, ck.dir, layer,
                                       select_strategy=c.get("vision_feature_select_strategy", "default"),
                                       aspect_ratio=c.get("image_aspect_ratio"))
    cfg = build_config(_import_tree(dst, spec, vspec, "mlp2x_gelu"), where)
    expected = {k: s for k, (s, _) in expected_state(cfg).items()}
    # transformers < 4.52 and the files save_pretrained still writes: language_model.model.* / lm_head;
    # the in-memory layout of newer versions: model.language_model.* / lm_head.
    llm_prefix = _first_prefix(ck, "embed_tokens.weight", ["language_model.model.", "model.language_model."])
    head = "language_model.lm_head." if llm_prefix.startswith("language_model.") else "lm_head."
    tensors = read_mapped(ck, llm_weight_map(spec, llm_prefix, head), expected)
    vprefix = vision_prefix(ck, ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                                 "model.vision_tower."])
    tensors.update(read_mapped(ck, vision_weight_map(vspec, vprefix), expected))
    pprefix = _first_prefix(ck, "linear_1.weight", ["multi_modal_projector.", "model.multi_modal_projector."])
    tensors.update(read_mapped(ck, _projector_map(pprefix, bool(c.get("multimodal_projector_bias", True))), expected))
    ignored = _check_all_read(ck, (f"{vprefix}encoder.layers.*",) + spec.ignorable)
    _check_complete(tensors, expected, ck.dir)
    notes = spec.notes + vspec.notes
    if "image_token_index" in c:
        notes.append(f"LLaVA image_token_index={c['image_token_index']} (the tokenizer's <image> is used)")
    return _Plan(cfg, tensors, 0, image_source, notes, ignored, ck.dir)


def _plan_native(ck: HFCheckpoint, dst: Path) -> _Plan:
    c = ck.config
    where = str(ck.dir / "config.json")
    tree = c.get("evomoe_config")
    if not isinstance(tree, dict):
        raise ConversionError(f"{where}: model_type 'evomoe' needs an 'evomoe_config' object")
    tree = legacy_image_fields(copy.deepcopy(tree), c.get("image_processor"))  # an export of an earlier version
    base = _base_tree(dst)
    tree.setdefault("data", {}).update({k: base["data"][k] for k in ("root", "build_if_missing", "tokenizer")})
    tree.setdefault("train", {})["save_dir"] = base["train"]["save_dir"]
    cfg = build_config(tree, where)
    stage_idx = int(c.get("stage_idx", len(cfg.stages) - 1))
    expected = {k: s for k, (s, _) in expected_state(cfg, stage_idx).items()}
    tied = cfg.model.tie_embeddings
    wmap = {k: Src(("llm.embed.weight",) if (tied and k == "llm.lm_head.weight") else (k,)) for k in expected}
    tensors = read_mapped(ck, wmap, expected)
    _check_all_read(ck)
    tok = ck.dir / "tokenizer"
    return _Plan(cfg, tensors, stage_idx, None, list(c.get("notes", [])), [], tok if tok.is_dir() else None)


def _check_complete(tensors: dict, expected: dict, src) -> None:
    missing = sorted(set(expected) - set(tensors))
    assert not missing, f"{src}: conversion produced no value for {missing[:5]}"  # a mapping bug, not user input


def hf_to_evomoe(src, dst, *, vision_src=None, tokenizer=None, feature_layer: Optional[int] = None,
                 max_seq_len: Optional[int] = None, dtype: str = "auto", projector: str = "mlp2x_gelu",
                 seed: int = 0, force: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Convert the Hugging Face folder `src` into a run folder `dst`; returns the checkpoint folder.

    vision_src: a CLIP/SigLIP folder to attach to an LLM `src` (projector freshly initialised).
    tokenizer: a tokenizer folder to use instead of the one in `src` (tokenizer.json or a
    WordTokenizer vocab.json). feature_layer: which vision hidden state the projector reads
    (default: the LLaVA config's, else -2). max_seq_len: cap model.max_seq_len (RoPE tables).
    dtype: auto (as stored) | float32 | bfloat16 | float16.
    """
    from .. import checkpointing as ckpt
    src, dst = Path(src), Path(dst)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise ConversionError(f"{dst}: destination exists and is not empty (use --force to write into it)")
    config = read_config(src)
    mt = config.get("model_type")
    ck = HFCheckpoint(src, config)
    if mt in VISION_TYPES:
        raise ConversionError(f"{src / 'config.json'}: model_type {mt!r} is a vision tower alone; pass it as "
                              "--vision-src together with an LLM --src")
    if vision_src is not None and mt in ("llava", "evomoe"):
        raise ConversionError(f"--vision-src: {src} ({mt}) already holds a vision tower")
    if mt == "evomoe":
        plan = _plan_native(ck, dst)
    elif mt == "llava":
        plan = _plan_llava(ck, dst, max_seq_len, feature_layer)
    else:
        plan = _plan_llm(ck, dst, vision_src, max_seq_len, feature_layer, projector, seed)

    dst.mkdir(parents=True, exist_ok=True)
    tok_src = Path(tokenizer) if tokenizer is not None else plan.tokenizer_src
    if tokenizer is None and mt != "evomoe" and not (src / "tokenizer.json").is_file():
        tok_src = None  # the source folder has no (fast) tokenizer: fine, noted below
    tok_dir = _copy_tokenizer(tok_src, dst)
    notes = plan.notes
    if tok_dir is None and tokenizer is None and (src / QWEN_VOCAB_FILE).is_file():  # Qwen-1: tiktoken only
        tok_dir = qwen_tokenizer_dir(src, dst / "tokenizer")
        notes.append(QWEN_TOKENIZER_NOTE)
    if tok_dir is None:
        notes.append("no tokenizer copied: put one in DST/tokenizer (or pass --tokenizer) before loading")
    vocab = _tokenizer_vocab(tok_dir)
    if vocab is not None and vocab > plan.cfg.model.vocab_size:
        _resize_vocab(plan.tensors, plan.cfg, vocab, notes)

    tensors = _finish_tensors(plan.tensors, plan.cfg, dtype)
    state = {
        "model": tensors, "stage_idx": plan.stage_idx, "step": plan.cfg.stages[plan.stage_idx].steps,
        "global_step": 0, "config": plan.cfg.to_dict(), "optimizer": None, "data": None, "rng": None,
        "structure_gen": None, "evolution": None,
    }
    meta = {"stage": plan.cfg.stages[plan.stage_idx].name, "stage_idx": plan.stage_idx, "step": state["step"],
            "global_step": 0, "stage_end": True, "format": FORMAT, "source": str(src.resolve()),
            "source_model_type": mt, "source_architectures": config.get("architectures") or [],
            "vision_source": str(Path(vision_src).resolve()) if vision_src else None,
            "image_processor_source": plan.image_processor_source,
            "notes": notes, "ignored_tensors": plan.ignored[:50], "num_ignored_tensors": len(plan.ignored)}
    path = ckpt.save_checkpoint(dst, CHECKPOINT_NAME, state, meta, keep=1)
    for n in notes:
        echo(f"note: {n}")
    if plan.ignored:
        echo(f"note: {len(plan.ignored)} tensors not needed by the model were skipped "
             f"(e.g. {', '.join(plan.ignored[:3])})")
    echo(f"wrote {path} ({sum(t.numel() for t in tensors.values() if t is not None):,} values)")
    return path


def _finish_tensors(tensors: dict, cfg: Config, dtype: str) -> Dict[str, torch.Tensor]:
    """Same order as the model's state dict; one dtype; tied LM head = the embedding tensor."""
    if dtype == "auto":
        target = tensors["llm.embed.weight"].dtype
    else:
        target = DTYPES[dtype]
    out = {}
    for k, t in tensors.items():
        out[k] = t.to(target).contiguous() if t.is_floating_point() else t
    if cfg.model.tie_embeddings:
        out["llm.lm_head.weight"] = out["llm.embed.weight"]
    return out

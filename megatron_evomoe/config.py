"""Typed configuration tree, loaded from YAML with `--section.field=value` overrides.

Every value is type-checked and every cross-field rule is validated before any
work starts; errors are `ConfigError` (a ValueError) naming the offending field.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the field."""


@dataclass
class ModelConfig:
    """Decoder LLM."""
    vocab_size: int = 0  # 0: taken from the tokenizer
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 256
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen/Qwen2); off = LLaMA
    # Options for other decoder families (Phi, StableLM; model/llm.py); the defaults are LLaMA.
    norm: str = "rmsnorm"  # rmsnorm | layernorm (LayerNorm with bias)
    rotary_pct: float = 1.0  # share of each head's channels that RoPE rotates (HF partial_rotary_factor)
    parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln(x)), one norm per layer (Phi)
    ffn_activation: str = "swiglu"  # swiglu | gelu_tanh (Phi: fc1 -> gelu_new -> fc2)
    attn_out_bias: bool = False  # bias on the attention output projection (Phi's dense)
    mlp_bias: bool = False  # biases on every FFN linear (Phi's fc1/fc2)
    lm_head_bias: bool = False  # bias on the LM head (Phi)


@dataclass
class VisionConfig:
    """ViT encoder and the projector into the LLM's hidden size."""
    enabled: bool = True
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_size: int = 128
    projector: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    # Options that let pretrained towers load exactly (see docs/checkpoint_format.md);
    # the defaults are the project's own small ViT.
    cls_token: bool = False  # CLIP: a class token is prepended (and dropped from the features)
    pre_norm: bool = False  # CLIP: LayerNorm on the embeddings before the first block
    final_norm: bool = True  # False: features are the last block's output (LLaVA reads layer -2, no LN)
    activation: str = "gelu"  # gelu | quick_gelu (CLIP) | gelu_tanh (SigLIP)
    norm_eps: float = 1e-5  # LayerNorm eps (SigLIP: 1e-6)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class MoEConfig:
    """Which decoder layers are MoE layers and how they compute."""
    num_experts: int = 4
    top_k: int = 1
    layers: str = "alternate"  # alternate | all | none | comma list of layer indices, e.g. "1,3"
    aux_loss_coeff: float = 0.001
    z_loss_coeff: float = 0.0
    renormalize: bool = True  # renormalise the top-k gates to sum to 1 (k > 1)
    expert_backend: str = "auto"  # auto | torch | loop | triton | cuda_ext | cpu_ext
    # How the experts of a MoE layer are made from the dense FFN when the
    # layer turns sparse: evolution (EvoMoE) | copy (MoE-LLaVA upcycling) |
    # noise (copies + Gaussian noise) | drop (drop-upcycling) | scratch
    init: str = "evolution"
    noise_std: float = 0.01
    drop_ratio: float = 0.5
    # Width of a dense SwiGLU shared expert every token goes through, scaled by a per-token
    # sigmoid gate and added to the routed output (Qwen2-MoE); 0 = none.
    shared_expert_size: int = 0


@dataclass
class RouterConfig:
    """Router of each MoE layer."""
    type: str = "dtr"  # dtr | linear | linear_per_modality
    hyper_hidden_size: int = 16  # H: hidden size of the DTR hypernetwork
    rank: int = 8  # R: bottleneck r of the generated SwiGLU
    embed_dim: int = 16  # D: d_e, width of the generated expert embedding
    activation: str = "none"  # none | gelu | silu (between the hypernetwork's two layers)
    backend: str = "auto"  # auto | torch | triton


@dataclass
class EvolutionConfig:
    """Expert evolution (ARCHITECTURE 4.2)."""
    rule: str = "scaled_update"  # scaled_update | ema | literal
    # One [low, high] range per evolved expert; num_experts = 1 + len(beta_ranges).
    beta_ranges: list = field(default_factory=lambda: [[0.9, 0.99], [0.8, 0.89], [0.7, 0.79]])
    seed: int = 1234


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    num_microbatches: int = 1
    backend: str = "auto"  # auto | nccl | gloo
    # ZeRO-1: shard the AdamW state over the DP (dense) and expert-DP (experts) replicas
    # (parallel/data_parallel.py::ZeroAdamW). A no-op where there is nothing to shard over
    # (one process, or dp == 1). Its per-rank checkpoints resume only in the
    # same layout with zero1 on; consolidating them (parallel/reshard.py) is not supported.
    zero1: bool = False
    bucket_mb: float = 25.0  # gradient all-reduce bucket size (MiB) without zero1
    # seconds a collective may wait for the other ranks before the run stops with an error naming
    # the rank that died or hung and the collective (parallel/watchdog.py); also the process groups' timeout
    timeout_s: float = 600.0


@dataclass
class DataConfig:
    root: str = "data/bundled"  # folder of the bundled dataset (built if missing)
    build_if_missing: bool = True
    num_images: int = 2000
    num_test_images: int = 150
    tokenizer: str = ""  # "" = the tokenizer bundled with the data; else a local HF tokenizer dir
    seq_len: int = 64
    skip_bad_samples: bool = False
    eval_split: str = "pope_test.jsonl"
    num_eval_samples: int = 200


@dataclass
class TrainConfig:
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float = 1.0
    bf16: bool = False
    save_dir: str = "runs/default"
    save_interval: int = 100  # steps; 0 = only at stage ends
    keep_checkpoints: int = 2
    log_interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    resume: bool = True
    # Start stage 0 from these weights (a run folder or checkpoint, e.g. from
    # `python -m megatron_evomoe.convert hf-to-evomoe`); ignored when resuming.
    init_from: str = ""
    nonfinite: str = "skip"  # skip | stop | reduce_lr
    deterministic: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 = leave as is
    # On the CPU, keep freed memory for reuse ("caching", training/cpu_allocator.py) or leave
    # malloc as it is ("system", e.g. when jemalloc/tcmalloc is preloaded).
    cpu_allocator: str = "caching"


@dataclass
class StageConfig:
    """One training stage (ARCHITECTURE 4.1): configuration, not code."""
    name: str = "stage"
    trainable: list = field(default_factory=lambda: ["*"])  # fnmatch patterns over parameter names
    data: str = "instruct.json"  # file under data.root
    steps: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant | linear
    moe_mode: str = "dense"  # dense | evolve | sparse: how MoE-designated layers run
    eval: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list = field(default_factory=list)  # list[StageConfig]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.ffn_activation": ("swiglu", "gelu_tanh"),
    "vision.projector": ("mlp2x_gelu", "linear"),
    "vision.activation": ("gelu", "quick_gelu", "gelu_tanh"),
    "moe.expert_backend": ("auto", "torch", "loop", "triton", "cuda_ext", "cpu_ext"),
    "moe.init": ("evolution", "copy", "noise", "drop", "scratch"),
    "router.type": ("dtr", "linear", "linear_per_modality"),
    "router.activation": ("none", "gelu", "silu"),
    "router.backend": ("auto", "torch", "triton"),
    "evolution.rule": ("scaled_update", "ema", "literal"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nonfinite": ("skip", "stop", "reduce_lr"),
    "train.cpu_allocator": ("caching", "system"),
    "stages.schedule": ("cosine", "constant", "linear"),
    "stages.moe_mode": ("dense", "evolve", "sparse"),
}


# ---------------------------------------------------------------------------
# Building from dicts, with type checks
# ---------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and mildly coerce: int -> float) `value` against annotation `tp`."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # e.g. --moe.layers=1 or a numeric folder name
    if tp is str and isinstance(value, list) and all(type(v) is int for v in value):
        return ",".join(map(str, value))  # moe.layers: [1, 3]
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        return value
    raise AssertionError(f"unsupported config type {tp} at {where}")


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = _did_you_mean(unknown[0], names)
        raise ConfigError(f"{where}.{unknown[0]}: unknown key{hint} (valid keys: {', '.join(sorted(names))})"
                          if where else f"{unknown[0]}: unknown section{hint} (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, path)
        elif name == "stages" and cls is Config:
            if not isinstance(value, list):
                raise ConfigError("stages: expected a list of stages")
            kwargs[name] = [_from_dict(StageConfig, s, f"stages[{i}]") for i, s in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, tp, path)
    return cls(**kwargs)


def _did_you_mean(key: Any, valid: set) -> str:
    """' (did you mean 'hidden_size'?)' for a typo such as 'hiden_size', else ''."""
    close = difflib.get_close_matches(str(key), sorted(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(tree: dict, dotted: str, raw: str) -> None:
    """Set `tree[a][b]... = yaml(raw)` for `--a.b=raw`; list items by index or stage name."""
    parts = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, key, where)]
        else:
            if key not in node:
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--{dotted}: '{where}' is a value, not a section")
    value = yaml.safe_load(raw) if raw != "" else ""
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(items: list, key: str, where: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ConfigError(f"--{where}: no list item with index or name '{key}'")


def _defaults_tree() -> dict:
    return dataclasses.asdict(Config())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + `section.field=value` overrides -> validated Config."""
    tree = _defaults_tree()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            # PyYAML's message spans lines (context, mark, caret): one line, "file:line:column: problem"
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _check_sections(loaded, str(path))
        tree = _merge(tree, loaded)
    for item in overrides or []:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override '{item}': expected --section.field=value")
        _check_sections({key.split(".")[0]: None}, "command line")
        _apply_override(tree, key, raw)
    cfg = _from_dict(Config, tree, "")
    validate(cfg)
    return cfg


def _check_sections(loaded: dict, source: str) -> None:
    valid = {f.name for f in dataclasses.fields(Config)}
    for key in loaded:
        if key not in valid:
            raise ConfigError(f"{key}: unknown section in {source}{_did_you_mean(key, valid)} "
                              f"(valid: {', '.join(sorted(valid))})")


# ---------------------------------------------------------------------------
# Cross-field validation
# ---------------------------------------------------------------------------

def moe_layer_indices(cfg: Config) -> list[int]:
    """Indices of the MoE-designated decoder layers."""
    spec, n = cfg.moe.layers.strip(), cfg.model.num_layers
    if spec == "none":
        return []
    if spec == "all":
        return list(range(n))
    if spec == "alternate":  # MoE-LLaVA: every other layer, starting at the second
        return list(range(1, n, 2))
    try:
        idx = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"moe.layers: expected alternate | all | none | a comma list of ints, got {spec!r}") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ConfigError(f"moe.layers: layer {bad[0]} out of range for model.num_layers={n}")
    return idx


def _require(cond: bool, fieldname: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{fieldname}: {msg}")


def validate(cfg: Config) -> None:
    m, v, moe, r, ev, p, d, t = (cfg.model, cfg.vision, cfg.moe, cfg.router, cfg.evolution,
                                 cfg.parallel, cfg.data, cfg.train)
    for section in (m, v, moe, r, ev, p, d, t):
        for f in dataclasses.fields(section):
            key, value = _section_name(section) + "." + f.name, getattr(section, f.name)
            _check_choice(key, value)
            # YAML reads .inf and .nan as floats; either would only surface as a NaN loss much later
            _require(not isinstance(value, float) or math.isfinite(value), key, f"must be finite, got {value}")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "max_seq_len"):
        _require(getattr(m, name) > 0, f"model.{name}", "must be positive")
    _require(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    _require(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    _require(m.init_std >= 0, "model.init_std", "must be >= 0")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from tokenizer)")
    _require(m.hidden_size % m.num_heads == 0, "model.hidden_size",
             f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _require((m.hidden_size // m.num_heads) % 2 == 0, "model.hidden_size", "head dim must be even for RoPE")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"model.num_heads={m.num_heads} is not divisible by num_kv_heads={m.num_kv_heads}")
    if v.enabled:
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            _require(getattr(v, name) > 0, f"vision.{name}", "must be positive")
        _require(v.norm_eps > 0, "vision.norm_eps", "must be > 0")
        _require(v.image_size % v.patch_size == 0, "vision.image_size",
                 f"{v.image_size} is not divisible by vision.patch_size={v.patch_size}")
        _require(v.hidden_size % v.num_heads == 0, "vision.hidden_size",
                 f"{v.hidden_size} is not divisible by vision.num_heads={v.num_heads}")
    _require(moe.num_experts >= 1, "moe.num_experts", "must be >= 1")
    _require(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
             f"{moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
    _require(moe.aux_loss_coeff >= 0, "moe.aux_loss_coeff", "must be >= 0")
    _require(moe.z_loss_coeff >= 0, "moe.z_loss_coeff", "must be >= 0")
    _require(0.0 <= moe.drop_ratio <= 1.0, "moe.drop_ratio", "must be in [0, 1]")
    _require(moe.noise_std >= 0, "moe.noise_std", "must be >= 0")
    moe_layer_indices(cfg)
    _validate_model_options(cfg)
    for name in ("hyper_hidden_size", "rank", "embed_dim"):
        _require(getattr(r, name) > 0, f"router.{name}", "must be positive")
    _validate_beta_ranges(cfg)
    for name in ("tp", "pp", "ep", "num_microbatches"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", "must be >= 1")
    _require(p.bucket_mb > 0, "parallel.bucket_mb", "must be > 0")
    _require(p.timeout_s > 0, "parallel.timeout_s", f"must be > 0 seconds, got {p.timeout_s}")
    _require(moe.num_experts % p.ep == 0, "parallel.ep",
             f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}")
    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if v.enabled:
        _require(v.num_image_tokens < d.seq_len, "data.seq_len",
                 f"{d.seq_len} leaves no room for text after {v.num_image_tokens} image tokens")
    _validate_data_and_train(cfg)
    _require(len(cfg.stages) >= 1, "stages", "at least one stage is required")
    names = set()
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}]"
        _check_choice("stages.schedule", s.schedule, where + ".schedule")
        _check_choice("stages.moe_mode", s.moe_mode, where + ".moe_mode")
        _require(s.name not in names, f"{where}.name", f"duplicate stage name {s.name!r}")
        _require(bool(s.name.strip()), f"{where}.name", "must not be empty (it names the stage's checkpoints)")
        names.add(s.name)
        _require(s.steps >= 0, f"{where}.steps", "must be >= 0")
        _require(s.lr >= 0 and math.isfinite(s.lr), f"{where}.lr", f"must be a finite number >= 0, got {s.lr}")
        _require(0 <= s.min_lr <= s.lr, f"{where}.min_lr", f"must be in [0, lr={s.lr}], got {s.min_lr}")
        _require(0 <= s.warmup_steps <= max(s.steps, 0), f"{where}.warmup_steps", "must be in [0, steps]")
        _require(all(isinstance(x, str) for x in s.trainable) and s.trainable, f"{where}.trainable",
                 "must be a non-empty list of parameter-name patterns")
        if s.moe_mode == "evolve":
            _require(moe.init == "evolution", f"{where}.moe_mode",
                     f"'evolve' needs moe.init=evolution (got {moe.init!r})")
    modes = [s.moe_mode for s in cfg.stages]
    if "sparse" in modes:
        first_sparse = modes.index("sparse")
        _require("dense" not in modes[first_sparse:] and "evolve" not in modes[first_sparse:],
                 "stages", "a dense or evolve stage cannot follow a sparse stage")
        _require(bool(moe_layer_indices(cfg)), "moe.layers", "a sparse stage needs at least one MoE layer")
    if "evolve" in modes:
        _require("dense" not in modes[modes.index("evolve"):], "stages",
                 "a dense stage cannot follow an evolve stage")


def _validate_data_and_train(cfg: Config) -> None:
    """Ranges that torch/numpy would otherwise reject only when first used, possibly after
    stages of training (AdamW betas at a stage start, `step % log_interval`), or accept
    silently with a wrong result (a negative clip_grad flips the gradients)."""
    d, t = cfg.data, cfg.train
    if d.build_if_missing:
        _require(d.num_images >= 1, "data.num_images", "must be >= 1")
        _require(d.num_test_images >= 1, "data.num_test_images", "must be >= 1")
    _require(d.num_eval_samples >= 0, "data.num_eval_samples", "must be >= 0 (0 = no evaluation)")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    _require(t.save_interval >= 0, "train.save_interval", "must be >= 0")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(t.log_interval >= 1, "train.log_interval", "must be >= 1")
    _require(t.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = leave as is)")
    _require(0 <= t.seed < 2 ** 32, "train.seed", f"must be in [0, 2**32) (numpy's seed range), got {t.seed}")
    _require(t.clip_grad >= 0, "train.clip_grad", "must be >= 0 (0 = no clipping)")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    betas = t.adam_betas
    _require(len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                     for b in betas), "train.adam_betas",
             f"must be [beta1, beta2] with 0 <= beta < 1, got {betas!r}")


def _validate_model_options(cfg: Config) -> None:
    """The options for other decoder families (Phi, StableLM) and what MoE layers can be made of."""
    m, moe = cfg.model, cfg.moe
    _require(0.0 < m.rotary_pct <= 1.0, "model.rotary_pct", f"{m.rotary_pct} must be in (0, 1]")
    rot = int(m.hidden_size // m.num_heads * m.rotary_pct)
    _require(rot >= 2 and rot % 2 == 0, "model.rotary_pct",
             f"rotates int(head_dim * rotary_pct) = {rot} channels per head; that must be even and >= 2")
    _require(moe.shared_expert_size >= 0, "moe.shared_expert_size", "must be >= 0 (0 = no shared expert)")
    _require(moe.shared_expert_size % cfg.parallel.tp == 0, "moe.shared_expert_size",
             f"{moe.shared_expert_size} is not divisible by parallel.tp={cfg.parallel.tp} (its FFN columns are "
             "split over TP ranks)")
    if not moe_layer_indices(cfg):
        return
    # MoE layers are made from the dense FFN, into SwiGLU GroupedExperts without biases
    if m.ffn_activation != "swiglu":
        raise ConfigError(f"moe.layers with model.ffn_activation={m.ffn_activation}: upcycling a GELU FFN into "
                          "the SwiGLU experts of a MoE layer is not supported; set moe.layers=none")
    if m.mlp_bias:
        raise ConfigError("moe.layers with model.mlp_bias=true: the experts of a MoE layer have no biases, so "
                          "upcycling would drop the FFN's; not supported, set moe.layers=none")


def _validate_beta_ranges(cfg: Config) -> None:
    ranges = cfg.evolution.beta_ranges
    for i, rg in enumerate(ranges):
        ok = (isinstance(rg, list) and len(rg) == 2 and all(isinstance(x, (int, float)) for x in rg)
              and 0.0 <= rg[0] <= rg[1] <= 1.0)
        _require(ok, f"evolution.beta_ranges[{i}]", f"must be [low, high] with 0 <= low <= high <= 1, got {rg!r}")
    if cfg.moe.init == "evolution":
        _require(cfg.moe.num_experts == 1 + len(ranges), "moe.num_experts",
                 f"{cfg.moe.num_experts} must equal 1 + len(evolution.beta_ranges) = {1 + len(ranges)} "
                 "with moe.init=evolution (each evolved expert has its own beta range)")


def _section_name(section) -> str:
    return {ModelConfig: "model", VisionConfig: "vision", MoEConfig: "moe", RouterConfig: "router",
            EvolutionConfig: "evolution", ParallelConfig: "parallel", DataConfig: "data",
            TrainConfig: "train"}[type(section)]


def _check_choice(key: str, value: Any, where: str | None = None) -> None:
    choices = _CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where or key}: {value!r} is not one of {', '.join(choices)}")

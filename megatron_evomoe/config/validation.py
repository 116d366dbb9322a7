"""Cross-field validation of a Config: every rule is checked before any work starts.

Errors are `ConfigError` naming the offending field; a choice field's allowed values are
read from its `Literal` annotation (schema.py).
"""
from __future__ import annotations

import dataclasses
import math
import re

from .schema import Config, ConfigError, StageConfig, check_choice


def moe_layer_indices(cfg: Config) -> list[int]:
    """Indices of the MoE-designated decoder layers."""
    spec, n = cfg.moe.layers.strip(), cfg.model.num_layers
    if spec == "none":
        return []
    if spec == "all":
        return list(range(n))
    if spec == "alternate":  # every other layer, starting at the second: 1, 3, 5, ...
        return list(range(1, n, 2))
    if spec == "even":  # every other layer, starting at the first: MoE-LLaVA's sparse mode (range(n)[::2])
        return list(range(0, n, 2))
    try:
        idx = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"moe.layers: expected alternate | even | all | none | a comma list of ints, got {spec!r}") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ConfigError(f"moe.layers: layer {bad[0]} out of range for model.num_layers={n}")
    return idx


def _require(cond: bool, fieldname: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{fieldname}: {msg}")


def validate(cfg: Config) -> None:
    m, v, moe, r, p, d = cfg.model, cfg.vision, cfg.moe, cfg.router, cfg.parallel, cfg.data
    _validate_section_fields(cfg)
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
        _validate_image_normalisation(v)
    _require(moe.num_experts >= 1, "moe.num_experts", "must be >= 1")
    _require(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
             f"{moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
    _require(moe.aux_loss_coeff >= 0, "moe.aux_loss_coeff", "must be >= 0")
    _require(moe.bias_update_rate >= 0, "moe.bias_update_rate", "must be >= 0")
    _require(moe.z_loss_coeff >= 0, "moe.z_loss_coeff", "must be >= 0")
    _require(0.0 <= moe.drop_ratio <= 1.0, "moe.drop_ratio", "must be in [0, 1]")
    _require(moe.noise_std >= 0, "moe.noise_std", "must be >= 0")
    moe_layer_indices(cfg)
    _validate_model_options(cfg)
    for name in ("hyper_hidden_size", "rank", "embed_dim"):
        _require(getattr(r, name) > 0, f"router.{name}", "must be positive")
    _validate_beta_ranges(cfg)
    for name in ("tp", "pp", "ep"):
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
    _validate_stages(cfg)


def _validate_section_fields(cfg: Config) -> None:
    """Every field of every section (not the stages): choices by their annotation, floats finite."""
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        if not dataclasses.is_dataclass(section):  # stages: _validate_stages
            continue
        for f in dataclasses.fields(section):
            key, value = section_field.name + "." + f.name, getattr(section, f.name)
            check_choice(type(section), f.name, value, key)
            # YAML reads .inf and .nan as floats; either would only surface as a NaN loss much later
            _require(not isinstance(value, float) or math.isfinite(value), key, f"must be finite, got {value}")


def _validate_stages(cfg: Config) -> None:
    """Each stage's fields, then the order of the stages' moe_modes."""
    moe = cfg.moe
    _require(len(cfg.stages) >= 1, "stages", "at least one stage is required")
    names = set()
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}]"
        for f in dataclasses.fields(StageConfig):
            check_choice(StageConfig, f.name, getattr(s, f.name), f"{where}.{f.name}")
        _require(s.name not in names, f"{where}.name", f"duplicate stage name {s.name!r}")
        _require(bool(s.name.strip()), f"{where}.name", "must not be empty (it names the stage's checkpoints)")
        _check_stage_name(s.name, f"{where}.name")
        names.add(s.name)
        _require(s.steps >= 0, f"{where}.steps", "must be >= 0")
        _validate_stage_batch_and_data(cfg, s)
        _require(s.lr >= 0 and math.isfinite(s.lr), f"{where}.lr", f"must be a finite number >= 0, got {s.lr}")
        _require(0 <= s.min_lr <= s.lr, f"{where}.min_lr", f"must be in [0, lr={s.lr}], got {s.min_lr}")
        _require(0 <= s.warmup_steps <= max(s.steps, 0), f"{where}.warmup_steps", "must be in [0, steps]")
        _require(all(isinstance(x, str) for x in s.trainable) and s.trainable, f"{where}.trainable",
                 "must be a non-empty list of parameter-name patterns")
        # `{moe}` expands to the MoE layers: with none, the pattern would vanish and train nothing, silently
        _require(bool(moe_layer_indices(cfg)) or not any("{moe}" in x for x in s.trainable), f"{where}.trainable",
                 f"a '{{moe}}' pattern needs MoE layers, but moe.layers={moe.layers!r} selects none")
        if s.moe_mode == "evolve":
            _require(moe.init == "evolution", f"{where}.moe_mode",
                     f"'evolve' needs moe.init=evolution (got {moe.init!r})")
            _require(bool(cfg.evolution.beta_ranges), f"{where}.moe_mode",
                     "'evolve' needs at least one evolved expert: moe.num_experts >= 2, one evolution.beta_ranges "
                     "entry each")
            _require(bool(moe_layer_indices(cfg)), "moe.layers", "an evolve stage needs at least one MoE layer")
    modes = [s.moe_mode for s in cfg.stages]
    if "sparse" in modes:
        first_sparse = modes.index("sparse")
        _require("dense" not in modes[first_sparse:] and "evolve" not in modes[first_sparse:],
                 "stages", "a dense or evolve stage cannot follow a sparse stage")
        _require(bool(moe_layer_indices(cfg)), "moe.layers", "a sparse stage needs at least one MoE layer")
    if "evolve" in modes:
        _require("dense" not in modes[modes.index("evolve"):], "stages",
                 "a dense stage cannot follow an evolve stage")


def _validate_stage_batch_and_data(cfg: Config, s: StageConfig) -> None:
    """The stage's global batch, and its data: a file name or a mixture [{path, weight}, ...]."""
    where, micro = f"stages.{s.name}", cfg.train.micro_batch_size
    _require(s.global_batch_size >= 0, f"{where}.global_batch_size", "must be >= 0 (0 = train.global_batch_size)")
    _require(s.global_batch_size == 0 or s.global_batch_size >= micro, f"{where}.global_batch_size",
             f"{s.global_batch_size} is smaller than train.micro_batch_size={micro}")
    if isinstance(s.data, str):
        _require(bool(s.data.strip()), f"{where}.data", "must name a file under data.root")
        return
    _require(bool(s.data), f"{where}.data", "a mixture needs at least one {path, weight} entry")
    for i, item in enumerate(s.data):
        at = f"{where}.data[{i}]"
        _require(isinstance(item, dict) and set(item) == {"path", "weight"}, at,
                 f"expected {{path: <file under data.root>, weight: <number > 0>}}, got {item!r}")
        _require(isinstance(item["path"], str) and bool(item["path"].strip()), f"{at}.path",
                 f"must be a file name under data.root, got {item['path']!r}")
        w = item["weight"]
        _require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0,
                 f"{at}.weight", f"must be a finite number > 0, got {w!r}")
    paths = [item["path"] for item in s.data]
    _require(len(set(paths)) == len(paths), f"{where}.data", "lists a file twice; give it one entry (weights add)")


# A stage's name becomes part of its checkpoint folders' names (`03-<name>-step000100`)
_STAGE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_stage_name(name: str, where: str) -> None:
    """Path-safe: no separator, `..` or NUL that would put checkpoints elsewhere, no leading dot that
    hides them from the checkpoint scan (which skips dot folders: unfinished saves)."""
    bad = next((c for c in name if not _STAGE_NAME.fullmatch(c)), None)
    _require(bad is None, where, f"{name!r} holds {bad!r}; use only letters, digits, '.', '_' and '-' "
                                 "(the name becomes part of the stage's checkpoint folder names)")
    _require(not name.startswith(".") and ".." not in name, where,
             f"{name!r} must not start with '.' or contain '..' (it becomes part of checkpoint folder names)")
    _require(len(name) <= 100, where, f"is {len(name)} characters long; at most 100 (it names checkpoint folders)")


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
    _require(t.global_batch_size >= 0, "train.global_batch_size", "must be >= 0 (0 = train.micro_batch_size)")
    _require(t.global_batch_size == 0 or t.global_batch_size >= t.micro_batch_size, "train.global_batch_size",
             f"{t.global_batch_size} is smaller than train.micro_batch_size={t.micro_batch_size}")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0 (0 = load in the training process)")
    _require(d.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    _require(d.pack_window >= 1, "data.pack_window", "must be >= 1")
    _require(t.save_interval >= 0, "train.save_interval", "must be >= 0")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(t.log_interval >= 1, "train.log_interval", "must be >= 1")
    _require(t.peak_tflops == "auto" or (not isinstance(t.peak_tflops, str) and t.peak_tflops > 0),
             "train.peak_tflops", f"must be a number > 0 (TFLOP/s per GPU) or 'auto', got {t.peak_tflops!r}")
    _require(t.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = leave as is)")
    _require(0 <= t.seed < 2 ** 32, "train.seed", f"must be in [0, 2**32) (numpy's seed range), got {t.seed}")
    _require(bool(t.save_dir.strip()), "train.save_dir", "must not be empty (checkpoints would land in the "
             "current folder)")
    _require(t.clip_grad >= 0, "train.clip_grad", "must be >= 0 (0 = no clipping)")
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    betas = t.adam_betas
    _require(len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                     for b in betas), "train.adam_betas",
             f"must be [beta1, beta2] with 0 <= beta < 1, got {betas!r}")
    _require(not (t.compile and cfg.moe.expert_backend == "loop"), "train.compile",
             "moe.expert_backend=loop reads every expert's token count on the host, which breaks each MoE "
             "layer's graph; use expert_backend=auto (or torch) with train.compile")


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
    # the routed experts follow the dense FFN (activation, biases); the shared expert is Qwen2-MoE's
    # bias-free SwiGLU FFN, which a GELU / biased model's FFN says nothing about
    _require(moe.shared_expert_size == 0 or (m.ffn_activation == "swiglu" and not m.mlp_bias),
             "moe.shared_expert_size", f"a shared expert is a bias-free SwiGLU FFN (Qwen2-MoE's); with "
             f"model.ffn_activation={m.ffn_activation} and model.mlp_bias={str(m.mlp_bias).lower()} it would "
             "not match the model's FFNs: set moe.shared_expert_size=0")


def _validate_image_normalisation(v) -> None:
    for name in ("image_mean", "image_std"):
        values = getattr(v, name)
        ok = (isinstance(values, list) and len(values) == 3
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values))
        _require(ok, f"vision.{name}", f"must be 3 finite numbers (R, G, B on the 0..1 scale), got {values!r}")
    _require(all(s > 0 for s in v.image_std), "vision.image_std", f"values must be > 0, got {v.image_std!r}")


def _validate_beta_ranges(cfg: Config) -> None:
    ranges, seed = cfg.evolution.beta_ranges, cfg.evolution.seed
    # the seed of a torch.Generator, which raises only when the evolve stage starts, after earlier stages
    _require(0 <= seed < 2 ** 64, "evolution.seed", f"must be in [0, 2**64) (torch's seed range), got {seed}")
    for i, rg in enumerate(ranges):
        ok = (isinstance(rg, list) and len(rg) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rg)
              and 0.0 <= rg[0] <= rg[1] <= 1.0)
        _require(ok, f"evolution.beta_ranges[{i}]", f"must be [low, high] with 0 <= low <= high <= 1, got {rg!r}")
    if cfg.moe.init == "evolution":
        _require(cfg.moe.num_experts == 1 + len(ranges), "moe.num_experts",
                 f"{cfg.moe.num_experts} must equal 1 + len(evolution.beta_ranges) = {1 + len(ranges)} "
                 "with moe.init=evolution (each evolved expert has its own beta range)")

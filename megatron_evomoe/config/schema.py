"""The configuration tree: one dataclass per section, each choice a `Literal[...]` field.

A field's `Literal` annotation is the only place its allowed values are listed:
`field_choices` reads them back (validation, error messages, and modules that check a
value they were handed, e.g. model/llm.py's FFN).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the field."""


# OpenAI CLIP's per-channel pixel mean/std (RGB, on the 0..1 scale): the default normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # layernorm: LayerNorm with bias
    rotary_pct: float = 1.0  # share of each head's channels that RoPE rotates (HF partial_rotary_factor)
    parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln(x)), one norm per layer (Phi)
    ffn_activation: Literal["swiglu", "gelu_tanh"] = "swiglu"  # gelu_tanh, Phi: fc1 -> gelu_new -> fc2
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
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    # Options that let pretrained towers load exactly (see docs/checkpoint_format.md);
    # the defaults are the project's own small ViT.
    cls_token: bool = False  # CLIP: a class token is prepended (and dropped from the features)
    pre_norm: bool = False  # CLIP: LayerNorm on the embeddings before the first block
    final_norm: bool = True  # False: features are the last block's output (LLaVA reads layer -2, no LN)
    activation: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"  # quick_gelu: CLIP; gelu_tanh: SigLIP
    norm_eps: float = 1e-5  # LayerNorm eps (SigLIP: 1e-6)
    # Image preprocessing (data/image_processing.py), as the tower's HF processor does it; the HF
    # importer sets these from preprocessor_config.json. crop: CLIP (shortest side -> image_size,
    # centre crop); pad: LLaVA-1.5 (pad to a square with the mean colour, then crop); resize: SigLIP
    # (straight to image_size x image_size). A square image of image_size is unchanged by all three.
    image_mode: Literal["crop", "pad", "resize"] = "crop"
    image_mean: list = field(default_factory=lambda: list(CLIP_MEAN))  # RGB, 0..1 scale
    image_std: list = field(default_factory=lambda: list(CLIP_STD))
    resample: Literal["bicubic", "bilinear"] = "bicubic"  # PIL filter of the resize

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class MoEConfig:
    """Which decoder layers are MoE layers and how they compute."""
    num_experts: int = 4
    top_k: int = 1
    layers: str = "alternate"  # alternate (1, 3, ...) | even (0, 2, ...: MoE-LLaVA) | all | none | comma list, e.g. "1,3"
    aux_loss_coeff: float = 0.001
    z_loss_coeff: float = 0.0
    # aux: the Switch load-balancing loss (aux_loss_coeff); aux_free: a per-expert routing bias moved after
    # every step against the global batch's load (DeepSeek-V3; moe/load_balancing.py), no balancing loss;
    # both; none. The z-loss is separate.
    load_balancing: Literal["aux", "aux_free", "both", "none"] = "aux"
    bias_update_rate: float = 0.001  # aux_free / both: the bias step per optimizer step
    renormalize: bool = True  # renormalise the top-k gates to sum to 1 (k > 1)
    expert_backend: Literal["auto", "torch", "loop", "triton", "cuda_ext", "cpu_ext"] = "auto"
    # How the experts of a MoE layer are made from the dense FFN when the
    # layer turns sparse: evolution (EvoMoE) | copy (MoE-LLaVA upcycling) |
    # noise (copies + Gaussian noise) | drop (drop-upcycling) | scratch
    init: Literal["evolution", "copy", "noise", "drop", "scratch"] = "evolution"
    noise_std: float = 0.01
    drop_ratio: float = 0.5
    # Width of a dense SwiGLU shared expert every token goes through, scaled by a per-token
    # sigmoid gate and added to the routed output (Qwen2-MoE); 0 = none.
    shared_expert_size: int = 0


@dataclass
class RouterConfig:
    """Router of each MoE layer."""
    type: Literal["dtr", "linear", "linear_per_modality"] = "dtr"
    hyper_hidden_size: int = 16  # H: hidden size of the DTR hypernetwork
    rank: int = 8  # R: bottleneck r of the generated SwiGLU
    embed_dim: int = 16  # D: d_e, width of the generated expert embedding
    activation: Literal["none", "gelu", "silu"] = "none"  # between the hypernetwork's two layers
    backend: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class EvolutionConfig:
    """Expert evolution (ARCHITECTURE 4.2)."""
    rule: Literal["scaled_update", "ema", "literal"] = "scaled_update"  # see moe/evolution.py
    # One [low, high] range per evolved expert; num_experts = 1 + len(beta_ranges).
    beta_ranges: list = field(default_factory=lambda: [[0.9, 0.99], [0.8, 0.89], [0.7, 0.79]])
    seed: int = 1234


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # ZeRO-1: shard the AdamW state over the DP (dense) and expert-DP (experts) replicas
    # (parallel/data_parallel.py::ZeroAdamW). A no-op where there is nothing to shard over
    # (one process, or dp == 1). Its moments are checkpointed per tensor (parallel/checkpoint_boxes.py):
    # a checkpoint resumes in any layout, with zero1 on or off.
    zero1: bool = False
    bucket_mb: float = 25.0  # gradient all-reduce bucket size (MiB) without zero1
    # seconds a collective may wait for the other ranks before the run stops with an error naming
    # the rank that died or hung and the collective (parallel/watchdog.py); also the process groups' timeout
    timeout_s: float = 600.0


# How a conversation becomes text and which of it is trained on (data/conversation_templates.py): LLaVA-1.5's
# vicuna_v1, plain (LLaVA's stage-1 captions), chatml (Qwen2-Instruct), MoE-LLaVA's phi / stablelm / openchat,
# or tokenizer (the tokenizer's own Jinja chat_template)
ConversationTemplateName = Literal["vicuna_v1", "plain", "chatml", "phi", "stablelm", "openchat", "tokenizer"]


@dataclass
class DataConfig:
    root: str = "data/bundled"  # folder of the bundled dataset (built if missing)
    build_if_missing: bool = True
    num_images: int = 2000
    num_test_images: int = 150
    tokenizer: str = ""  # "" = the tokenizer bundled with the data; else a local HF tokenizer dir
    seq_len: int = 64
    # the stages' template unless a stage sets its own; evaluation and generation use the last trained stage's
    conversation_template: ConversationTemplateName = "vicuna_v1"
    skip_bad_samples: bool = False
    eval_split: str = "pope_test.jsonl"
    num_eval_samples: int = 200
    # The token index (data/token_index.py): each stage file validated and tokenised once, memory-mapped
    # by every rank; "" = <data.root>/.token_index
    index_dir: str = ""
    # A record longer than seq_len: stop with its file and id (error), cut its text at the end keeping the
    # image, as LLaVA does (truncate), or drop it (skip); truncations and skips are counted and logged
    overlong: Literal["error", "truncate", "skip"] = "error"
    # none: one sample per row, padded to seq_len; pack: several samples per row, attention kept inside
    # each (data/packing.py), a micro-batch is micro_batch_size packed rows
    packing: Literal["none", "pack"] = "none"
    num_workers: int = 0  # DataLoader worker processes decoding images (0 = in the training process)
    prefetch_factor: int = 2  # micro-batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for the copy to the GPU (only with a CUDA device)
    # packing=pack: the sample stream is cut into windows of this many samples, each packed on its own
    # (data/batch_plan.py); larger windows pack tighter, the packer's cost grows with it
    pack_window: int = 256


@dataclass
class TrainConfig:
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    micro_batch_size: int = 16
    # Samples per optimizer step, all data-parallel ranks together (packed rows with data.packing=pack,
    # as Megatron-LM counts them); gradient accumulation is derived: global / (micro_batch_size x dp), so
    # the trajectory does not depend on the number of processes. 0 = micro_batch_size. Per stage:
    # stages.<name>.global_batch_size.
    global_batch_size: int = 0
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float = 1.0
    bf16: bool = False
    # Activation recompute (model/recompute.py): "none"; "selective": the attention core and the up half of
    # every FFN / expert MLP are recomputed in backward; "full": every decoder layer keeps only its input.
    recompute: Literal["none", "selective", "full"] = "none"
    save_dir: str = "runs/default"
    save_interval: int = 100  # steps; 0 = only at stage ends
    keep_checkpoints: int = 2
    # Write checkpoints in a background thread: the step's tensors are copied at the step boundary
    # (host memory: one copy of this rank's model and optimizer state) and training goes on while they
    # are written; `latest` moves only once the whole checkpoint is on disk.
    async_save: bool = False
    log_interval: int = 10
    tensorboard: bool = True
    # Weights & Biases project the main rank also logs to (needs `pip install wandb`; WANDB_MODE is honoured,
    # the run is named after save_dir); "" = off.
    wandb_project: str = ""
    # The MFU's denominator, TFLOP/s per GPU: a number > 0, or "auto": the GPU's dense bf16 peak from
    # stages/flops.py's table (no MFU for a GPU not in it), on a CPU a GEMM rate measured at the start.
    peak_tflops: Union[float, int, str] = "auto"
    progress_bar: bool = True  # a tqdm bar, only when stderr is a terminal (a batch job's log gets the log lines)
    resume: bool = True
    # Start stage 0 from these weights (a run folder or checkpoint, e.g. from
    # `python -m megatron_evomoe.convert hf-to-evomoe`); ignored when resuming.
    init_from: str = ""
    nonfinite: Literal["skip", "stop", "reduce_lr"] = "skip"
    deterministic: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 = leave as is
    # On the CPU, keep freed memory for reuse ("caching", training/cpu_allocator.py) or leave
    # malloc as it is ("system", e.g. when jemalloc/tcmalloc is preloaded).
    cpu_allocator: Literal["caching", "system"] = "caching"
    # A signal that, like SIGTERM and SIGINT, stops the run at the next step boundary with a checkpoint
    # (e.g. "SIGUSR1" with `sbatch --signal=B:USR1@120`); "" = only SIGTERM and SIGINT.
    exit_signal: str = ""
    # torch.compile each decoder layer (parallel/compile.py, after TP/EP): the MoE layer traces into one
    # graph without host syncs; the first steps of each stage structure pay the compile time.
    compile: bool = False


@dataclass
class StageConfig:
    """One training stage (ARCHITECTURE 4.1): configuration, not code."""
    name: str = "stage"
    trainable: list = field(default_factory=lambda: ["*"])  # fnmatch patterns over parameter names
    # a file under data.root, or a mixture: a list of {path: file under data.root, weight: > 0}, each
    # global sample drawn from a component with probability weight / sum of weights (data/mixture.py)
    data: Union[str, list] = "instruct.json"
    global_batch_size: int = 0  # samples (packed rows) per optimizer step; 0 = train.global_batch_size
    steps: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    moe_mode: Literal["dense", "evolve", "sparse"] = "dense"  # how MoE-designated layers run
    # "" = data.conversation_template; LLaVA's projector pre-training stage uses plain
    conversation_template: Literal["", ConversationTemplateName] = ""
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


# ---------------------------------------------------------------------------
# Reading the annotations
# ---------------------------------------------------------------------------

@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the module's `from __future__` makes them strings)."""
    return typing.get_type_hints(cls)


def field_choices(cls: type, name: str) -> tuple:
    """The allowed values of field `name` of `cls`, in declared order; () for a free-form field."""
    tp = field_types(cls)[name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def check_choice(cls: type, name: str, value: Any, where: str) -> None:
    """ConfigError `{where}: {value!r} is not one of a, b, c` unless `value` is allowed for field `name`."""
    choices = field_choices(cls, name)
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(c if c else repr(c) for c in choices)}")

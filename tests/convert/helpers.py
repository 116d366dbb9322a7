"""Helpers of the converter tests: tiny configs, random weights, a tiny HF tokenizer, our own checkpoints."""
import json

import torch

from megatron_evomoe.config import load_config
from megatron_evomoe.model.mllm import MultimodalLM
from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.stages.structure import apply_stage_structure

# Small enough to build and run in milliseconds; vocab 64 leaves ids 61..63 free after
# the tokenizer's 60 words and the <image> token the wrapper adds (id 60).
SMALL_LLM = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                    patch_size=8)
TOKENIZER_WORDS = 60
IMAGE_ID = TOKENIZER_WORDS  # what HFTokenizer gives <image> when the vocabulary lacks it


@torch.no_grad()
def randomize(model, seed=0):
    """Replace HF's (often zero/one) init by random weights, so every tensor matters for parity."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() == 0:
            continue
        noise = torch.randn(p.shape, generator=g)
        p.copy_(noise * 0.2 if p.dim() > 1 else p + 0.1 * noise)
    return model.eval()


def write_tokenizer(directory, num_words=TOKENIZER_WORDS):
    """A word-level tokenizer.json (needs `tokenizers`, which transformers brings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, num_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def text_ids(batch=2, length=12, seed=1):
    return torch.randint(3, TOKENIZER_WORDS, (batch, length), generator=torch.Generator().manual_seed(seed))


OURS = ["--model.vocab_size=64", "--model.hidden_size=32", "--model.num_layers=4", "--model.num_heads=4",
        "--model.num_kv_heads=2", "--model.ffn_hidden_size=48", "--model.max_seq_len=64", "--data.seq_len=32",
        "--vision.image_size=16", "--vision.patch_size=8", "--vision.hidden_size=16", "--vision.num_heads=2",
        "--vision.num_layers=1", "--vision.ffn_hidden_size=32", "--moe.expert_backend=torch",
        "--router.backend=torch", "--data.build_if_missing=false"]
EVO_STAGES = ("--stages=[{name: warmup, steps: 1}, {name: evolution, steps: 1, moe_mode: evolve},"
              " {name: router, steps: 1, moe_mode: sparse}]")


def make_run(root, *overrides, stage_idx=-1, seed=0):
    """A checkpoint of our own model with random weights (and a word tokenizer), as the trainer writes it."""
    from megatron_evomoe.data.tokenizer import WordTokenizer
    data = root / "data"
    WordTokenizer.build(["a small tokenizer"]).save(str(data / "tokenizer"))
    cfg = load_config(None, OURS + [f"--data.root={data}", f"--train.save_dir={root / 'run'}", *overrides])
    stage_idx %= len(cfg.stages)
    model = MultimodalLM(cfg, image_token_id=4)
    gen = torch.Generator().manual_seed(seed)
    for stage in cfg.stages[: stage_idx + 1]:
        apply_stage_structure(model, cfg, stage, gen)
    with torch.no_grad():
        for t in model.state_dict().values():  # parameters and evolved experts, not the RoPE tables
            if t.is_floating_point() and t.numel():
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(noise * 0.2 if t.dim() > 1 else t + 0.1 * noise)
    state = {"model": model.state_dict(), "stage_idx": stage_idx, "step": 1, "global_step": 3,
             "config": cfg.to_dict()}
    meta = {"stage": cfg.stages[stage_idx].name, "stage_idx": stage_idx, "step": 1, "global_step": 3}
    ckpt.save_checkpoint(root / "run", "ckpt", state, meta, keep=1)
    return root / "run", model.eval(), cfg


# --------------------------------------------------------------------------- Qwen-1 (remote code)

# A tiny Qwen-1 config.json (QWenLMHeadModel's field names); its MLP is intermediate_size // 2 = 48 wide.
SMALL_QWEN = dict(model_type="qwen", architectures=["QWenLMHeadModel"], vocab_size=64, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=4, kv_channels=8, intermediate_size=96,
                  layer_norm_epsilon=1e-5, rotary_emb_base=50000, rotary_pct=1.0, seq_length=48,
                  max_position_embeddings=64, no_bias=True, tie_word_embeddings=False, use_dynamic_ntk=True,
                  use_logn_attn=True, scale_attn_weights=True, emb_dropout_prob=0.0, attn_dropout_prob=0.0,
                  initializer_range=0.02)


def qwen_tensors(cfg, seed=0):
    """Random weights under Qwen-1's tensor names and shapes (transformer.wte / h.{i} / ln_f, lm_head)."""
    g = torch.Generator().manual_seed(seed)
    C, F, V = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]
    bias = not cfg["no_bias"]
    shapes = {"transformer.wte.weight": (V, C), "transformer.ln_f.weight": (C,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_2.weight": (C,), p + "attn.c_attn.weight": (3 * C, C),
                       p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C),
                       p + "mlp.w1.weight": (F, C), p + "mlp.w2.weight": (F, C), p + "mlp.c_proj.weight": (C, F)})
        if bias:
            shapes.update({p + "attn.c_proj.bias": (C,), p + "mlp.w1.bias": (F,), p + "mlp.w2.bias": (F,),
                           p + "mlp.c_proj.bias": (C,)})
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        out[name] = noise * 0.2 if len(shape) > 1 else (1.0 if "ln" in name else 0.0) + 0.1 * noise
    return out


def write_qwen(directory, cfg, tensors, tokenizer=True):
    """A Qwen-1-style folder: config.json + model.safetensors (+ a word tokenizer.json)."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(directory)
    return directory

"""A tiny multimodal MoE model, fixed batches and a minimal training loop shared by the
single-process reference and the parallel workers."""
from __future__ import annotations

import torch

from megatron_evomoe.config import StageConfig, load_config
from megatron_evomoe.model.mllm import IGNORE_INDEX, MultimodalLM
from megatron_evomoe.moe.experts import is_weight_matrix
from megatron_evomoe.parallel import (ParallelState, all_reduce_floats, apply_dp, clip_grad_norm_,
                                      forward_backward_1f1b, parallelize)
from megatron_evomoe.parallel.expert_bias import update_expert_biases
from megatron_evomoe.stages.structure import apply_stage_structure

VOCAB = 51  # odd: exercises the vocabulary padding of the vocab-parallel layers
IMAGE_TOKEN = 50
SEQ = 16
NUM_IMAGE_TOKENS = 4  # image 16x16, patch 8


def tiny_cfg(tp=1, pp=1, ep=1, sp=False, router="dtr", top_k=2, layers=4, extra=()):
    o = ["--stages=[{name: s, moe_mode: sparse}]", f"--model.vocab_size={VOCAB}", "--model.hidden_size=32",
         "--model.num_heads=4", "--model.num_kv_heads=2", "--model.ffn_hidden_size=48",
         f"--model.num_layers={layers}", "--model.max_seq_len=32", "--vision.image_size=16",
         "--vision.patch_size=8", "--vision.hidden_size=16", "--vision.num_heads=2", "--vision.num_layers=1",
         "--vision.ffn_hidden_size=32", "--data.seq_len=16", "--moe.num_experts=4", f"--moe.top_k={top_k}",
         "--moe.layers=alternate", "--moe.init=noise", "--moe.noise_std=0.5", "--moe.aux_loss_coeff=0.1",
         "--moe.z_loss_coeff=0.01", "--moe.expert_backend=torch", f"--router.type={router}",
         "--router.backend=torch", f"--parallel.tp={tp}", f"--parallel.pp={pp}", f"--parallel.ep={ep}",
         f"--parallel.sequence_parallel={str(sp).lower()}"]
    return load_config(None, o + list(extra))


def build_model(cfg, seed: int = 0) -> MultimodalLM:
    """The plain model with its MoE layers made sparse (noise-upcycled experts, fresh routers)."""
    torch.manual_seed(seed)
    model = MultimodalLM(cfg, IMAGE_TOKEN)
    apply_stage_structure(model, cfg, StageConfig(name="s", moe_mode="sparse"), torch.Generator().manual_seed(seed))
    return model


def make_batches(num_steps: int, global_batch: int, seed: int = 1) -> list[dict]:
    """One dict per step: input_ids/labels [B, S], images [B, 3, 16, 16] (one image per sample)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(num_steps):
        ids = torch.randint(0, VOCAB - 1, (global_batch, SEQ), generator=g)
        ids[:, 1:1 + NUM_IMAGE_TOKENS] = IMAGE_TOKEN
        labels = ids.clone()
        labels[:, :1 + NUM_IMAGE_TOKENS] = IGNORE_INDEX
        labels[:, -2:][torch.rand(global_batch, 2, generator=g) < 0.5] = IGNORE_INDEX  # uneven counts
        images = torch.randn(global_batch, 3, 16, 16, generator=g)
        steps.append({"input_ids": ids, "labels": labels, "images": images})
    return steps


def split_step(batch: dict, num_micro: int, dp_rank: int, dp_size: int) -> list[dict]:
    """Global step batch -> this DP rank's micro-batches: micro-batch k is rows [k*b, (k+1)*b) of
    the step, and DP rank d takes rows d, d+dp, ... of it (as the sharded sampler does)."""
    B = batch["input_ids"].shape[0]
    b = B // num_micro
    return [{k: v[m * b:(m + 1) * b][dp_rank::dp_size] for k, v in batch.items()} for m in range(num_micro)]


def train(model, state: ParallelState, steps: list[dict], num_micro: int, lr: float = 1e-2,
          bucket_size_mb: float = 0.002, zero: bool = False, optimizer: list | None = None) -> dict:
    """AdamW steps as the trainer does them: loss / global token count, aux / micro-batches,
    DP reduction, global-norm clipping. Returns per-step losses and grad norms (DP-summed).
    zero: ZeRO-1 (`ZeroAdamW`: sharded optimizer state, reduce-scatter + all-gather); weight decay
    then applies to matrices only, as in training/optim.py, and `zero="reference"` gives the
    unsharded run with those same groups. optimizer: a list the optimizer is appended to (for checkpoints)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if zero is True:
        from megatron_evomoe.parallel.data_parallel import ZeroAdamW
        opt = ZeroAdamW(model, params, state, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    elif zero == "reference":
        opt = torch.optim.AdamW([{"params": [p for n, p in params if is_weight_matrix(n, p)], "weight_decay": 0.1},
                                 {"params": [p for n, p in params if not is_weight_matrix(n, p)], "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW([p for _, p in params], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    reducer = apply_dp(model, params, state, bucket_size_mb=bucket_size_mb)
    if optimizer is not None:
        optimizer.append(opt)
    losses, norms = [], []
    for batch in steps:
        micro = split_step(batch, num_micro, state.dp_rank, state.dp_size)
        num_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the global count
        opt.zero_grad(set_to_none=True)
        if state.pp_size > 1:
            tot = forward_backward_1f1b(model, state, micro, num_tokens, before_last_backward=reducer.final_backward)
            lm, aux = tot["lm_loss"], tot["aux_loss"]
        else:
            lm = aux = 0.0
            for i, mb in enumerate(micro):
                out = model(mb["input_ids"], mb["images"], mb["labels"])
                lm_c, aux_c = out.lm_loss_sum / num_tokens, out.aux_loss / len(micro)
                if i == len(micro) - 1 and not zero:  # the DP buckets all-reduce during this backward
                    reducer.final_backward()
                (lm_c + aux_c).backward()
                lm, aux = lm + float(lm_c.detach()), aux + float(aux_c.detach())
        if zero is True:
            opt.reduce_gradients()
            norms.append(opt.clip_grad_norm_(1.0))
        else:
            reducer.reduce()
            norms.append(clip_grad_norm_(model, params, 1.0, state))
        opt.step()
        update_expert_biases(model, state.dp_group)  # (moe.load_balancing=aux_free|both only)
        lm, aux = all_reduce_floats([lm, aux], state.dp_group)
        losses.append(lm + aux)
    out = {"losses": losses, "grad_norms": norms, "reducer_bytes": reducer.bytes_reduced,
           "buckets": reducer.num_buckets()}
    if zero is True:
        out["optimizer_state_numel"] = opt.state_numel()
        out["zero_bytes"] = opt.bytes_reduced
    return out


def reference(cfg, steps, num_micro, seed=0, zero=False) -> dict:
    model = build_model(cfg, seed)
    state = ParallelState.single(cfg)
    out = train(model, state, steps, num_micro, zero="reference" if zero else False)
    out["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def parallel_run(cfg, steps, num_micro, rank, world_size, seed=0, zero=False):
    state = ParallelState.build(cfg, rank, world_size)
    model = parallelize(build_model(cfg, seed), state, cfg)
    return state, model, train(model, state, steps, num_micro, zero=zero)


class Crash(Exception):
    """Raised inside a training step to simulate a run dying mid-stage."""


def run_until_crash(cfg, state, crash_at: int) -> None:
    """Run the trainer and stop it with `Crash` just before global step `crash_at`."""
    from megatron_evomoe.training.trainer import Trainer
    real = Trainer._train_step

    def crashing(self, *a, **k):
        if self.global_step + 1 == crash_at:
            raise Crash()
        return real(self, *a, **k)

    Trainer._train_step = crashing
    try:
        Trainer(cfg, state).run()
    except Crash:
        pass
    finally:
        Trainer._train_step = real

"""The memory plan of a config and layout (stages/memory_plan.py), and next to it one rank's measured peak.

    python benchmarks/memory_plan.py --config examples/configs/evomoe_openchat_7b_clip336.yaml --world-size 8
    python benchmarks/memory_plan.py --config examples/configs/tiny_cpu.yaml --world-size 1 --measure \
        --model.vocab_size=512

The measurement runs the training step the trainer runs (trainer.py::_train_step: zero_grad, forward and
backward of each micro-batch, clipping, AdamW, stage II's evolution) twice, on one process holding the
rank's shards (a layout of size 1: only world size 1 is measured), and reports the peak of the live tensor
bytes over both steps (parallel/memory_tracking.py::LiveTensorBytes). `--fake` runs it under
FakeTensorMode: shapes only, no memory and no arithmetic, for configs too big for this machine (the
data-dependent checks of a forward, the image-slot count and the MoE's row counts, cannot run there, so
only a dense model without images is measured that way).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_evomoe.config import load_config  # noqa: E402
from megatron_evomoe.model.mllm import IGNORE_INDEX  # noqa: E402
from megatron_evomoe.parallel import ParallelState, parallelize  # noqa: E402
from megatron_evomoe.parallel.memory_tracking import LiveTensorBytes  # noqa: E402
from megatron_evomoe.parallel.shard_counts import rank_shard_counts  # noqa: E402
from megatron_evomoe.parallel.sharded_construction import materialise_shards  # noqa: E402
from megatron_evomoe.stages.memory_plan import GIB, format_plan, plan_memory, verdict  # noqa: E402
from megatron_evomoe.config.global_batch import accumulation_steps  # noqa: E402
from megatron_evomoe.stages.structure import apply_stage_structure, build_model, evolution_scheduler  # noqa: E402
from megatron_evomoe.stages.trainable import set_trainable  # noqa: E402
from megatron_evomoe.training.optim import build_optimizer  # noqa: E402

IMAGE_TOKEN = 0  # (the ids of the synthetic batches are drawn from [1, V))


def synthetic_micro_batch(cfg, generator: torch.Generator) -> dict:
    """One micro-batch as the loader gives it: ids/labels [B, S], one image [3, H, W] per sample whose
    num_image_tokens positions follow the first token; the image and the first token are not supervised."""
    B, S, V = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    ids = torch.randint(1, V, (B, S), generator=generator)
    labels = ids.clone()
    images = None
    if cfg.vision.enabled:
        P = cfg.vision.num_image_tokens
        ids[:, 1:1 + P] = IMAGE_TOKEN
        labels[:, :1 + P] = IGNORE_INDEX
        images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=generator)
    else:
        labels[:, 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "images": images}


def _train_step(model, opt, params, micro: list[dict], evo, cfg, num_tokens: int) -> None:
    """trainer.py::_train_step on one process: the same order of allocations and frees."""
    opt.zero_grad(set_to_none=True)
    for batch in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            out = model(batch["input_ids"], batch["images"], batch["labels"])
        lm = out.lm_loss_sum / max(num_tokens, 1)
        aux = out.aux_loss / len(micro)
        (lm + aux).backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.train.clip_grad)
    if evo is not None:
        evo.before_step()
    opt.step()
    if evo is not None:
        evo.after_step()


def _model_bytes(model) -> int:
    """Bytes of the distinct storages of the model's parameters and buffers."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@torch.no_grad()
def _empty_shards(model) -> None:
    """materialise_shards without the values (FakeTensorMode has none to draw): empty (fake) storage for
    every meta parameter and buffer, tied parameters kept tied."""
    done: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                mod._parameters[name] = done[id(p)]
        for name, b in mod._buffers.items():
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
        if hasattr(mod, "init_buffers"):
            mod.init_buffers()


def build_stage_model(cfg, stage_idx: int, fake: bool):
    """This stage's model on one process as the trainer holds it: built on the meta device, materialised,
    then converted stage by stage (the evolved copies and the experts are made from the dense FFN)."""
    state = ParallelState.single(cfg)
    with torch.device("meta"):
        model = build_model(cfg, IMAGE_TOKEN)
    parallelize(model, state, cfg)
    if fake:
        _empty_shards(model)
    else:
        materialise_shards(model, state, cfg, "cpu", cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for stage in cfg.stages[:stage_idx + 1]:
        apply_stage_structure(model, cfg, stage, gen)
    return parallelize(model, state, cfg)  # (train.recompute marks the new MLPs)


def supervised_tokens(cfg) -> int:
    """The shifted labels' supervised count of one synthetic micro-batch (known without reading them)."""
    unsupervised = 1 + (cfg.vision.num_image_tokens if cfg.vision.enabled else 0)
    return cfg.train.micro_batch_size * (cfg.data.seq_len - unsupervised)


def measure_step_peak(cfg, stage_idx: int, num_steps: int = 2, fake: bool = False) -> int:
    """Peak live tensor bytes of `num_steps` training steps of stage `stage_idx` on one process: the model's
    tensors plus the peak of everything the steps create (optimizer state, gradients, activations)."""
    cfg = copy.deepcopy(cfg)
    stage = cfg.stages[stage_idx]
    num_micro = accumulation_steps(cfg, stage, 1)
    mode, checks = contextlib.nullcontext(), contextlib.nullcontext()
    if fake:
        from unittest import mock

        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # the image-slot check reads a count on the host: fake tensors have no values (it allocates nothing)
        checks = mock.patch("megatron_evomoe.model.mllm._check_image_slots", lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    with mode:
        model = build_stage_model(cfg, stage_idx, fake)
        batches = [[synthetic_micro_batch(cfg, gen) for _ in range(num_micro)] for _ in range(num_steps)]
    names = set(set_trainable(model, cfg, stage, stage_idx))  # (its pattern bookkeeping is a real tensor)
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    with mode, checks, LiveTensorBytes() as mem:
        opt = build_optimizer(params, stage.lr, cfg.train.weight_decay, tuple(cfg.train.adam_betas),
                              torch.device("cpu"))
        evo = evolution_scheduler(model, cfg) if stage.moe_mode == "evolve" else None
        for micro in batches:
            _train_step(model, opt, params, micro, evo, cfg, num_micro * supervised_tokens(cfg))
    return _model_bytes(model) + mem.peak


def measure_parallel_step_peak(cfg, stage_idx: int, state, num_steps: int = 2) -> int:
    """`measure_step_peak` on one rank of a launched layout (`state` from ParallelState.build): the trainer's
    ParallelTraining path (sharded construction, the stage structure changes, TP/SP hooks, the DP reducer or
    ZeRO-1, the 1F1B schedule under PP)."""
    from megatron_evomoe.parallel.training_hooks import ParallelTraining
    cfg = copy.deepcopy(cfg)
    stage = cfg.stages[stage_idx]
    num_micro = accumulation_steps(cfg, stage, state.dp_size)
    with torch.device("meta"):
        model = build_model(cfg, IMAGE_TOKEN)
    par = ParallelTraining(model, state, cfg)
    par.materialise("cpu", cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for s in cfg.stages[:stage_idx + 1]:
        par.apply_stage_structure(s, gen)
    names = set(par.set_trainable(stage, stage_idx))
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    data = torch.Generator().manual_seed(state.dp_rank)  # each DP rank its own samples
    batches = [[synthetic_micro_batch(cfg, data) for _ in range(num_micro)] for _ in range(num_steps)]
    num_tokens = num_micro * state.dp_size * supervised_tokens(cfg)
    with LiveTensorBytes() as mem:
        betas = tuple(cfg.train.adam_betas)
        opt = par.start_stage(params, stage.lr, cfg.train.weight_decay, betas) or build_optimizer(
            params, stage.lr, cfg.train.weight_decay, betas, torch.device("cpu"))
        evo = evolution_scheduler(model, cfg) if stage.moe_mode == "evolve" else None
        for micro in batches:
            opt.zero_grad(set_to_none=True)
            if par.pipeline:
                par.forward_backward(micro, num_tokens, "cpu", cfg.train.bf16)
            else:
                for i, batch in enumerate(micro):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
                        out = model(batch["input_ids"], batch["images"], batch["labels"])
                    if i == len(micro) - 1:
                        par.final_backward()
                    (out.lm_loss_sum / num_tokens + out.aux_loss / len(micro)).backward()
            par.reduce_and_clip(params, cfg.train.clip_grad)
            if evo is not None:
                evo.before_step()
            opt.step()
            par.wait_for_params()
            if evo is not None:
                evo.after_step()
    return _model_bytes(model) + mem.peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--measure", action="store_true", help="measure one rank's peak (world size 1 only)")
    parser.add_argument("--fake", action="store_true", help="measure under FakeTensorMode")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the plan's tensors live (the DTR's backend); --measure implies cpu")
    parser.add_argument("--measure-stages", help="comma-separated stage names to measure (default: all)")
    parser.add_argument("--markdown", help="also write the output to this file as a markdown snippet")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if not cfg.model.vocab_size:
        parser.error("set --model.vocab_size=N (the plan does not load the tokenizer)")
    rows = plan_memory(cfg, args.world_size, rank_shard_counts, "cpu" if args.measure else args.device)
    lines = [format_plan(rows, args.gpu_memory_gb), verdict(rows, args.gpu_memory_gb)[1]]
    if args.measure:
        if args.world_size != 1:
            parser.error("--measure measures a layout of size 1 (--world-size 1)")
        how = "FakeTensorMode" if args.fake else "real tensors"
        lines += ["", f"measured ({how}, one process, 2 steps; the plan for tensors on the CPU):",
                  f"{'stage':<14}{'plan GiB':>10}{'measured GiB':>14}{'plan / measured':>17}"]
        wanted = args.measure_stages.split(",") if args.measure_stages else [r.stage for r in rows]
        for idx, row in enumerate(rows):
            if row.stage not in wanted:
                continue
            if args.fake and row.moe_mode == "sparse":  # (the router's token gathers have data-dependent shapes)
                lines.append(f"{row.stage:<14}{row.total / GIB:>10.3f}{'n/a (fake)':>14}")
                continue
            peak = measure_step_peak(cfg, idx, fake=args.fake)
            lines.append(f"{row.stage:<14}{row.total / GIB:>10.3f}{peak / GIB:>14.3f}{row.total / peak:>17.3f}")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        cmd = " ".join(["python benchmarks/memory_plan.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.markdown).write_text(f"`{cmd}`\n\n```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

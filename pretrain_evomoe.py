#!/usr/bin/env python
"""Train a multimodal MoE LLM with EvoMoE, stage by stage.

    python pretrain_evomoe.py --config examples/configs/tiny_cpu.yaml --train.save_dir=runs/demo
    torchrun --nproc_per_node=1 pretrain_evomoe.py --config ... [--section.field=value ...]
    torchrun --nproc_per_node=4 pretrain_evomoe.py --config ... --parallel.tp=2 --parallel.ep=2   # gloo on CPU
    python pretrain_evomoe.py --config ... --dry-run     # validate, print sizes and the plan
    python pretrain_evomoe.py --config ... --dry-run --world-size 8 --gpu-memory-gb 80   # + memory per GPU
"""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_evomoe.cli import USER_ERRORS, ArgumentParser, finite_float, int_at_least, user_error
from megatron_evomoe.config import ConfigError, load_config
from megatron_evomoe.parallel.watchdog import EXIT_CODE_DISTRIBUTED_FAULT, DistributedFaultError
from megatron_evomoe.training.nonfinite import NonFiniteError
from megatron_evomoe.training.stop_request import EXIT_CODE_STOPPED, TrainingStopped


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print sizes and the plan, exit")
    parser.add_argument("--gpu-memory-gb", type=finite_float(0.0, low_open=True), default=80.0,
                        help="--dry-run: memory of one GPU in GiB (an '80 GB' GPU holds 80 GiB) the plan is "
                             "checked against (default 80)")
    parser.add_argument("--world-size", type=int_at_least(1), default=None,
                        help="--dry-run: number of processes of the planned run (default: $WORLD_SIZE, else "
                             "the smallest the layout allows, tp * pp * ep)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        parser.error(f"unrecognised argument {bad[0]!r}: overrides are written --section.field=value")
    return args, overrides


def resolve_vocab_for_plan(cfg) -> str:
    """The vocabulary size for counting, without building anything."""
    if cfg.model.vocab_size:
        return str(cfg.model.vocab_size)
    from pathlib import Path

    from megatron_evomoe.data.tokenizer import load_tokenizer
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.root) / "tokenizer"
    if tok.exists():
        cfg.model.vocab_size = load_tokenizer(str(tok)).vocab_size
        return f"{cfg.model.vocab_size} (from {tok})"
    cfg.model.vocab_size = 1
    return "unknown until the tokenizer is built (embeddings counted as 1 row)"


def check_stage_templates(cfg) -> None:
    """Resolve every stage's conversation template as a run does (the same ConfigError), loading the
    tokenizer only when a stage renders with its chat_template ('tokenizer'); the bundled dataset is
    built then if the config asks for it, as a run would build it first."""
    from megatron_evomoe.data.conversation_templates import TOKENIZER_TEMPLATE, stage_template, stage_template_field
    names = [stage_template_field(cfg, i)[0] for i in range(len(cfg.stages))]
    tokenizer = None
    if TOKENIZER_TEMPLATE in names:
        from megatron_evomoe.data.prepare import data_root_and_tokenizer
        tokenizer = data_root_and_tokenizer(cfg)[1]
    for i in range(len(cfg.stages)):
        stage_template(cfg, i, tokenizer)


def print_plan(cfg) -> None:
    from megatron_evomoe.config import moe_layer_indices
    from megatron_evomoe.stages.size import count_parameters

    vocab = resolve_vocab_for_plan(cfg)

    print(f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, heads {cfg.model.num_heads} "
          f"(kv {cfg.model.num_kv_heads}), FFN {cfg.model.ffn_hidden_size}, vocab {vocab}")
    print(f"MoE layers: {moe_layer_indices(cfg)}; {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, "
          f"init={cfg.moe.init}, router={cfg.router.type}")
    print(f"parallel: tp={cfg.parallel.tp} pp={cfg.parallel.pp} ep={cfg.parallel.ep}")
    print(f"{'stage':<14}{'moe_mode':<10}{'steps':>7}{'lr':>10}  {'total':>15} {'LLM active/token':>16}"
          f" {'vision':>12}  trainable")
    for stage, row in zip(cfg.stages, count_parameters(cfg)):
        print(f"{stage.name:<14}{stage.moe_mode:<10}{stage.steps:>7}{stage.lr:>10.1e}  {row['total']:>15,}"
              f" {row['llm_active_per_token']:>16,} {row['vision']:>12,}  {', '.join(stage.trainable)}")


def planned_world_size(cfg, world_size: int | None) -> int:
    """--world-size, else $WORLD_SIZE (a dry run inside the launcher), else tp * pp * ep (dp = ep)."""
    import os
    if world_size is not None:
        return world_size
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.ep


def print_memory_plan(cfg, world_size: int | None, gpu_memory_gb: float) -> None:
    """The memory plan per training stage (stages/memory_plan.py) and the verdict against the GPU; a
    plan that does not fit is also a logged warning."""
    from megatron_evomoe.parallel.shard_counts import rank_shard_counts
    from megatron_evomoe.stages.memory_plan import format_plan, plan_memory, verdict
    world = planned_world_size(cfg, world_size)
    p = cfg.parallel
    print(f"memory plan: world size {world} = tp {p.tp} x pp {p.pp} x dp {world // (p.tp * p.pp)} (ep {p.ep}), "
          f"micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}, bf16={cfg.train.bf16}, "
          f"recompute={cfg.train.recompute}, zero1={p.zero1}")
    rows = plan_memory(cfg, world, rank_shard_counts)
    print(format_plan(rows, gpu_memory_gb))
    fits, line = verdict(rows, gpu_memory_gb)
    print(line)
    if not fits:
        logging.warning("%s", line.removeprefix("warning: "))


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            check_stage_templates(cfg)
            print_plan(cfg)
            print_memory_plan(cfg, args.world_size, args.gpu_memory_gb)
            return 0
        from megatron_evomoe.parallel.launch import init_distributed
        from megatron_evomoe.training.trainer import Trainer
        state = init_distributed(cfg)  # a ParallelState of size 1 unless launched by torchrun / SLURM
        if state.rank != 0:
            logging.getLogger().setLevel(logging.WARNING)  # one rank reports; all ranks warn
        error = None
        try:
            Trainer(cfg, state).run()
        except BaseException as e:
            error = e
            raise
        finally:
            if state.world_size > 1:  # (a last heartbeat tells the other ranks why this one stopped)
                from megatron_evomoe.parallel.launch import shutdown_distributed
                shutdown_distributed(error)
    except ConfigError as e:
        return user_error(e, "config error")
    except DistributedFaultError as e:  # another rank died or hung: the message names it and the collective
        print(f"distributed error: {e}", file=sys.stderr)
        return EXIT_CODE_DISTRIBUTED_FAULT
    except TrainingStopped as e:  # a signal: checkpoint saved at a step boundary; rerunning resumes
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_CODE_STOPPED
    except (*USER_ERRORS, NonFiniteError) as e:  # bad data, checkpoints or paths; a non-finite stop
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

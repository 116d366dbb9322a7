#!/usr/bin/env python
"""EvoMoE ablation on the bundled data and the tiny CPU model.

Stages 0 (projector) and I (dense warm-up) run once; every variant continues
from that checkpoint with the same number of steps in stages II and III, the
same seeds and the same active parameters (top-1 of 4 experts = one FFN):

  dense             II: FFN of the MoE-designated layers trains      III: same, still dense
  copy+linear       II: same as dense                                III: copy-upcycled MoE, linear router (MoE-LLaVA)
  copy+dtr          II: same as dense                                III: copy-upcycled MoE, DTR
  evolution+linear  II: FFN1 trains, evolved experts follow it       III: evolved MoE, linear router
  evolution+dtr     II: same as evolution+linear                     III: evolved MoE, DTR (EvoMoE)
  drop+linear       II: same as dense                                III: drop-upcycled MoE (r=0.5), linear router

Stage III trains the MoE blocks (experts + router) in every variant by default
(`--stage3 router` trains the router only, the paper's stage III; with it the
copy variants cannot differ from dense, since identical experts make routing moot).

    python examples/ablation/run_ablation.py --out runs/ablation            # full (< 30 min on 2 cores)
    python examples/ablation/run_ablation.py --out runs/ablation --quick    # smoke run (< 5 min)
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_evomoe.config import load_config  # noqa: E402
from megatron_evomoe.eval.moe_analysis import analyze  # noqa: E402
from megatron_evomoe.training.trainer import Trainer  # noqa: E402

VARIANTS = {
    # name: (stage II mode, moe.init, router.type); None router = stays dense
    "dense": ("dense", "copy", None),
    "copy+linear": ("dense", "copy", "linear"),
    "copy+dtr": ("dense", "copy", "dtr"),
    "evolution+linear": ("evolve", "evolution", "linear"),
    "evolution+dtr": ("evolve", "evolution", "dtr"),
    "drop+linear": ("dense", "drop", "linear"),
}

FULL = {"projector": 150, "warmup": 1200, "stage2": 150, "stage3": 150, "eval": 200}
QUICK = {"projector": 10, "warmup": 30, "stage2": 10, "stage3": 10, "eval": 32}


def shared_stages(steps: dict) -> str:
    return (f"{{name: projector, trainable: ['projector.*', 'vision.*'], data: captions.json, steps: {steps['projector']}, "
            f"conversation_template: plain, lr: 1.0e-3, warmup_steps: 10, eval: false}},"
            f"{{name: warmup, trainable: ['projector.*', 'llm.*', 'vision.*'], steps: {steps['warmup']}, "
            f"lr: 1.0e-3, warmup_steps: 25, eval: false}}")


def variant_stages(name: str, steps: dict, stage3: str) -> str:
    mode2, _, router = VARIANTS[name]
    trainable3 = "llm.layers.{moe}.mlp.router.*" if stage3 == "router" and router else "llm.layers.{moe}.mlp.*"
    return (f"{{name: stage2, trainable: ['llm.layers.{{moe}}.mlp.*'], steps: {steps['stage2']}, lr: 1.0e-3, "
            f"warmup_steps: 5, moe_mode: {mode2}, eval: false}},"
            f"{{name: stage3, trainable: ['{trainable3}'], steps: {steps['stage3']}, lr: 1.0e-3, "
            f"warmup_steps: 5, moe_mode: {'sparse' if router else 'dense'}, eval: false}}")


def make_cfg(args, steps: dict, save_dir: Path, stages: str, *extra: str):
    return load_config(ROOT / "examples/configs/tiny_cpu.yaml", [
        f"--stages=[{stages}]", f"--train.save_dir={save_dir}", "--train.progress_bar=false",
        f"--train.save_interval=0", f"--data.num_eval_samples={steps['eval']}", f"--train.seed={args.seed}",
        "--train.tensorboard=false", *([f"--train.num_threads={args.threads}"] if args.threads else []),
        *([f"--data.root={args.data_root}", "--data.build_if_missing=false"] if args.data_root else []), *extra])


def run_variant(args, steps: dict, name: str, shared_dir: Path) -> dict:
    mode2, init, router = VARIANTS[name]
    save_dir = Path(args.out) / name.replace("+", "_")
    shutil.rmtree(save_dir, ignore_errors=True)
    shutil.copytree(shared_dir / "checkpoints", save_dir / "checkpoints")  # resume after the warm-up
    stages = shared_stages(steps) + "," + variant_stages(name, steps, args.stage3)
    extra = [f"--moe.init={init}", f"--router.type={router or 'linear'}"]
    cfg = make_cfg(args, steps, save_dir, stages, *extra)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    history = trainer.run()
    train_s = time.perf_counter() - t0
    last = [h["lm_loss"] for h in history if "lm_loss" in h][-10:]
    res = analyze(trainer.model, cfg, trainer.data, num_samples=64)
    layers = res["layers"].values()
    mean = lambda key: sum(l[key] for l in layers) / len(layers) if layers else None  # noqa: E731
    js = [l["js_image_text"] for l in layers if l["js_image_text"] is not None]
    return {
        "variant": name, "pope_acc": res["pope"]["accuracy"], "pope_f1": res["pope"]["f1"],
        "train_lm_loss": sum(last) / len(last), "heldout_lm_loss": res["lm_loss"],
        "expert_output_cosine": mean("expert_output_cosine"), "expert_cka": mean("expert_output_cka"),
        "js_image_text": sum(js) / len(js) if js else None,
        "shuffle_f1_drop": res.get("pope_f1_drop_under_shuffle") if layers else None,
        "shuffle_loss_increase": res["lm_loss_increase_under_shuffle"] if layers else None,
        "train_seconds": train_s,
    }


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| variant | POPE acc | POPE F1 | LM loss (train, last 10) | LM loss (held-in eval) | expert out-cos | "
            "expert CKA | JS img/txt | F1 drop, router shuffled | loss rise, router shuffled |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['variant']} | {fmt(r['pope_acc'])} | {fmt(r['pope_f1'])} | {fmt(r['train_lm_loss'], '.4f')} | "
                     f"{fmt(r['heldout_lm_loss'], '.4f')} | {fmt(r['expert_output_cosine'])} | {fmt(r['expert_cka'])} | "
                     f"{fmt(r['js_image_text'])} | {fmt(r['shuffle_f1_drop'], '+.3f')} | "
                     f"{fmt(r['shuffle_loss_increase'], '+.4f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--quick", action="store_true", help="few steps: a smoke run for CI")
    p.add_argument("--stage3", choices=("moe", "router"), default="moe")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data-root", help="dataset folder (default: the config's data.root, built if missing)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the config's train.num_threads)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    steps = QUICK if args.quick else FULL
    out = Path(args.out)
    shared = out / "shared"
    shutil.rmtree(shared, ignore_errors=True)
    t0 = time.perf_counter()
    Trainer(make_cfg(args, steps, shared, shared_stages(steps))).run()
    print(f"shared stages 0+I: {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(args, steps, name, shared))
        print(f"{name}: {json.dumps(rows[-1])}", flush=True)
    md = table(rows)
    total = time.perf_counter() - t0
    header = (f"Ablation ({'quick' if args.quick else 'full'}; steps {steps}; stage III trains "
              f"{'the router only' if args.stage3 == 'router' else 'experts + router'}; seed {args.seed}) on "
              f"{platform.machine()} {platform.processor() or ''}, {date.today()}, {total / 60:.1f} min in all")
    print(header + "\n\n" + md)
    (out / "ablation.md").write_text(header + "\n\n" + md + "\n")
    (out / "ablation.json").write_text(json.dumps({"steps": steps, "stage3": args.stage3, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""EvoMoE ablation study on the bundled data and the tiny CPU model: several seeds, two stage III protocols.

Stages 0 (projector) and I (dense warm-up) run once, with the first seed (they are the study's common
starting point: 1350 of a seed's ~5000 steps); per seed, stage II runs twice (dense: the FFN of the
MoE-designated layers trains; evolve: FFN1 trains and the evolved experts follow it), and every variant's
stage III continues from the stage II it names. Equal active parameters: top-1 of 4 experts = one FFN.

  dense             II: dense     III: still dense, the same FFNs train (one run, both protocols' baseline)
  copy+linear       II: dense     III: copy-upcycled MoE, linear router (MoE-LLaVA's upcycling)
  copy+dtr          II: dense     III: copy-upcycled MoE, DTR
  evolution+linear  II: evolve    III: evolved MoE, linear router
  evolution+dtr     II: evolve    III: evolved MoE, DTR (EvoMoE)
  drop+linear       II: dense     III: drop-upcycled MoE (half of each expert's units re-drawn), linear router
  noise+linear      II: dense     III: copies with Gaussian noise added, linear router

Stage III protocols: `paper` trains the router only, experts frozen (the paper's stage III); `moe_llava`
trains experts and router with top-2 routing and a 0.01 balancing loss (MoE-LLaVA's stage III).

Every run is resumable (checkpoints every `save_interval` steps) and the study restartable: a finished run
leaves `results/<seed>__<protocol>__<variant>.json` and is not redone; a killed one resumes from its last
checkpoint. Held-out LM loss: 256 instruction records split off before training (`<out>/data`).
The tables, paired tests and plots come from `study_report.py` (also runnable alone on `<out>`).

    python examples/ablation/run_ablation.py --out runs/ablation --jobs 2          # full study (~1 h, 2 cores)
    python examples/ablation/run_ablation.py --out runs/ablation --quick --jobs 1  # smoke run for CI
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_evomoe.config import load_config  # noqa: E402
from megatron_evomoe.checkpointing import write_file_atomic  # noqa: E402
from study_report import write_report  # noqa: E402

VARIANTS = {
    # name: (stage II mode, moe.init, router.type); None router = stays dense
    "dense": ("dense", "copy", None),
    "copy+linear": ("dense", "copy", "linear"),
    "copy+dtr": ("dense", "copy", "dtr"),
    "evolution+linear": ("evolve", "evolution", "linear"),
    "evolution+dtr": ("evolve", "evolution", "dtr"),
    "drop+linear": ("dense", "drop", "linear"),
    "noise+linear": ("dense", "noise", "linear"),
}
PROTOCOLS = ("paper", "moe_llava")
# stage II: 700 steps is where the evolved experts' distance from FFN1 reaches 95% of its final value
# (RESULTS.md, "How long stage II must be"); stage III: 200, its training loss (logged every 25 steps)
# shows no downward trend after the first 50; that length was not varied
FULL = {"projector": 150, "warmup": 1200, "stage2": 700, "stage3": 200, "eval": 632, "heldout": 256}
QUICK = {"projector": 10, "warmup": 20, "stage2": 10, "stage3": 10, "eval": 16, "heldout": 16}
FIRST_SEED = 42


class Run(NamedTuple):
    """One training run of the study: `kind` shared (stages 0+I), stage2_<mode>, or stage3."""
    kind: str
    seed: int
    variant: str = ""
    protocol: str = ""  # "" for the dense variant, whose stage III does not depend on it

    @property
    def name(self) -> str:
        return "__".join(x for x in (f"seed{self.seed}", self.kind, self.protocol, self.variant.replace("+", "_")) if x)

    @property
    def parent(self) -> "Run | None":
        if self.kind == "shared":
            return None
        if self.kind.startswith("stage2_"):
            return Run("shared", FIRST_SEED)
        return Run(f"stage2_{VARIANTS[self.variant][0]}", self.seed)


def study_runs(seeds: list[int], variants: list[str], protocols: list[str]) -> list[Run]:
    """Every run, each after the run it continues from."""
    runs = [Run("shared", FIRST_SEED)]
    modes = sorted({VARIANTS[v][0] for v in variants})
    runs += [Run(f"stage2_{m}", s) for s in seeds for m in modes]
    for s in seeds:
        for v in variants:
            runs += [Run("stage3", s, v)] if VARIANTS[v][2] is None else [Run("stage3", s, v, p) for p in protocols]
    return runs


# ------------------------------------------------------------------------------------------ stages
def stage_list(run: Run, steps: dict) -> str:
    """Stages 0+I for the shared run; stage II, then III, for the others (which start from the shared
    run's weights through train.init_from: a resume would also continue its data stream and seed)."""
    warm = lambda n, key: min(n, steps[key] // 2)  # noqa: E731  (LR warm-up steps; quick stages are short)
    if run.kind == "shared":
        return (f"{{name: projector, trainable: ['projector.*', 'vision.*'], data: captions.json, "
                f"steps: {steps['projector']}, conversation_template: plain, lr: 1.0e-3, "
                f"warmup_steps: {warm(10, 'projector')}, eval: false}},"
                f"{{name: warmup, trainable: ['projector.*', 'llm.*', 'vision.*'], data: instruct_train.json, "
                f"steps: {steps['warmup']}, lr: 1.0e-3, warmup_steps: {warm(25, 'warmup')}, eval: false}}")
    mode = run.kind.removeprefix("stage2_") if run.kind != "stage3" else VARIANTS[run.variant][0]
    stages = [f"{{name: stage2, trainable: ['llm.layers.{{moe}}.mlp.*'], data: instruct_train.json, "
              f"steps: {steps['stage2']}, lr: 1.0e-3, warmup_steps: {warm(25, 'stage2')}, moe_mode: {mode}, "
              "eval: false}"]
    if run.kind == "stage3":
        sparse = VARIANTS[run.variant][2] is not None
        trainable = "llm.layers.{moe}.mlp.router.*" if run.protocol == "paper" else "llm.layers.{moe}.mlp.*"
        stages.append(f"{{name: stage3, trainable: ['{trainable}'], data: instruct_train.json, "
                      f"steps: {steps['stage3']}, lr: 1.0e-3, warmup_steps: {warm(10, 'stage3')}, "
                      f"moe_mode: {'sparse' if sparse else 'dense'}, eval: false}}")
    return ",".join(stages)


def run_overrides(run: Run) -> list[str]:
    _, init, router = VARIANTS.get(run.variant, ("", "copy", None))
    out = [f"--moe.init={'evolution' if run.kind == 'stage2_evolve' else init}", f"--router.type={router or 'linear'}"]
    if run.protocol == "moe_llava":
        out += ["--moe.top_k=2", "--moe.aux_loss_coeff=0.01", "--moe.load_balancing=aux"]
    return out


def make_cfg(args, steps: dict, run: Run):
    return load_config(ROOT / "examples/configs/tiny_cpu.yaml", [
        f"--stages=[{stage_list(run, steps)}]", f"--train.save_dir={Path(args.out) / 'runs' / run.name}",
        "--train.progress_bar=false", f"--train.save_interval={steps['save_interval']}",
        f"--data.num_eval_samples={steps['eval']}", f"--train.seed={run.seed}", "--train.tensorboard=false",
        f"--train.num_threads={args.threads}", f"--data.root={Path(args.out) / 'data'}",
        "--data.build_if_missing=false", *run_overrides(run),
        *([] if run.kind == "shared" else [f"--train.init_from={Path(args.out) / 'runs' / Run('shared', FIRST_SEED).name}"])])


# --------------------------------------------------------------------------------------------- data
def split_data(source: Path, dest: Path, num_heldout: int) -> None:
    """`dest`: the source dataset's files linked, and its instruction records split (a fixed seed, the
    same for every seed of the study) into instruct_train.json and instruct_heldout.json."""
    if (dest / "instruct_heldout.json").exists():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in source.iterdir():
        if not entry.name.startswith("."):
            os.symlink(entry.resolve(), tmp / entry.name)
    records = json.loads((source / "instruct.json").read_text())
    if len(records) <= num_heldout:
        raise ValueError(f"{source / 'instruct.json'}: {len(records)} records; the held-out split needs more "
                         f"than {num_heldout}")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    held = set(order[:num_heldout])
    (tmp / "instruct_train.json").write_text(json.dumps([r for i, r in enumerate(records) if i not in held]))
    (tmp / "instruct_heldout.json").write_text(json.dumps([r for i, r in enumerate(records) if i in held]))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# --------------------------------------------------------------------------------------------- runs
def result_path(out: Path, run: Run) -> Path:
    return out / "results" / f"{run.name}.json"


def is_done(out: Path, run: Run) -> bool:
    return result_path(out, run).exists()


def execute(args, steps: dict, run: Run) -> str:
    """Train `run` (resuming its own checkpoints; else stage III from its stage II's), analyse a stage III run,
    and write its result file last: the study's record that the run is finished."""
    from megatron_evomoe.training.trainer import Trainer
    out = Path(args.out)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = make_cfg(args, steps, run)
    save_dir = Path(cfg.train.save_dir)
    if run.kind == "stage3" and not (save_dir / "checkpoints").exists():
        tmp = save_dir / "checkpoints.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out / "runs" / run.parent.name / "checkpoints", tmp)  # resume after the parent's stages
        tmp.rename(save_dir / "checkpoints")
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    history = trainer.run()
    result = {"run": run.name, "seed": run.seed, "variant": run.variant, "protocol": run.protocol,
              "train_seconds": time.perf_counter() - t0}
    if run.kind == "stage3":
        result.update(measure(trainer, cfg, history, steps))
    write_file_atomic(result_path(out, run), json.dumps(result))
    return run.name


def measure(trainer, cfg, history: list[dict], steps: dict) -> dict:
    from megatron_evomoe.eval.moe_analysis import analyze
    res = analyze(trainer.model, cfg, trainer.data, num_samples=steps["heldout"], lm_file="instruct_heldout.json")
    layers = list(res["layers"].values())
    mean = lambda key: sum(l[key] for l in layers) / len(layers) if layers else None  # noqa: E731
    js = [l["js_image_text"] for l in layers if l["js_image_text"] is not None]
    last = [h["lm_loss"] for h in history if "lm_loss" in h][-10:]
    return {
        "pope_acc": res["pope"]["accuracy"], "pope_f1": res["pope"]["f1"], "pope_correct": res["pope"]["correct"],
        "blind_acc": res["pope"]["blind_accuracy"], "train_lm_loss": sum(last) / len(last) if last else None,
        "heldout_lm_loss": res["lm_loss"],
        "expert_output_cosine": mean("expert_output_cosine"), "expert_cka": mean("expert_output_cka"),
        "js_image_text": sum(js) / len(js) if js else None,
        "shuffle_f1_drop": res["pope_f1_drop_under_shuffle"] if layers else None,
        "shuffle_loss_increase": res["lm_loss_increase_under_shuffle"] if layers else None,
    }


def schedule(args, steps: dict, runs: list[Run]) -> None:
    """Run everything not yet done, up to `args.jobs` at once, each once its parent is done."""
    out = Path(args.out)
    todo = [r for r in runs if not is_done(out, r)]
    if args.jobs == 1:
        for r in todo:
            print(f"{time.strftime('%H:%M:%S')} done {execute(args, steps, r)}", flush=True)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per run: no torch state shared by fork
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        running: dict[cf.Future, Run] = {}
        while todo or running:
            for r in [r for r in todo if r.parent is None or is_done(out, r.parent)][: args.jobs - len(running)]:
                todo.remove(r)
                running[pool.submit(execute, args, steps, r)] = r
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                del running[f]
                print(f"{time.strftime('%H:%M:%S')} done {f.result()}", flush=True)  # (a failed run stops the study)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--quick", action="store_true", help="2 seeds, few steps: a smoke run for CI")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds, {FIRST_SEED} upwards (default 5; "
                   "quick: 2)")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each by default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--data-root", help="dataset folder (default: the config's data.root, built if missing)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if "copy+linear" not in variants:
        raise SystemExit("--variants: copy+linear (the baseline of every paired test) is needed")
    if args.jobs < 1:
        raise SystemExit("--jobs: must be >= 1")
    steps = dict(QUICK if args.quick else FULL)
    steps["save_interval"] = 5 if args.quick else 100
    seeds = [FIRST_SEED + i for i in range(args.seeds or (2 if args.quick else 5))]
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    out = Path(args.out)
    source = Path(args.data_root) if args.data_root else prepare_source()
    split_data(source, out / "data", steps["heldout"])
    (out / "results").mkdir(exist_ok=True)
    meta = {"steps": steps, "seeds": seeds, "protocols": protocols, "variants": variants}
    write_file_atomic(out / "study_meta.json", json.dumps(meta))  # (study_report.py alone reads it)
    t0 = time.perf_counter()
    schedule(args, steps, study_runs(seeds, variants, protocols))
    print(f"runs finished in {(time.perf_counter() - t0) / 60:.1f} min (this invocation)", flush=True)
    print(write_report(out, meta))
    return 0


def prepare_source() -> Path:
    """The config's bundled dataset, built if missing."""
    from megatron_evomoe.training.data_setup import prepare_data
    return prepare_data(load_config(ROOT / "examples/configs/tiny_cpu.yaml")).root


if __name__ == "__main__":
    sys.exit(main())

"""Launch the tiny demo training (1 process, or 2 under torchrun or started by hand, in any of the
2-process layouts), with or without an injected fault, and compare a run with a reference of the
same layout: losses and grad norms of every step, and the final parameters (the job's one
checkpoint), bit for bit. Shared by the CI tests and by fault_campaign.py (the long version)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.parallel.state import RankLayout
from tests.training.tiny_config import STAGES, TINY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NUM_STEPS = 11  # global steps: projector 1-2, warmup 3-5, evolution 6-8, router 9-11; save_interval=2
GLOBAL_BATCH = 4  # samples per optimizer step in every layout: TINY's micro-batch of one process


@dataclass(frozen=True)
class Layout:
    """A process count and parallel sizes, and the flags that run the tiny recipe in it."""
    nproc: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def ranks(self) -> RankLayout:
        return RankLayout(self.nproc, self.tp, self.pp, self.ep)

    def flags(self) -> list[str]:
        # the global batch stays GLOBAL_BATCH so that every layout trains on the same data:
        # DP ranks split it; PP runs it as 2 micro-batches (under PP the step's micro-batches are the
        # pipeline's), so that 1F1B has one in flight per stage
        accum = 2 if self.pp > 1 else 1
        out = [f"--parallel.{k}={v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep)) if v > 1]
        # (TINY's train.global_batch_size is GLOBAL_BATCH: the accumulation follows from the micro-batch)
        micro = GLOBAL_BATCH // (self.ranks.dp * accum)
        return out + ([f"--train.micro_batch_size={micro}"] if micro != GLOBAL_BATCH else [])


# tiny recipe: 4 heads (2 KV), FFN 48, 2 layers, 4 experts: tp=2, pp=2 and ep=2 all fit (a test checks it)
LAYOUTS = {"single": Layout(1), "dp2": Layout(2), "tp2": Layout(2, tp=2), "pp2": Layout(2, pp=2),
           "ep2": Layout(2, ep=2)}
PARALLEL_LAYOUTS = ("dp2", "tp2", "pp2", "ep2")


def train_args(save_dir, data_root, layout: str = "single", extra=()) -> list[str]:
    return [*TINY, STAGES, f"--data.root={data_root}", f"--train.save_dir={save_dir}", "--train.num_threads=1",
            *LAYOUTS[layout].flags(), *extra]


def command(save_dir, data_root, layout: str = "single", fault=None, max_restarts: int = 0, extra=()) -> list[str]:
    """The command line (torchrun for 2 processes); `fault`: (mode, n) for fault_launcher.py (its
    env vars pick action/rank)."""
    args = train_args(save_dir, data_root, layout, extra)
    script = [str(HERE / "fault_launcher.py"), *fault, "--"] if fault else [str(ROOT / "pretrain_evomoe.py")]
    nproc = LAYOUTS[layout].nproc
    if nproc == 1:
        return [sys.executable, *script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.2", *script, *args]


def fault_env(action: str = "kill", rank: int | None = None, once=None) -> dict:
    env = {"EVOMOE_FAULT_ACTION": action}
    if rank is not None:
        env["EVOMOE_FAULT_RANK"] = str(rank)
    if once is not None:
        env["EVOMOE_FAULT_ONCE"] = str(once)
    return env


def run(cmd, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(save_dir, data_root, fault, fault_vars: dict, layout: str = "dp2", extra=()) -> list[subprocess.Popen]:
    """The ranks started by hand (as SLURM's srun would), without torchrun: nothing tears the
    survivors down when one dies, so what they do about it is what the test sees. Rank 0 hosts
    the rendezvous store. stdout/stderr go to <save_dir>.rank<r>.log."""
    port, world = free_port(), LAYOUTS[layout].nproc
    cmd = [sys.executable, str(HERE / "fault_launcher.py"), *fault, "--",
           *train_args(save_dir, data_root, layout, extra)]
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **fault_vars}
        log = open(f"{save_dir}.rank{r}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
        log.close()
    return procs


def step_records(save_dir) -> tuple[dict, dict, int]:
    """What metrics.jsonl logged per global step (a resumed run logs re-done steps again): step ->
    [(loss, grad norm)], step -> [stage-end POPE scores], and the number of lines that are not JSON
    (a process killed in the middle of appending one)."""
    train, evals, bad = {}, {}, 0
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if "train/loss" in rec:
            train.setdefault(rec["step"], []).append((rec["train/loss"], rec["train/grad_norm"]))
        scores = {k: v for k, v in rec.items() if k.startswith("eval/")}
        if scores:
            evals.setdefault(rec["step"], []).append(scores)
    return train, evals, bad


def final_model(save_dir) -> dict:
    """The full model of the run's latest checkpoint (one per job, in every layout)."""
    return ckpt.load_checkpoint(ckpt.find_latest(save_dir))["model"]


def check_latest_loadable(save_dir) -> list[str]:
    """After a kill: the latest checkpoint (if any) is complete and loads."""
    latest = ckpt.find_latest(save_dir)
    if latest is None:
        return []
    try:
        ckpt.load_checkpoint(latest)
    except ckpt.CheckpointError as e:
        return [f"{save_dir}: latest checkpoint does not load: {e}"]
    return []


def compare(reference, got) -> list[str]:
    """Differences between a run and the reference: [] when every logged step (also the steps a
    resumed run did twice), every stage-end evaluation and the final parameters are bitwise equal."""
    (ref, ref_evals, _), (runs, evals, bad) = step_records(reference), step_records(got)
    problems = [f"{bad} unreadable line(s) in metrics.jsonl"] if bad else []
    if sorted(runs) != list(range(1, NUM_STEPS + 1)):
        problems.append(f"logged steps {sorted(runs)}")
    if sorted(evals) != sorted(ref_evals):
        problems.append(f"evaluations logged at steps {sorted(evals)}, the reference's at {sorted(ref_evals)}")
    for what, logged, want in (("(loss, grad norm)", runs, ref), ("POPE scores", evals, ref_evals)):
        for step, records in sorted(logged.items()):
            for rec in records:
                if step in want and rec != want[step][0]:
                    problems.append(f"step {step}: {what} {rec} vs {want[step][0]}")
    a, b = final_model(reference), final_model(got)
    if a.keys() != b.keys():
        problems.append("other parameter names")
    else:
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        if differ:
            problems.append(f"{len(differ)} tensors differ, e.g. {differ[0]}")
    return problems


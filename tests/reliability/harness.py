"""Launch the tiny demo training (1 process, or 2 under torchrun or started by hand), with or
without an injected fault, and compare a run with a reference: losses and grad norms of every
step, and the final parameters of every rank, bit for bit. Shared by the CI tests and by
fault_campaign.py (the long version)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from megatron_evomoe import checkpointing as ckpt
from tests.training.tiny_config import STAGES, TINY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NUM_STEPS = 11  # global steps: projector 1-2, warmup 3-5, evolution 6-8, router 9-11; save_interval=2
LAYOUT_DP2 = "tp1-pp1-ep1-dp2"


def train_args(save_dir, data_root, nproc: int = 1, extra=()) -> list[str]:
    # DP=2 halves the micro-batch so that the global batch stays the one-process one
    per_rank = ["--train.micro_batch_size=2"] if nproc == 2 else []
    return [*TINY, STAGES, f"--data.root={data_root}", f"--train.save_dir={save_dir}", "--train.num_threads=1",
            *per_rank, *extra]


def command(save_dir, data_root, nproc: int = 1, fault=None, max_restarts: int = 0, extra=()) -> list[str]:
    """The command line; `fault`: (mode, n) for fault_launcher.py (its env vars pick action/rank)."""
    args = train_args(save_dir, data_root, nproc, extra)
    script = [str(HERE / "fault_launcher.py"), *fault, "--"] if fault else [str(ROOT / "pretrain_evomoe.py")]
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


def start_ranks(save_dir, data_root, fault, fault_vars: dict, world: int = 2, extra=()) -> list[subprocess.Popen]:
    """The ranks started by hand (as SLURM's srun would), without torchrun: nothing tears the
    survivors down when one dies, so what they do about it is what the test sees. Rank 0 hosts
    the rendezvous store. stdout/stderr go to <save_dir>.rank<r>.log."""
    port = free_port()
    cmd = [sys.executable, str(HERE / "fault_launcher.py"), *fault, "--",
           *train_args(save_dir, data_root, world, extra)]
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **fault_vars}
        log = open(f"{save_dir}.rank{r}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
        log.close()
    return procs


def rank_dirs(save_dir, nproc: int) -> list[Path]:
    save_dir = Path(save_dir)
    if nproc == 1:
        return [save_dir]
    return [save_dir / "ranks" / LAYOUT_DP2 / f"{r:05d}" for r in range(nproc)]


def step_records(save_dir) -> tuple[dict, int]:
    """global step -> [(loss, grad norm)] as logged (a resumed run logs re-done steps again), and
    the number of lines that are not JSON (a process killed in the middle of appending one)."""
    out, bad = {}, 0
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if "train/loss" in rec:
            out.setdefault(rec["step"], []).append((rec["train/loss"], rec["train/grad_norm"]))
    return out, bad


def final_models(save_dir, nproc: int) -> list[dict]:
    return [ckpt.load_checkpoint(ckpt.find_latest(d))["model"] for d in rank_dirs(save_dir, nproc)]


def check_latest_loadable(save_dir, nproc: int) -> list[str]:
    """After a kill: on every rank the latest checkpoint (if any) is complete and loads."""
    problems = []
    for d in rank_dirs(save_dir, nproc):
        latest = ckpt.find_latest(d)
        if latest is None:
            continue
        try:
            ckpt.load_checkpoint(latest)
        except ckpt.CheckpointError as e:
            problems.append(f"{d}: latest checkpoint does not load: {e}")
    return problems


def compare(reference, got, nproc: int) -> list[str]:
    """Differences between a run and the reference: [] when every logged step (also the steps a
    resumed run did twice) and every rank's final parameters are bitwise equal."""
    (ref, _), (runs, bad) = step_records(reference), step_records(got)
    problems = [f"{bad} unreadable line(s) in metrics.jsonl"] if bad else []
    if sorted(runs) != list(range(1, NUM_STEPS + 1)):
        problems.append(f"logged steps {sorted(runs)}")
    for step, records in sorted(runs.items()):
        for rec in records:
            if step in ref and rec != ref[step][0]:
                problems.append(f"step {step}: (loss, grad norm) {rec} vs {ref[step][0]}")
    for r, (a, b) in enumerate(zip(final_models(reference, nproc), final_models(got, nproc))):
        if a.keys() != b.keys():
            problems.append(f"rank {r}: other parameter names")
            continue
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        if differ:
            problems.append(f"rank {r}: {len(differ)} tensors differ, e.g. {differ[0]}")
    return problems


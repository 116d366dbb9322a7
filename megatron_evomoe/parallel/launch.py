"""Process-group initialisation from torchrun or SLURM environments.

    state = init_distributed(cfg)     # ParallelState.single(cfg) for a plain one-process run

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Under SLURM without
torchrun (one task per GPU, `srun python pretrain_evomoe.py ...`) the same values come from
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host of SLURM_JOB_NODELIST (the
examples/slurm scripts use srun + torchrun, so torchrun's variables win when both exist).
Backend: `parallel.backend=auto` is NCCL when CUDA is available, gloo otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError, check_global_batches, stage_global_batch
from .pending_collectives import cuda_completion
from .state import ParallelState, validate_parallel
from .watchdog import collective, short_cause, start_watchdog, stop_watchdog

log = logging.getLogger("megatron_evomoe")

DEFAULT_PORT = 29500


@dataclass
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | single


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (no scontrol needed)."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def launch_info(environ=None) -> LaunchInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          addr, int(env.get("MASTER_PORT", DEFAULT_PORT)), "slurm")
    return LaunchInfo(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "single")


def resolve_backend(requested: str, cuda_available: bool | None = None) -> str:
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise ConfigError("parallel.backend: 'nccl' needs CUDA devices; use gloo (or auto) on CPUs")
    return requested


def init_distributed(cfg, environ=None) -> ParallelState:
    """Initialise torch.distributed from the environment and build the ParallelState.

    A one-process run gets `ParallelState.single` (trivial groups; torch.distributed untouched).
    Validates the layout against the world size first (ConfigError naming the field).
    """
    info = launch_info(environ)
    validate_parallel(cfg, info.world_size)
    if info.world_size == 1:
        return ParallelState.single(cfg)
    backend = resolve_backend(cfg.parallel.backend)
    completion, handling = None, ""  # gloo: a failed collective raises inside its region
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
        handling = f" ({set_nccl_error_handling()})"
        # NCCL returns at once: the watchdog follows each region's collectives by a CUDA event
        completion = cuda_completion(torch.device("cuda", info.local_rank))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        # a dead or stuck peer makes collectives fail after parallel.timeout_s instead of waiting forever
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout,
                                store=restart_safe_store(timeout))
        # heartbeats on the rendezvous store, so that such a failure names the rank at fault
        start_watchdog(info.rank, info.world_size, cfg.parallel.timeout_s, os.environ["MASTER_ADDR"],
                       int(os.environ["MASTER_PORT"]), completion=completion)
    state = ParallelState.build(cfg, info.rank, info.world_size)
    log.info("distributed: %s backend%s, launched by %s; %s", backend, handling, info.source, state.describe())
    return state


NCCL_ERROR_HANDLING_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")  # new, old name


def set_nccl_error_handling(environ=None) -> str:
    """TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (SkipCleanUp) unless the user set it (either name); read by
    ProcessGroupNCCL when the group is created, so this comes before init_process_group.

    Why 3: the watchdog reports a collective pending at 0.8 x parallel.timeout_s and exits; NCCL's
    own watchdog is the backstop at the timeout and must end the process too. 3 kills it without
    ncclCommAbort, which can itself hang; 1 (TearDown) aborts first; 2 (CleanUpOnly) aborts and lets
    the process run on with undefined buffers until its next collective; 0 only logs, and a hung rank
    would wait forever if the heartbeat thread cannot run. (3 has been torch's default since 2.2,
    pytorch/pytorch#110723; 1 before: set, so the choice does not depend on the release and the start-up
    log shows it.) TORCH_NCCL_BLOCKING_WAIT stays unset: it
    would make every wait() spin on the host and lose the overlap of communication and compute."""
    env = os.environ if environ is None else environ
    user = next((f"{k}={env[k]}" for k in NCCL_ERROR_HANDLING_VARS if k in env), None)
    if user is None:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
        return "TORCH_NCCL_ASYNC_ERROR_HANDLING=3"
    if user.endswith(("=0", "=2")):
        log.warning("%s: NCCL's watchdog will not end this process on a timeout; the heartbeat watchdog "
                    "still does at 0.8 x parallel.timeout_s", user)
    return user


def restart_safe_store(timeout: timedelta, environ=None):
    """The store for init_process_group: None (its env:// default) unless torchrun's agent hosts it.

    torchrun (c10d rendezvous) keeps one TCPStore for the whole job, across the restarts of
    --max-restarts, and the process group's keys carry no attempt number: after a restart, gloo
    read the previous attempt's peer addresses and failed to connect ("connectFullMesh ...
    Connection refused"; pytorch/pytorch#135712). Each attempt gets its own key prefix. (All the
    workers of a torchrun job restart together, so they agree on TORCHELASTIC_RESTART_COUNT.)"""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"evomoe/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@contextlib.contextmanager
def rank0_first(state: ParallelState):
    """Rank 0 runs the body first (e.g. builds the dataset), the others after it finished."""
    multi = state.world_size > 1
    if multi and state.rank != 0:
        with collective("barrier (rank 0 prepares the data first)"):
            dist.barrier()
    try:
        yield
    finally:
        if multi and state.rank == 0:
            with collective("barrier (rank 0 prepares the data first)"):
                dist.barrier()


def shutdown_distributed(error: BaseException | None = None) -> None:
    """Leave a last heartbeat saying why this rank stops (peers blocked in a collective then report
    it), then destroy the process group."""
    stop_watchdog("finished" if error is None else f"{type(error).__name__}: {short_cause(error)}")
    if dist.is_initialized():
        dist.destroy_process_group()


def plan(cfg, world_size: int) -> str:
    """The layout a launch would get: sizes, the rank table (first 64 ranks), what each group does."""
    layout = validate_parallel(cfg, world_size)
    from .state import layout_table
    p = cfg.parallel
    lines = [f"world {world_size}: tp={layout.tp} pp={layout.pp} dp={layout.dp} ep={layout.ep} "
             f"expert-dp={layout.edp} sequence_parallel={str(bool(p.sequence_parallel and layout.tp > 1)).lower()}",
             "global batch per optimizer step = micro_batch_size x dp x accumulation:"]
    accumulation = check_global_batches(cfg, layout.dp)
    for stage in cfg.stages:
        lines.append(f"  stage {stage.name}: {stage_global_batch(cfg, stage)} samples = {cfg.train.micro_batch_size} "
                     f"x {layout.dp} x {accumulation[stage.name]}")
    table = layout_table(layout).splitlines()
    lines += table[:66] + ([f"... ({world_size - 64} more ranks)"] if world_size > 64 else [])
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m megatron_evomoe.parallel.launch --world-size N [--config F] [--section.field=v ...]:
    validate the parallel layout for N processes and print it (used by the SLURM dry runs)."""
    import sys

    from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
    from ..config import load_config
    parser = ArgumentParser(prog="python -m megatron_evomoe.parallel.launch", description=main.__doc__)
    parser.add_argument("--world-size", type=int_at_least(1), required=True)
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, [o for o in overrides if o.startswith("--") and "=" in o])
        print(plan(cfg, args.world_size))
    except ConfigError as e:
        return user_error(e, "config error")
    except USER_ERRORS as e:
        return user_error(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

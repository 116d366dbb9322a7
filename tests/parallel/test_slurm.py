"""SLURM launch scripts: syntax, and the dry run under a faked SLURM environment (nothing launched)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_evomoe.parallel.launch import expand_nodelist, launch_info

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = ["launch.sh", "train_single_node.sbatch", "train_multi_node.sbatch"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


def _fake_env(tmp_path, nodes, with_scontrol=True, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if with_scontrol:  # a stand-in for `scontrol show hostnames LIST`
        (bindir / "scontrol").write_text("#!/bin/sh\n" + "".join(f"echo {h}\n" for h in expand_nodelist(nodes[1])))
        (bindir / "scontrol").chmod(0o755)
    env.update(PATH=f"{bindir}:{env['PATH']}", PYTHON=sys.executable, SLURM_JOB_NODELIST=nodes[1],
               SLURM_JOB_NUM_NODES=str(nodes[0]), SLURM_JOB_ID="4242", PYTHONPATH=str(ROOT), **extra)
    return env


def _dry(script, env, *args):
    return subprocess.run(["bash", str(SLURM / script), "--dry-run", "--config",
                           "examples/configs/tiny_cpu.yaml", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_multi_node_dry_run_prints_layout_and_exact_command(tmp_path):
    env = _fake_env(tmp_path, (2, "gpu[07-08]"), SLURM_GPUS_ON_NODE="8")
    # dp 4 x tiny_cpu's micro-batch 32: the global batch is set to a multiple of 128
    out = _dry("train_multi_node.sbatch", env, "--parallel.tp=2", "--parallel.pp=2", "--parallel.ep=2",
               "--train.global_batch_size=128")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "world size: 16" in text and "rendezvous: gpu07:29500 (job 4242)" in text
    assert "world 16: tp=2 pp=2 dp=4 ep=2 expert-dp=2" in text
    assert "  stage projector: 128 samples = 32 x 4 x 1" in text  # the global batch and its accumulation
    assert "|   15 |  1 |  3 |  1 |  1 |   1 |" in text  # the last rank of the table
    cmd = next(line for line in text.splitlines() if line.startswith("command:"))
    for piece in ("srun --nodes=2 --ntasks=2 --ntasks-per-node=1", "torchrun --nnodes=2 --nproc_per_node=8",
                  "--rdzv_backend=c10d --rdzv_endpoint=gpu07:29500 --rdzv_id=4242",
                  "pretrain_evomoe.py --config examples/configs/tiny_cpu.yaml --parallel.tp=2"):
        assert piece in cmd, (piece, cmd)
    assert "dry run: nothing launched" in text and "--dry-run" not in cmd


def test_single_node_dry_run_without_scontrol(tmp_path):
    env = _fake_env(tmp_path, (1, "node3"), with_scontrol=False, GPUS_PER_NODE="4", DRY_RUN="1")
    out = subprocess.run(["bash", str(SLURM / "train_single_node.sbatch"), "--config",
                          "examples/configs/tiny_cpu.yaml", "--parallel.tp=2", "--train.global_batch_size=64"],
                         cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rendezvous: node3:29500" in out.stdout and "world 4: tp=2 pp=1 dp=2" in out.stdout
    assert "--nproc_per_node=4" in out.stdout


def test_dry_run_rejects_an_impossible_layout(tmp_path):
    env = _fake_env(tmp_path, (1, "node1"), GPUS_PER_NODE="6")
    out = _dry("train_single_node.sbatch", env, "--parallel.tp=4")
    assert out.returncode != 0
    assert "parallel.tp: tp * pp = 4 * 1 = 4 does not divide the world size 6" in out.stderr
    assert "command:" not in out.stdout


def test_launch_info_from_torchrun_and_slurm_env():
    assert launch_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1",
                        "MASTER_PORT": "1234"}).__dict__ == dict(rank=3, world_size=8, local_rank=1,
                                                                  master_addr="h1", master_port=1234,
                                                                  source="torchrun")
    info = launch_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                        "SLURM_JOB_NODELIST": "gpu[01-02]", "PATH": ""})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.source) == (5, 16, 5, "gpu01",
                                                                                             "slurm")
    assert launch_info({}).source == "single"
    assert expand_nodelist("a[1-3,10],b07,c[08-09]") == ["a1", "a2", "a3", "a10", "b07", "c08", "c09"]

"""SIGTERM, SIGINT and the SLURM pre-emption signal (`train.exit_signal`): the run stops at the next step
boundary on every rank, saves a checkpoint of every completed step, exits with code 75, and the same
command resumes it bit-identically (every logged step's loss and grad norm, the final parameters).

The signal is sent by the process to itself at a chosen moment (fault_launcher.py's term/int/usr1
actions), so each case is exact: mid-step, mid-save, mid-evaluation, between stages."""
import json
import signal

import pytest

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import ConfigError
from megatron_evomoe.training.stop_request import EXIT_CODE_STOPPED, StopRequest, signal_number
from tests.reliability import harness

# the warm-up stage evaluates too, so that a signal can arrive during an evaluation that a stage follows
EXTRA = ("--stages.warmup.eval=true", "--train.exit_signal=SIGUSR1")


def _latest_step(rank_dir) -> int:
    return json.loads((ckpt.find_latest(rank_dir) / "meta.json").read_text())["global_step"]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference_signals")
    r = harness.run(harness.command(save, data_root, extra=EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    return save


# global steps: projector 1-2, warm-up 3-5 (then its evaluation), evolution 6-8, router 9-11; checkpoints
# at steps 2, 4, 5, 7, 8, 10, 11. (when, n, signal, global step of the newest checkpoint after the stop)
# (each of the three signals at least once; the DP=2 case below is mid-step too)
CASES = [
    pytest.param("step", "6", "term", 6, id="sigterm-mid-step"),  # (no interval checkpoint at 6: the stop saves it)
    pytest.param("save", "3", "usr1", 5, id="exit-signal-mid-save"),  # the warm-up's stage-end file
    pytest.param("eval", "1", "int", 5, id="sigint-mid-evaluation"),  # stops before evolution's 1st step
    pytest.param("stage", "1", "term", 2, id="sigterm-between-stages"),
]


@pytest.mark.parametrize("when,n,action,saved_step", CASES)
def test_signal_stops_with_a_checkpoint_and_resumes_bit_identically(reference, data_root, tmp_path, when, n,
                                                                    action, saved_step):
    save, once = tmp_path / "run", tmp_path / "fired"
    cmd = harness.command(save, data_root, fault=(when, n), extra=EXTRA)
    stopped = harness.run(cmd, harness.fault_env(action, once=once))
    name = {"term": "SIGTERM", "int": "SIGINT", "usr1": "SIGUSR1"}[action]
    assert stopped.returncode == EXIT_CODE_STOPPED, stopped.stderr[-3000:]
    assert f"stopped: stopped by {name} at stage" in stopped.stderr, stopped.stderr[-3000:]
    assert _latest_step(save) == saved_step  # every completed step is in the checkpoint: none lost
    resumed = harness.run(cmd, harness.fault_env(action, once=once))  # (the marker: no signal this time)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert harness.compare(reference, save) == []


@pytest.fixture(scope="module")
def reference_dp2(data_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference_signals_dp2")
    r = harness.run(harness.command(save, data_root, "dp2", extra=EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    return save


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(reference_dp2, data_root, tmp_path):
    save, once = tmp_path / "run", tmp_path / "fired"
    cmd = harness.command(save, data_root, "dp2", fault=("step", "4"), extra=EXTRA)
    stopped = harness.run(cmd, harness.fault_env("term", rank=1, once=once))
    assert stopped.returncode != 0
    assert "stopped: stopped by SIGTERM at stage 'warmup' step 3" in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped: stopped by a stop request on another rank at stage 'warmup' step 3" in stopped.stderr
    assert _latest_step(save) == 4  # (one checkpoint, written by both ranks)
    resumed = harness.run(cmd, harness.fault_env("term", rank=1, once=once))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert harness.compare(reference_dp2, save) == []


def test_signal_names_and_numbers():
    assert signal_number("SIGUSR1") == signal_number("usr1") == signal_number(str(int(signal.SIGUSR1)))
    with pytest.raises(ConfigError, match="train.exit_signal: 'SIGNOPE'"):
        signal_number("SIGNOPE")


def test_handlers_are_restored_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest("SIGUSR1")
    stop.install()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested and stop.describe() == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_launch_script_forwards_the_preemption_signal_and_requeues(tmp_path):
    """SLURM's USR1 to the batch shell (launch.sh): SIGTERM to srun (here a stand-in that exits 75 on it, as
    the trainer does after its checkpoint), then `scontrol requeue <job>`; the script exits with srun's code."""
    import os
    import subprocess
    import sys
    import time
    bindir, logs = tmp_path / "bin", tmp_path / "logs"
    bindir.mkdir()
    logs.mkdir()
    (bindir / "srun").write_text(f"#!/bin/bash\ntrap 'echo TERM >> {logs}/srun; exit 75' TERM\n"
                                 f"echo started > {logs}/started\nwhile true; do sleep 0.1; done\n")
    (bindir / "scontrol").write_text(f"#!/bin/bash\nif [[ $1 == show ]]; then echo node1; "
                                     f"else echo \"$@\" >> {logs}/scontrol; fi\n")
    for f in ("srun", "scontrol"):
        (bindir / f).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", PYTHON=sys.executable, PYTHONPATH=str(harness.ROOT),
               SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242", GPUS_PER_NODE="1")
    proc = subprocess.Popen(["bash", str(harness.ROOT / "examples/slurm/launch.sh"), "--config",
                             "examples/configs/tiny_cpu.yaml"], cwd=harness.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (logs / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (logs / "started").exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_CODE_STOPPED, (out, err)
    assert (logs / "srun").read_text() == "TERM\n"
    assert (logs / "scontrol").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in out

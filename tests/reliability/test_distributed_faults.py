"""A rank that dies or hangs: the other rank stops within `parallel.timeout_s` with a one-line
error naming the rank and the collective (exit code 3), instead of hanging forever.

The two ranks are started by hand (as `srun` would, rank 0 hosting the rendezvous store), not by
torchrun: torchrun would tear the survivor down as soon as one worker dies, and the point here is
what the survivor itself does."""
import re
import time

import pytest

from megatron_evomoe.config import ConfigError, load_config
from tests.reliability import harness

# parallel.timeout_s of these runs: also bounds how long rank 1 may wait at the start-up barrier while
# rank 0 reads the data, which takes several seconds on a loaded 2-core machine
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def faulted_runs(data_root, tmp_path_factory):
    """Both scenarios at once (the hung pair mostly waits, so they share the 2 cores well): rank 1
    is killed / hangs inside its 2nd optimizer step (the last step of the first stage). Per action:
    (rank 0's exit code, its log, seconds from the fault to rank 0's exit, rank 1's exit code)."""
    started = {}
    for action in ("kill", "hang"):
        tmp = tmp_path_factory.mktemp(action)
        procs = harness.start_ranks(tmp / "run", data_root, ("step", "2"),
                                    harness.fault_env(action, rank=1, once=tmp / "fault"),
                                    extra=[f"--parallel.timeout_s={TIMEOUT_S}"])
        started[action] = (tmp, procs)
    out = {}
    try:
        for action, (tmp, procs) in started.items():
            rc0 = procs[0].wait(timeout=240)
            out[action] = [rc0, None, time.time(), None]
    finally:
        for _, procs in started.values():
            for p in procs:  # a hung rank 1 sleeps until killed
                if p.poll() is None:
                    p.kill()
                p.wait()
    for action, (tmp, procs) in started.items():
        log = (tmp / "run.rank0.log").read_text()
        assert (tmp / "fault").exists(), "the fault did not fire:\n" + log[-3000:]
        fault_time = float((tmp / "fault").read_text().split()[0])
        out[action][1], out[action][2], out[action][3] = log, out[action][2] - fault_time, procs[1].returncode
    return out


def error_line(log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("distributed error:")]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_dead_rank_is_named(faulted_runs):
    rc0, log, took, rc1 = faulted_runs["kill"]
    assert rc1 == -9
    assert rc0 == 3, log[-3000:]
    line = error_line(log)
    # rank 0 finished step 2 (its all-reduces happen before the optimizer step) and waits for rank 1
    # in the first collective of step 3; a dead peer closes its sockets, so no timeout is needed
    assert "all_reduce(token count) on the data-parallel group (ranks 0, 1) at step 3" in line, line
    assert re.search(r"rank 1 stopped responding \(last heartbeat \d+\.\d s ago, pid \d+", line), line
    assert "Traceback" not in log
    waited = float(re.search(r"failed after (\d+\.\d) s", line).group(1))
    assert waited < TIMEOUT_S / 2, f"the collective failed only after {waited} s: by the timeout, not the death"
    assert took < 30, f"rank 0 took {took:.1f} s to report a dead rank"


def test_hung_rank_is_named(faulted_runs):
    rc0, log, took, _ = faulted_runs["hang"]
    assert rc0 == 3, log[-3000:]
    line = error_line(log)
    assert "all_reduce(token count) on the data-parallel group (ranks 0, 1) at step 3 failed after " in line
    assert f"Timed out waiting {int(TIMEOUT_S * 1000)}ms" in line, line
    # rank 1's heartbeat thread is still running: alive, but stuck outside any collective in step 2
    assert re.search(r"rank 1 is alive but did not join, at step 2: it has been outside any collective for "
                     r"\d+\.\d s \(last: all_reduce\(losses\) on the data-parallel group\)", line), line
    waited = float(re.search(r"failed after (\d+\.\d) s", line).group(1))
    assert TIMEOUT_S - 0.5 <= waited <= TIMEOUT_S + 5, waited
    assert took < TIMEOUT_S + 30, f"rank 0 took {took:.1f} s to report a hung rank"


@pytest.mark.parametrize("value", ["0", "-1", ".inf"])
def test_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        load_config(None, [f"--parallel.timeout_s={value}"])

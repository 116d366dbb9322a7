"""A rank that dies or hangs, under every 2-process layout (DP=2, TP=2, PP=2, EP=2): the other rank
stops within `parallel.timeout_s` with a one-line error naming the rank and the collective (exit
code 3), instead of hanging forever.

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


# the collective in which rank 0 waits for rank 1, dead or hung in its 2nd optimizer step (the projector
# stage's last): rank 0 has finished step 2 (its collectives come before the optimizer step) and the
# next one with rank 1 as peer is, in every layout, the stage-end checkpoint: one distributed
# checkpoint for the job, written by all ranks together
FIRST_WAIT = {layout: "checkpoint save (DCP: plans, data and metadata on the checkpoint group) (ranks 0, 1) at step 2"
              for layout in ("dp2", "ep2", "tp2", "pp2")}


ACTIONS = ("hang", "kill")


class Jobs:
    """Each layout's two 2-rank jobs (rank 1 killed / hung inside its 2nd optimizer step), started
    by hand, and the wall time at which each job's rank 0 exited."""

    def __init__(self, data_root, tmp_path_factory):
        self.data_root, self.tmp_path_factory = data_root, tmp_path_factory
        self.started, self.exited = {}, {}  # (layout, action) -> (folder, [rank 0, rank 1]); -> time

    def start(self, action: str) -> None:
        for layout in harness.PARALLEL_LAYOUTS:
            tmp = self.tmp_path_factory.mktemp(f"{layout}_{action}")
            self.started[(layout, action)] = (tmp, harness.start_ranks(
                tmp / "run", self.data_root, ("step", "2"), harness.fault_env(action, rank=1, once=tmp / "fault"),
                layout=layout, extra=[f"--parallel.timeout_s={TIMEOUT_S}"]))

    def poll(self) -> None:  # the jobs end in any order
        for key, (_, procs) in self.started.items():
            if key not in self.exited and procs[0].poll() is not None:
                self.exited[key] = time.time()

    def faults_fired(self, action: str) -> bool:
        return all((tmp / "fault").exists() or key in self.exited
                   for key, (tmp, _) in self.started.items() if key[1] == action)

    def stop(self) -> None:
        for _, procs in self.started.values():
            for p in procs:  # a hung rank 1 sleeps until killed
                if p.poll() is None:
                    p.kill()
                p.wait()

    def result(self, key) -> tuple[int, str, float, int]:
        """(rank 0's exit code, its log, seconds from the fault to rank 0's exit, rank 1's exit code)."""
        tmp, procs = self.started[key]
        log = (tmp / "run.rank0.log").read_text()
        assert (tmp / "fault").exists(), f"{key}: the fault did not fire:\n" + log[-3000:]
        fault_time = float((tmp / "fault").read_text().split()[0])
        return procs[0].returncode, log, self.exited[key] - fault_time, procs[1].returncode


@pytest.fixture(scope="module")
def faulted_runs(data_root, tmp_path_factory):
    """(layout, action) -> Jobs.result. The hung jobs start first, the killed ones once every hung
    rank 1 has stopped: the hung jobs' rank 0 then waits out the timeout mostly asleep while the
    others start up (16 processes on 2 cores), instead of after them."""
    jobs = Jobs(data_root, tmp_path_factory)
    deadline = time.time() + 300
    try:
        jobs.start("hang")
        while len(jobs.exited) < len(ACTIONS) * len(harness.PARALLEL_LAYOUTS):
            assert time.time() < deadline, f"rank 0 still running after 300 s in {set(jobs.started) - set(jobs.exited)}"
            jobs.poll()
            if len(jobs.started) == len(harness.PARALLEL_LAYOUTS) and jobs.faults_fired("hang"):
                jobs.start("kill")
            time.sleep(0.1)
    finally:
        jobs.stop()
    return {key: jobs.result(key) for key in jobs.started}


def error_line(log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("distributed error:")]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


@pytest.mark.parametrize("layout", harness.PARALLEL_LAYOUTS)
def test_dead_rank_is_named(faulted_runs, layout):
    rc0, log, took, rc1 = faulted_runs[(layout, "kill")]
    assert rc1 == -9
    assert rc0 == 3, log[-3000:]
    line = error_line(log)
    # a dead peer closes its sockets, so the collective fails at once, no timeout needed
    assert f"rank 0: {FIRST_WAIT[layout]} failed after " in line, line
    assert re.search(r"rank 1 stopped responding \(last heartbeat \d+\.\d s ago, pid \d+", line), line
    assert "Traceback" not in log
    waited = float(re.search(r"failed after (\d+\.\d) s", line).group(1))
    assert waited < TIMEOUT_S / 2, f"the collective failed only after {waited} s: by the timeout, not the death"
    assert took < 30, f"rank 0 took {took:.1f} s to report a dead rank"


@pytest.mark.parametrize("layout", harness.PARALLEL_LAYOUTS)
def test_hung_rank_is_named(faulted_runs, layout):
    rc0, log, took, _ = faulted_runs[(layout, "hang")]
    assert rc0 == 3, log[-3000:]
    line = error_line(log)
    assert f"rank 0: {FIRST_WAIT[layout]} failed after " in line, line
    assert f"Timed out waiting {int(TIMEOUT_S * 1000)}ms" in line, line
    # rank 1's heartbeat thread is still running: alive, but stuck outside any collective in step 2
    assert re.search(r"rank 1 is alive but did not join, at step 2: it has been outside any collective for "
                     r"\d+\.\d s \(last: all_reduce\(losses\) on the data-parallel group\)", line), line
    assert "Traceback" not in log
    waited = float(re.search(r"failed after (\d+\.\d) s", line).group(1))
    assert TIMEOUT_S - 0.5 <= waited <= TIMEOUT_S + 5, waited
    assert took < TIMEOUT_S + 30, f"rank 0 took {took:.1f} s to report a hung rank"


@pytest.mark.parametrize("value", ["0", "-1", ".inf"])
def test_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        load_config(None, [f"--parallel.timeout_s={value}"])

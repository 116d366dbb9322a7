"""MicroBatchLoader: the same batches, in plan order, and the same DataErrors for 0, 1 and 2 DataLoader
workers; the plan stream read lazily; workers gone after close(), exhaustion, collection, and a stop
signal to the training process."""
import gc
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.llava_dataset import LlavaDataset
from megatron_evomoe.data.loader import MicroBatchLoader, MicroBatchPlan
from megatron_evomoe.data.tokenizer import WordTokenizer, load_tokenizer
from megatron_evomoe.data.conversation_templates import NAMED_TEMPLATES
from tests.data.test_data_llava_dataset import NO_SYSTEM

ROOT = Path(__file__).resolve().parents[2]
BAD = 5  # the toy dataset's unloadable index


def toy_fetch(i):
    """Sample i: {"x": [i, 2i]}, index 5 unloadable (module level: it pickles for spawn)."""
    if i == BAD:
        raise DataError("cannot decode", file="toy.json", index=i, field="image", reason="bad_image")
    return {"x": torch.tensor([i, 2 * i])}


def toy_collate(rows):
    """-> per-row sums [B, 2] and sample counts [B] (a row may hold several samples, or none)."""
    sums = [sum((s["x"] for s in row), torch.zeros(2, dtype=torch.long)) for row in rows]
    return {"sum": torch.stack(sums), "count": torch.tensor([len(row) for row in rows])}


def packed_plans(start=0):
    """Plan k: rows [[3k], [3k+1, 3k+2]]; state_after names the next plan. Infinite."""
    for k in itertools.count(start):
        yield MicroBatchPlan([[3 * k], [3 * k + 1, 3 * k + 2]], {"next": k + 1})


def error_fields(e):
    return str(e), e.message, e.file, e.index, e.record_id, e.field, e.reason


def take(loader, n):
    out = [(plan, batch, [(i, error_fields(e)) for i, e in bad]) for plan, batch, bad in itertools.islice(loader, n)]
    loader.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (plan_a, batch_a, bad_a), (plan_b, batch_b, bad_b) in zip(a, b):
        assert plan_a == plan_b and bad_a == bad_b
        assert batch_a.keys() == batch_b.keys() and all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)


def test_same_batches_and_bad_for_0_1_2_workers_in_plan_order():
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pin_memory=True is the config's default: no warning without a GPU
        runs = {n: take(MicroBatchLoader(packed_plans(), toy_fetch, toy_collate, skip_bad=True, num_workers=n,
                                         pin_memory=True), 4) for n in (0, 1, 2)}
    assert torch.equal(torch.get_rng_state(), rng)  # the trajectory's global RNG is not drawn from
    # hand-derived: plan k sums x over its rows; sample 5 (plan 1, row 1) is dropped and reported
    expect = [(MicroBatchPlan([[3 * k], [3 * k + 1, 3 * k + 2]], {"next": k + 1}),
               {"sum": torch.tensor([[3 * k, 6 * k], [6 * k + 3, 12 * k + 6]]), "count": torch.tensor([1, 2])}, [])
              for k in range(4)]
    expect[1] = (expect[1][0], {"sum": torch.tensor([[3, 6], [4, 8]]), "count": torch.tensor([1, 1])},
                 [(5, ("toy.json: record 5: field 'image': cannot decode", "cannot decode", "toy.json", 5, None,
                       "image", "bad_image"))])
    for n in (0, 1, 2):
        assert_same(runs[n], expect)


def test_original_data_error_reaches_the_caller_from_a_worker():
    loader = MicroBatchLoader(packed_plans(), toy_fetch, toy_collate, num_workers=2)
    plan, batch, bad = next(loader)
    with pytest.raises(DataError) as info:
        next(loader)  # plan 1 holds sample 5
    assert type(info.value) is DataError and "Traceback" not in str(info.value)
    assert error_fields(info.value) == error_fields(DataError("cannot decode", file="toy.json", index=5,
                                                              field="image", reason="bad_image"))
    plan, batch, bad = next(loader)  # as with 0 workers, the stream goes on with the next plan
    assert plan.state_after == {"next": 3} and torch.equal(batch["count"], torch.tensor([1, 2]))
    loader.close()


def test_plan_stream_is_read_only_as_far_as_the_prefetch():
    for num_workers, prefetch in ((0, 2), (2, 3)):
        read = []
        plans = (read.append(k) or plan for k, plan in enumerate(packed_plans()))
        loader = MicroBatchLoader(plans, toy_fetch, toy_collate, skip_bad=True, num_workers=num_workers,
                                  prefetch_factor=prefetch)
        got = [plan.state_after["next"] for plan, _, _ in itertools.islice(loader, 3)]
        loader.close()
        assert got == [1, 2, 3]
        # in flight: none in process; else prefetch_factor per worker
        assert len(read) == 3 + (num_workers * prefetch if num_workers else 0), (num_workers, read)


def test_restart_at_a_later_plan_continues_identically():
    whole = take(MicroBatchLoader(packed_plans(), toy_fetch, toy_collate, skip_bad=True), 6)
    resume_at = whole[2][0].state_after["next"]  # a checkpoint saved after the third micro-batch
    rest = take(MicroBatchLoader(packed_plans(resume_at), toy_fetch, toy_collate, skip_bad=True, num_workers=2), 3)
    assert_same(rest, whole[3:])


def worker_pids():
    return {p.pid for p in multiprocessing.active_children()}


def assert_gone(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class Owner:
    """Holds a loader whose plan stream is its own generator: a reference cycle, as in a trainer's data."""

    def __init__(self, plans):
        self.source = plans
        self.loader = MicroBatchLoader(self.plans(), toy_fetch, toy_collate, skip_bad=True, num_workers=2)

    def plans(self):
        yield from self.source


def test_workers_stop_on_close_exhaustion_and_collection():
    before = worker_pids()
    finite = itertools.islice(packed_plans(), 3)
    for how in ("close", "exhausted", "collected"):
        loader = Owner(finite if how == "exhausted" else packed_plans()).loader
        next(loader)
        workers = worker_pids() - before
        assert len(workers) == 2, how
        if how == "close":
            loader.close()
            with pytest.raises(RuntimeError, match="closed"):
                next(loader)
        elif how == "exhausted":
            assert len(list(loader)) == 2
        else:
            del loader
            gc.collect()
        assert worker_pids() - before == set(), how
        assert_gone(workers)


def test_spawned_workers_give_the_same_batches():
    plans = list(itertools.islice(packed_plans(), 2))
    want = take(MicroBatchLoader(plans, toy_fetch, toy_collate, skip_bad=True), 2)
    got = take(MicroBatchLoader(plans, toy_fetch, toy_collate, skip_bad=True, num_workers=1,
                                multiprocessing_context="spawn"), 2)
    assert_same(got, want)


def test_bundled_llava_dataset_batches_equal_for_0_and_2_workers(data_root):
    ds = LlavaDataset(data_root / "captions.json", data_root / "images", load_tokenizer(str(data_root / "tokenizer")),
                      seq_len=56, num_image_tokens=4, image_processor=16, template=NAMED_TEMPLATES["plain"])

    def collate(rows):
        return ds.collate([s for row in rows for s in row])

    def plans():
        return (MicroBatchPlan([[i], [i + 1]], {}) for i in range(0, 6, 2))
    direct = [ds.collate([ds[i], ds[i + 1]]) for i in range(0, 6, 2)]
    for n in (0, 2):
        got = take(MicroBatchLoader(plans(), ds.__getitem__, collate, num_workers=n), 3)
        assert [plan.rows for plan, _, _ in got] == [[[0], [1]], [[2], [3]], [[4], [5]]]
        assert all(bad == [] for _, _, bad in got)
        assert_same(got, [(plan, batch, []) for (plan, _, _), batch in zip(got, direct)])
        assert direct[0]["images"].shape == (2, 3, 16, 16)  # (the images are really loaded)


@pytest.fixture
def corrupt_png_dataset(tmp_path):
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00not an image" * 8)
    records = [{"id": f"r{i}", "image": "bad.png" if i == 2 else "good.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                  {"from": "gpt", "value": "a red cat."}]} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    tok = WordTokenizer.build(["What is this ? a red cat ."], extra_words=["USER:", "ASSISTANT:"])
    return LlavaDataset(tmp_path / "data.json", tmp_path, tok, seq_len=24, num_image_tokens=4, image_processor=16,
                        template=NO_SYSTEM)


def test_corrupt_image_error_and_skip_match_in_process_loading(corrupt_png_dataset):
    ds = corrupt_png_dataset

    def collate(rows):
        return ds.collate([s for row in rows for s in row])

    def plans():
        return iter([MicroBatchPlan([[0], [1]], {}), MicroBatchPlan([[2], [3]], {})])
    errors = {}
    for n in (0, 2):
        loader = MicroBatchLoader(plans(), ds.__getitem__, collate, num_workers=n)
        next(loader)
        with pytest.raises(DataError) as info:
            next(loader)
        loader.close()
        errors[n] = error_fields(info.value)
    assert errors[2] == errors[0]
    assert errors[0][2:6] == (str(ds.json_path), 2, "r2", "image") and "bad.png" in errors[0][0]
    skipped = {n: take(MicroBatchLoader(plans(), ds.__getitem__, collate, skip_bad=True, num_workers=n), 2)
               for n in (0, 2)}
    assert_same(skipped[2], skipped[0])
    assert [i for i, _ in skipped[0][1][2]] == [2] and skipped[0][1][2][0][1] == errors[0]
    assert skipped[0][1][1]["input_ids"].shape == (1, 24)  # the bad sample dropped from the batch


STOP_SCRIPT = """
import itertools, multiprocessing, sys, time
import torch
from megatron_evomoe.data.loader import MicroBatchLoader, MicroBatchPlan
from megatron_evomoe.training.stop_request import StopRequest

def fetch(i):
    time.sleep(0.01)
    return torch.tensor(i)

def collate(rows):
    return {"x": torch.stack([s for row in rows for s in row])}

if __name__ == "__main__":
    stop = StopRequest()
    stop.install()  # as the trainer does, before its data
    loader = MicroBatchLoader((MicroBatchPlan([[i]], {}) for i in itertools.count()), fetch, collate, num_workers=2)
    next(loader)
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    for plan, batch, bad in loader:
        assert batch["x"].tolist() == plan.rows[0]
        if stop.requested:  # exits as the trainer does (TrainingStopped), the loader left open
            print("stopped after", plan.rows, flush=True)
            sys.exit(75)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_to_the_process_group_stops_cleanly_without_workers_left(tmp_path, sig):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        workers = {int(p) for p in proc.stdout.readline().split()}
        assert len(workers) == 2, proc.stderr.read()
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a scheduler's SIGTERM: every process of the job
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 75 and "stopped after" in out, err
    assert err.count(f"received {sig.name}") == 1, err  # the main process's handler only, not the workers'
    deadline = time.time() + 5
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert_gone(workers)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False

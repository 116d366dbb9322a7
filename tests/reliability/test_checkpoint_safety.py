"""Issue 16, items 1 and 3: no loaded checkpoint runs code, and saves cannot hurt.

* every public entry that loads a checkpoint refuses a crafted `state.pt` whose unpickling would
  write a marker file, with one line naming the file, and the marker never appears;
* the trainer's checkpoints are tensors and plain data (torch.load(weights_only=True) reads them);
  checkpoints of the earlier format (numpy's RNG state as an ndarray) still load and resume;
* a save that fails (full disk as OSError or as torch.save's RuntimeError, no permission) is one
  line naming the path and the cause; the previous checkpoint stays `latest`, loads, and a rerun
  resumes from it losing no step after it;
* temporary folders of dead writers on this host are removed, a live writer's are kept;
* `<save_dir>/.lock` refuses a second run naming its holder, is taken over from a dead one, and is
  gone once the run's process exits, also after an error; a save_dir that cannot be written is a
  one-line error at start-up.
"""
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_evomoe
from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.config import load_config
from megatron_evomoe.convert.__main__ import main as convert_main
from megatron_evomoe.eval.model_answers import main as answers_main
from megatron_evomoe.generate import main as generate_main
from megatron_evomoe.parallel import reshard
from megatron_evomoe.process_identity import HOST, start_ticks
from megatron_evomoe.run_lock import RunLock
from megatron_evomoe.tools.report import main as report_main
from megatron_evomoe.training.restore import load_trained_model
from megatron_evomoe.training.rng_state import rng_state, set_rng_state
from megatron_evomoe.training.trainer import Trainer
from tests.training.tiny_config import TINY

ROOT = Path(__file__).resolve().parents[2]
ONE_STAGE = "--stages=[{name: p, trainable: ['projector.*'], data: captions.json, steps: 4, eval: false}]"
REFUSED = "refused to load: it holds objects other than tensors and plain data (e.g. builtins.exec)"


def tiny(data_root, save_dir, *extra):
    """One projector stage of 4 steps, checkpoints at steps 2 and 4."""
    return load_config(None, [*TINY, ONE_STAGE, f"--data.root={data_root}", "--data.build_if_missing=false",
                              f"--train.save_dir={save_dir}", *extra])


def losses(history):
    return [(h["global_step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted run: its losses, and its folder (checkpoints of steps 2 and 4)."""
    save = tmp_path_factory.mktemp("reference") / "run"
    return save, losses(Trainer(tiny(data_root, save)).run())


# ----------------------------------------------------------------------------- crafted payloads

class Payload:
    """Unpickled, it writes `marker` (as any code a shared checkpoint could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def write_payload_checkpoint(folder: Path, marker: Path) -> Path:
    """A checkpoint folder as save_checkpoint writes one (state.pt + meta.json marked complete),
    whose state.pt runs code when unpickled."""
    folder.mkdir(parents=True)
    torch.save({"model": {}, "stage_idx": 0, "step": 1, "config": {}, "x": Payload(marker)}, folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps({"stage": "p", "stage_idx": 0, "step": 1, "global_step": 1,
                                                  "stage_end": False, "complete": True}))
    return folder


def test_the_payload_is_real_and_plain_torch_load_runs_it(tmp_path):
    """The control: without weights_only the payload runs (so the refusals below are not vacuous)."""
    marker = tmp_path / "marker"
    folder = write_payload_checkpoint(tmp_path / "run" / "checkpoints" / "00-p-step000001", marker)
    torch.load(folder / "state.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def _entries(data_root, run, folder, tmp_path):
    """name -> a call through one public entry that loads the checkpoint at `run` (`folder`)."""
    out = tmp_path / "out"
    return {
        "load_checkpoint": lambda: ckpt.load_checkpoint(folder),
        "resolve_checkpoint": lambda: ckpt.load_checkpoint(ckpt.resolve_checkpoint(run)),
        "trainer_resume": lambda: Trainer(tiny(data_root, run)).run(),
        "train_init_from": lambda: Trainer(tiny(data_root, tmp_path / "new", f"--train.init_from={folder}")).run(),
        "load_trained_model": lambda: load_trained_model(run),
        "reshard_consolidate": lambda: reshard.consolidate(run),
        "reshard_cli": lambda: reshard.main([str(run)]),
        "generate_cli": lambda: generate_main(["--ckpt", str(run), "--prompt", "hi"]),
        "report_cli": lambda: report_main([str(run), "--out", str(out)]),
        "model_answers_cli": lambda: answers_main(["--ckpt", str(run), "--benchmark", "pope", "--data", "x.jsonl",
                                                   "--out", str(out)]),
        "export_cli": lambda: convert_main(["evomoe-to-hf", "--src", str(run), "--dst", str(out)]),
    }


ENTRIES = ["load_checkpoint", "resolve_checkpoint", "trainer_resume", "train_init_from", "load_trained_model",
           "reshard_consolidate", "reshard_cli", "generate_cli", "report_cli", "model_answers_cli", "export_cli"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_no_entry_point_runs_code_from_a_checkpoint(entry, data_root, tmp_path, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    name = "00-p-step000001"
    if entry.startswith("reshard"):  # per-rank checkpoints of a DP=2 layout, both crafted
        for r in range(2):
            write_payload_checkpoint(run / "ranks" / "tp1-pp1-ep1-dp2" / f"{r:05d}" / "checkpoints" / name, marker)
        state = run / "ranks" / "tp1-pp1-ep1-dp2" / "00000" / "checkpoints" / name / "state.pt"
    else:
        state = write_payload_checkpoint(run / "checkpoints" / name, marker) / "state.pt"
    call = _entries(data_root, run, state.parent, tmp_path)[entry]
    if entry.endswith("_cli"):  # the CLIs print one line and exit with status 2
        try:
            status = call()
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err == f"error: {state}: {REFUSED}, which could run code when unpickled; " \
                                      "this project never writes such files\n", err
    else:
        with pytest.raises(ckpt.CheckpointError) as info:
            call()
        msg = str(info.value)
        assert f"{state}: {REFUSED}" in msg and "\n" not in msg, msg
    assert not marker.exists()


def test_generate_subprocess_refuses_the_payload_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    folder = write_payload_checkpoint(tmp_path / "run" / "checkpoints" / "00-p-step000001", marker)
    r = subprocess.run([sys.executable, "-m", "megatron_evomoe.generate", "--ckpt", str(tmp_path / "run"),
                        "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.startswith(f"error: {folder / 'state.pt'}: {REFUSED}"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and not marker.exists()


# ----------------------------------------------------------------------------- tensors and plain data

def test_trainer_checkpoints_load_with_plain_weights_only(reference):
    run, _ = reference
    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["00-p-step000002", "00-p-step000004"]
    for p in found:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(p / "state.pt") == []
        state = torch.load(p / "state.pt", weights_only=True)  # no allowlist at all
        assert set(state["rng"]) >= {"python", "numpy", "torch"} and state["rng"]["numpy"]["key"].shape == (624,)


def test_rng_states_survive_a_weights_only_round_trip_exactly(tmp_path):
    random.seed(3)
    np.random.seed(5)
    np.random.standard_normal()  # numpy now holds a cached gaussian: has_gauss = 1
    torch.manual_seed(7)
    saved = rng_state()
    want = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(0, 2**31, 4).tolist(),
            torch.rand(3).tolist())
    torch.save(saved, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(0, 2**31, 4).tolist(),
           torch.rand(3).tolist())
    assert got == want


def _legacy_copy(reference, tmp_path) -> Path:
    """The reference run cut back to its step-2 checkpoint, rewritten as the earlier code wrote it:
    numpy's RNG state as numpy's own tuple (an ndarray inside)."""
    run = shutil.copytree(reference[0], tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "00-p-step000004")
    (run / "checkpoints" / "latest").write_text("00-p-step000002")
    file = run / "checkpoints" / "00-p-step000002" / "state.pt"
    state = torch.load(file, weights_only=True)
    numpy = state["rng"]["numpy"]
    state["rng"]["numpy"] = (numpy["name"], numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["cached_gaussian"])
    torch.save(state, file)
    return run


def test_checkpoint_of_the_earlier_format_loads_and_resumes(reference, data_root, tmp_path):
    run = _legacy_copy(reference, tmp_path)
    file = run / "checkpoints" / "00-p-step000002" / "state.pt"
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file)) == [
        "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray"]
    assert isinstance(ckpt.load_checkpoint(file.parent)["rng"]["numpy"][1], np.ndarray)
    resumed = losses(Trainer(tiny(data_root, run)).run())
    assert resumed == reference[1][2:]  # steps 3 and 4, bit for bit


def test_only_the_numpy_rng_array_is_admitted_from_the_earlier_format(reference, tmp_path):
    """A float64 array needs one more numpy type than the RNG key: it is refused, not unpickled."""
    run = _legacy_copy(reference, tmp_path)
    file = run / "checkpoints" / "00-p-step000002" / "state.pt"
    torch.save({**torch.load(file, weights_only=False), "extra": np.zeros(3)}, file)
    with pytest.raises(ckpt.CheckpointError, match="^" + str(file) + ": refused to load: it holds objects other "
                       "than tensors and plain data, which could run code"):
        ckpt.load_checkpoint(file.parent)


def test_a_state_that_is_not_plain_data_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint state\['rng'\]\['numpy'\]: numpy.ndarray is not a tensor"):
        ckpt.save_checkpoint(tmp_path, "a", {"rng": {"numpy": np.zeros(2)}}, {}, keep=1)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- failed saves

def _fail_second_save(monkeypatch, error):
    real, calls = torch.save, []

    def save(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a file")  # what a full disk leaves behind
            raise error
        return real(obj, f, *args, **kw)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error,cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: "
                  "file write failed"), "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                        "writing file data/3: file write failed"),
], ids=["ENOSPC", "torch-RuntimeError"])
def test_full_disk_keeps_the_previous_checkpoint_and_a_rerun_resumes(error, cause, reference, data_root, tmp_path,
                                                                     monkeypatch):
    run = tmp_path / "run"
    _fail_second_save(monkeypatch, error)
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(tiny(data_root, run)).run()
    previous = run / "checkpoints" / "00-p-step000002"
    assert str(info.value) == (f"could not save checkpoint {run / 'checkpoints' / '00-p-step000004'}: "
                               f"{cause}; the previous checkpoint {previous} is intact and a rerun resumes from it")
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["00-p-step000002", "latest"]  # no temp left
    assert ckpt.find_latest(run) == previous and ckpt.load_checkpoint(previous)["step"] == 2
    resumed = losses(Trainer(tiny(data_root, run)).run())
    assert resumed == reference[1][2:]  # steps lost: 0


def test_permission_denied_while_saving_names_the_path(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, "a", {"w": torch.ones(2)}, {"global_step": 1}, keep=2)
    real = Path.mkdir

    def mkdir(self, *args, **kw):
        if self.name.startswith(".tmp-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kw)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, "b", {"w": torch.zeros(2)}, {"global_step": 2}, keep=2)
    root = tmp_path / "checkpoints"
    assert str(info.value) == (f"could not save checkpoint {root / 'b'}: Permission denied "
                               f"({root / f'.tmp-b-{HOST}-{os.getpid()}'}); the previous checkpoint {root / 'a'} "
                               "is intact and a rerun resumes from it")
    assert (root / "latest").read_text() == "a" and sorted(p.name for p in root.iterdir()) == ["a", "latest"]
    assert torch.equal(ckpt.load_checkpoint(root / "a")["w"], torch.ones(2))


# ----------------------------------------------------------------------------- temporary folders

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_clean_up_removes_dead_writers_temporaries_only(tmp_path):
    root = tmp_path / "checkpoints"
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead, alive, other_host = (root / f".tmp-00-p-step000002-{HOST}-{_dead_pid()}",
                                   root / f".tmp-00-p-step000004-{HOST}-{live.pid}",
                                   root / f".tmp-00-p-step000004-{HOST}x-{_dead_pid()}")
        for p in (dead, alive, other_host):
            p.mkdir(parents=True)
            (p / "state.pt").write_bytes(b"partial")
        ckpt.save_checkpoint(tmp_path, "00-p-step000006", {"w": torch.ones(1)}, {"global_step": 6}, keep=2)
        assert not dead.exists() and alive.is_dir() and other_host.is_dir()
    finally:
        live.kill()
        live.wait()


def test_a_checkpoint_set_aside_by_a_killed_resave_is_put_back(tmp_path):
    """A writer killed between moving the old copy of a re-saved step aside and renaming the new one
    in: the next save's clean-up puts the old copy back instead of deleting it."""
    ckpt.save_checkpoint(tmp_path, "a", {"w": torch.ones(1)}, {"global_step": 1}, keep=3)
    ckpt.save_checkpoint(tmp_path, "b", {"w": torch.full((1,), 2.0)}, {"global_step": 2}, keep=3)
    root = tmp_path / "checkpoints"
    os.replace(root / "b", root / f".old-b-{HOST}-{_dead_pid()}")
    ckpt.save_checkpoint(tmp_path, "c", {"w": torch.full((1,), 3.0)}, {"global_step": 3}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "c", "latest"]
    assert float(ckpt.load_checkpoint(root / "b")["w"]) == 2.0


# ----------------------------------------------------------------------------- the run lock

def test_a_second_run_on_the_same_save_dir_is_refused_naming_the_holder(data_root, tmp_path):
    save = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from megatron_evomoe.run_lock import RunLock; "
                               "lock = RunLock.acquire(sys.argv[1]); print('held', flush=True); sys.stdin.read()",
                               str(save)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ckpt.CheckpointError, match=f"^{save} is in use by another run: host {HOST}, pid "
                           f"{holder.pid}, started .* stop it or use another train.save_dir"):
            Trainer(tiny(data_root, save))
        assert sorted(p.name for p in save.iterdir()) == [".lock"]  # nothing written by the second run
    finally:
        holder.communicate("", timeout=60)  # the holder exits normally ...
    assert holder.returncode == 0 and not (save / ".lock").exists()  # ... and its lock is gone


@pytest.mark.parametrize("owner", ["dead", "pid_reused"])
def test_a_stale_lock_is_taken_over_with_a_warning(owner, data_root, tmp_path, caplog):
    save = tmp_path / "run"
    save.mkdir()
    if owner == "dead":
        stale = {"host": HOST, "pid": _dead_pid(), "start": 1, "started": "yesterday"}
    else:  # a live process has the pid now, but it started at another time than the lock's owner
        stale = {"host": HOST, "pid": os.getppid(), "start": start_ticks(os.getppid()) - 1, "started": "yesterday"}
    (save / ".lock").write_text(json.dumps(stale))
    trainer = Trainer(tiny(data_root, save))
    assert f"taking over the run lock of host {HOST} pid {stale['pid']} (started yesterday)" in caplog.text
    held = json.loads((save / ".lock").read_text())
    assert (held["host"], held["pid"]) == (HOST, os.getpid())
    trainer.run_lock.release()
    assert not (save / ".lock").exists()


def test_the_lock_is_released_when_the_run_stops_on_an_error(data_root, tmp_path):
    save = tmp_path / "run"
    stage = "--stages=[{name: p, trainable: ['projector.*'], data: no_such_file.json, steps: 2, eval: false}]"
    r = subprocess.run([sys.executable, str(ROOT / "pretrain_evomoe.py"), *TINY, stage, f"--data.root={data_root}",
                        "--data.build_if_missing=false", f"--train.save_dir={save}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "stages.p.data: file not found" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert save.is_dir() and not (save / ".lock").exists()


@pytest.mark.parametrize("where", ["mkdir", "open"])
def test_a_save_dir_that_cannot_be_written_is_one_line_at_start_up(where, data_root, tmp_path, monkeypatch, capsys):
    save = tmp_path / "run"
    if where == "mkdir":  # the folder cannot be created (its parent is read-only)
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kw):
            if self == save:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kw)
        monkeypatch.setattr(Path, "mkdir", mkdir)
        cause = "Permission denied"
    else:  # the folder exists on a read-only file system
        save.mkdir()
        real_open = os.open

        def open_(path, *args, **kw):
            if str(path) == str(save / ".lock"):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *args, **kw)
        monkeypatch.setattr(os, "open", open_)
        cause = "Read-only file system"
    status = pretrain_evomoe.main([*TINY, ONE_STAGE, f"--data.root={data_root}", "--data.build_if_missing=false",
                                   f"--train.save_dir={save}"])
    assert status == 2
    assert capsys.readouterr().err == f"error: train.save_dir {save}: cannot write the run lock {save / '.lock'} " \
                                      f"({cause})\n"
    assert not save.exists() or list(save.iterdir()) == []  # no metrics.jsonl, no checkpoint


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    """The lock is JSON a user can read: host, pid and start time of its holder."""
    lock = RunLock.acquire(tmp_path)
    held = json.loads((tmp_path / ".lock").read_text())
    assert (held["host"], held["pid"], held["start"]) == (HOST, os.getpid(), start_ticks(os.getpid()))
    lock.release()
    assert not (tmp_path / ".lock").exists()

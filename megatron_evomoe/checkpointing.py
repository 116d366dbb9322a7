"""Atomic checkpoints: write to a temporary folder, fsync, rename; find the latest complete one.

Layout: `<save_dir>/checkpoints/<name>/{state.pt, meta.json}` plus a `latest`
pointer file. A folder without `meta.json` marked complete is never loaded, so a
run killed mid-write resumes from the previous checkpoint; a save that fails (full
disk, no permission) leaves the previous checkpoint as it was.

`state.pt` holds tensors and plain data only and is loaded with `weights_only=True`:
loading a shared checkpoint never runs code from it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .checkpoint_error import CheckpointError
from .process_identity import HOST, is_gone, owner_tag, tagged_pid


def checkpoint_root(save_dir: str | Path) -> Path:
    return Path(save_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(save_dir: str | Path, name: str, state: dict, meta: dict, keep: int) -> Path:
    """Write `state` as checkpoint `name` atomically and point `latest` at it. Any failure to write
    is a CheckpointError naming the path and the cause, after which the previous checkpoint (and
    `latest`) are as they were and no temporary folder is left."""
    check_plain(state)
    tmp = temporary_folder(save_dir, name)
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (full disk) as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not save checkpoint {checkpoint_root(save_dir) / name}: {_cause(e)}; "
                              f"{_previous(save_dir)}") from e
    return publish(save_dir, name, tmp, meta, keep)


def temporary_path(save_dir: str | Path, name: str, tag: str | None = None) -> Path:
    """Where checkpoint `name` is written before it is complete (every rank of a distributed save
    writes into rank 0's)."""
    return checkpoint_root(save_dir) / f".tmp-{name}-{tag or owner_tag()}"


def temporary_folder(save_dir: str | Path, name: str, tag: str | None = None) -> Path:
    """A fresh, empty folder to write checkpoint `name` into, named for its owner (`tag`: this
    process by default; a distributed save uses rank 0's): another live run's save in progress is
    never cleaned up (_prune)."""
    root, tmp = checkpoint_root(save_dir), temporary_path(save_dir, name, tag)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"could not save checkpoint {root / name}: {_cause(e)}; {_previous(save_dir)}") from e
    return tmp


def publish(save_dir: str | Path, name: str, tmp: Path, meta: dict, keep: int, tag: str | None = None) -> Path:
    """Mark the written folder `tmp` complete (meta.json), move it to checkpoint `name` and point
    `latest` at it; older checkpoints beyond `keep` are removed. On failure the previous checkpoint
    and `latest` are as they were (CheckpointError)."""
    root = checkpoint_root(save_dir)
    final, aside = root / name, root / f".old-{name}-{tag or owner_tag()}"
    try:
        write_file_atomic(tmp / "meta.json", json.dumps({**meta, "complete": True}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): kept aside until replaced
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_file_atomic(root / "latest", name)
    except OSError as e:
        _undo(tmp, aside, final)
        raise CheckpointError(f"could not save checkpoint {final}: {_cause(e)}; {_previous(save_dir)}") from e
    shutil.rmtree(aside, ignore_errors=True)
    _prune(root, keep)
    return final


def _undo(tmp: Path, aside: Path, final: Path) -> None:
    """After a failed save: no temporary folder left, and a checkpoint set aside back in place unless
    its replacement made it (then only `latest` failed to move)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if aside.exists() and not final.exists():
        with contextlib.suppress(OSError):  # else the clean-up after this process puts it back
            os.replace(aside, final)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)


def _previous(save_dir) -> str:
    try:
        previous = find_latest(save_dir)
    except OSError:
        previous = None
    return (f"the previous checkpoint {previous} is intact and a rerun resumes from it" if previous
            else "no earlier checkpoint exists")


def _cause(e: Exception) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return _first_line(e) or type(e).__name__


_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device)


def check_plain(obj, where: str = "state") -> None:
    """Assert that `obj` is tensors and plain data (what torch.load(weights_only=True) reads back):
    a field of another type would make every checkpoint of the run unloadable."""
    if isinstance(obj, (torch.Tensor, torch.Size) + _PLAIN):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where}: {type(obj).__module__}.{type(obj).__qualname__} is not a tensor "
                        "or plain data; convert it (checkpoints are loaded with weights_only=True)")


def is_distributed(path: Path) -> bool:
    """A distributed (DCP) checkpoint folder: parallel/distributed_checkpoint.py reads it."""
    return (Path(path) / ".metadata").is_file()


def _complete(path: Path) -> bool:
    try:
        return (json.loads((path / "meta.json").read_text()).get("complete") is True
                and ((path / "state.pt").is_file() or is_distributed(path)))
    except (OSError, ValueError):
        return False


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by the global step recorded in meta.json)."""
    root = checkpoint_root(save_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _complete(p)]
    return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text()).get("global_step", -1))


def find_latest(save_dir: str | Path) -> Path | None:
    root = checkpoint_root(save_dir)
    try:
        pointed = root / (root / "latest").read_text().strip()
        if _complete(pointed):
            return pointed
    except OSError:
        pass
    found = list_checkpoints(save_dir)  # pointer missing or stale: fall back to a scan
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as is, or a run folder's (save_dir's) latest complete checkpoint; a
    `.safetensors` file (model tensors only, e.g. train.init_from) as is."""
    path = Path(path)
    if (path / "state.pt").is_file() or is_distributed(path) or (path.suffix == ".safetensors" and path.is_file()):
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder (meta.json with state.pt or DCP .metadata) nor a run folder "
                              "with complete checkpoints")
    return latest


def _legacy_numpy_globals() -> list:
    """Checkpoints written before the RNG states became tensors hold numpy's state as an ndarray.
    Rebuilding one takes exactly these: the array constructor (under its numpy 2 and numpy 1 names),
    the array and dtype types and the dtype of that state (uint32) - no function that runs code."""
    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    return [(rebuild, "numpy._core.multiarray._reconstruct"), (rebuild, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The state dict of a complete checkpoint folder, unpickled with weights_only=True: a file that
    holds anything but tensors and plain data is refused, never executed.

    mmap: the tensors stay in the memory-mapped file and are read only where used (loading one
    rank's slices of a big model). A `.safetensors` file gives {"model": name -> lazy tensor}. A
    distributed checkpoint gives its model tensors in full and rank 0's plain state (no optimizer:
    a parallel run loads its own boxes of that directly)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return {"model": safetensors_tensors(path)}
    if not _complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (missing state.pt or meta.json)")
    if is_distributed(path):  # the model, gathered from the boxes (one process's memory)
        from .dcp_reading import read_full_state
        return read_full_state(path)
    file = path / "state.pt"
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(file))
    except pickle.UnpicklingError as e:
        refused = _refused(file)
        if refused is not None or "weights only" in str(e).lower():
            raise CheckpointError(f"{file}: refused to load: it holds objects other than tensors and plain data"
                                  f"{f' (e.g. {refused})' if refused else ''}, which could run code when "
                                  "unpickled; this project never writes such files") from None
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    except Exception as e:  # corrupt file: name it rather than surfacing a pickle trace
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {_first_line(e)})") from e


class _SafetensorsTensor:
    """One tensor of a safetensors file, read only where indexed: `.shape`, `[slices] -> tensor`."""

    def __init__(self, handle, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def __getitem__(self, box):
        return self._slice[box]


def safetensors_tensors(file: Path) -> dict:
    """name -> lazy tensor of a safetensors file (no code in the format; nothing is read yet)."""
    from safetensors import safe_open
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
        return {k: _SafetensorsTensor(handle, k) for k in handle.keys()}
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: name it
        raise CheckpointError(f"{file}: cannot be read as safetensors ({type(e).__name__}: {_first_line(e)})") from None


def _is_zip(file: Path) -> bool:
    """torch.save's zip format (every file of this project): the only one torch.load can mmap."""
    try:
        with open(file, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _refused(file: Path) -> str | None:
    """The first global of the pickle that weights_only refuses, found by scanning it (nothing is
    executed); None when there is none or the file cannot be scanned."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _legacy_numpy_globals()}
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(file) if n not in allowed]
    except Exception:  # noqa: BLE001 - only a detail of the message
        return None
    return names[0] if names else None


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def check_model_fits(own: dict, state: dict, source: str, config: dict | None = None, hint: str = "") -> None:
    """Raise CheckpointError naming the first tensor of `state["model"]` that is missing, unexpected or
    of another shape than in the model's state dict `own` (load_state_dict would print a multi-line
    size-mismatch trace instead). With `config` (this run's `cfg.to_dict()`) the message also lists the
    architecture fields in which the checkpoint's saved config differs."""
    saved = state["model"]
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    wrong = [k for k in own if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    if wrong:  # another model size: the most telling of the three
        detail = (f"shape of {wrong[0]}: checkpoint {tuple(saved[wrong[0]].shape)} vs model "
                  f"{tuple(own[wrong[0]].shape)}")
    else:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
    differs = _architecture_diff(state.get("config"), config)
    if differs:
        detail += "; config differs: " + ", ".join(differs[:4])
    raise CheckpointError(f"{source} does not fit the configured model ({detail})" + (f"; {hint}" if hint else ""))


def _architecture_diff(saved: dict | None, now: dict | None) -> list[str]:
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    out = []
    for section in ("model", "vision", "moe", "router"):
        old, new = saved.get(section) or {}, now.get(section) or {}
        out += [f"{section}.{k}={old[k]!r} in the checkpoint, {new[k]!r} now"
                for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    return out


def _prune(root: Path, keep: int) -> None:
    done = list_checkpoints(root.parent)
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    stage_ends = [p for p in done if json.loads((p / "meta.json").read_text()).get("stage_end")]
    removable = [p for p in done[:-keep] if p.name != latest and p not in stage_ends[-1:]]
    for p in removable:
        shutil.rmtree(p, ignore_errors=True)
    remove_stale_temporaries(root)


def remove_stale_temporaries(root: Path) -> None:
    """Remove what writers on this host that are dead now left behind: `.tmp-*` folders, and `.old-*`
    (a checkpoint set aside while it was being re-saved) - put back if it was not replaced. Folders
    of live processes (another run's save in progress) and of other hosts are kept."""
    for p in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        pid = tagged_pid(p.name)
        if pid is None or not is_gone(HOST, pid):
            continue
        final = root / p.name[len(".old-"):-len(f"-{HOST}-{pid}")]
        if p.name.startswith(".old-") and not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)

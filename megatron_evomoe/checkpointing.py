"""Atomic checkpoints: write to a temporary folder, fsync, rename; find the latest complete one.

Layout: `<save_dir>/checkpoints/<name>/{state.pt, meta.json}` plus a `latest`
pointer file. A folder without `meta.json` marked complete is never loaded, so a
run killed mid-write resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the path."""


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


def _write_file_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(save_dir: str | Path, name: str, state: dict, meta: dict, keep: int) -> Path:
    """Write `state` as checkpoint `name` atomically and point `latest` at it."""
    root = checkpoint_root(save_dir)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_file_atomic(tmp / "meta.json", json.dumps({**meta, "complete": True}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_file_atomic(root / "latest", name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not save checkpoint {final}: {e.strerror or e} "
                              f"(the previous checkpoint, if any, is untouched)") from e
    _prune(root, keep)
    return final


def _complete(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("complete") is True and (path / "state.pt").is_file()
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
    """A checkpoint folder as is, or a run folder's (save_dir's) latest complete checkpoint."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder (state.pt + meta.json) nor a run folder "
                              "with complete checkpoints")
    return latest


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not _complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (missing state.pt or meta.json)")
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt file: name it rather than surfacing a pickle trace
        raise CheckpointError(f"{path / 'state.pt'}: cannot be read ({type(e).__name__}: {e})") from e


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
    for p in root.glob(".tmp-*"):  # leftovers of killed writers
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)

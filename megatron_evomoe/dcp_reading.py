"""Reading a distributed (DCP) checkpoint folder without a process group: its metadata (unpickled
without running code), a rank's plain state, the full model of one process. The format and the
writing: parallel/distributed_checkpoint.py. Used by checkpointing.load_checkpoint (evaluation,
reports, HF export, one-process tools) and by the parallel loader.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from .checkpoint_error import CheckpointError
from .parallel.checkpoint_boxes import Box, Boxes
from .parallel.dcp_planners import BoxLoadPlanner, SafeFileSystemReader


def extras_key(rank: int) -> str:
    """The key of rank `rank`'s plain state (bytes of torch.save)."""
    return f"extras/{rank:05d}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def _quiet():
    """DCP warns on every one-process (no_dist) call that it assumes one process: it does, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_metadata(folder):
    """The checkpoint's DCP metadata (unpickled without running code), with every data file present."""
    folder = Path(folder)
    try:
        metadata = SafeFileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001 - a missing, corrupt or refused .metadata: name it
        refused = " (refused: it names objects other than DCP's data types)" if "pickle" in type(e).__module__ else ""
        raise CheckpointError(f"{folder / '.metadata'}: cannot be read{refused} "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    absent = [f for f in files if not (folder / f).is_file()]
    if absent:
        raise CheckpointError(f"{folder}: the shard file {absent[0]} is missing ({len(absent)} of {len(files)}); "
                                   "the checkpoint is incomplete, resume from an earlier one")
    return metadata


def _read(folder, state: dict, group, where: str) -> BoxLoadPlanner:
    planner = BoxLoadPlanner()
    try:
        with _quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=planner, process_group=group,
                     no_dist=group is None)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt shard file: name the folder
        raise CheckpointError(f"{where}: {folder} cannot be read ({_first_line(e)})") from e
    return planner


def read_plain(folder, rank: int) -> dict:
    """Rank `rank`'s plain state (its extras), read alone (no process group)."""
    metadata = read_metadata(folder)
    key = extras_key(rank) if extras_key(rank) in metadata.state_dict_metadata else extras_key(0)
    planner = _read(folder, {key: io.BytesIO()}, None, "resume")
    return _unpickle_plain(planner.loaded_bytes[key], f"{folder} {key}")


def _unpickle_plain(data: bytes, where: str) -> dict:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused (not plain data) or corrupt
        raise CheckpointError(f"{where}: cannot be read as plain data ({_first_line(e)})") from None


def read_full_state(folder) -> dict:
    """The one-process view of a distributed checkpoint: every model tensor in full, and rank 0's plain
    state (for evaluation, reports, HF export and one-process tools; no process group needed)."""
    metadata = read_metadata(folder)
    model = {}
    boxes: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model/"):
            t = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            model[key[len("model/"):]] = t
            boxes[key] = Boxes(tuple(md.size), [Box(t, (0,) * len(md.size))])
    boxes[extras_key(0)] = io.BytesIO()
    planner = _read(folder, boxes, None, "load")
    return {**_unpickle_plain(planner.loaded_bytes[extras_key(0)], f"{folder} extras"), "model": model}


def saved_model_shapes(folder) -> dict[str, torch.Tensor]:
    """name -> a meta tensor of the saved full shape, for every model tensor (checks against a model)."""
    return {k[len("model/"):]: torch.empty(tuple(md.size), device="meta")
            for k, md in read_metadata(folder).state_dict_metadata.items() if k.startswith("model/")}

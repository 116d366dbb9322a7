"""Distributed checkpoints (torch.distributed.checkpoint): every tensor written once by the whole
job, loadable into any TP/PP/EP/DP layout, ZeRO-1 or not, or into one process, with no
consolidation step.

    <save_dir>/checkpoints/<name>/
        .metadata            DCP's index: each tensor's full shape and the boxes stored, and where
        __<rank>_0.distcp    the boxes rank <rank> wrote (replicas are written by one rank only)
        meta.json            written last, by rank 0: {"complete": true, "format": "dcp", ...}

Keys: model/<name>, optim/<name>/{exp_avg, exp_avg_sq, step} (checkpoint_boxes.py), and
extras/<rank>: each rank's plain state (stage, step, data position, RNG, evolution, config), bytes
of torch.save read back with weights_only=True. A run resumed in the same layout takes its own
rank's extras; in another layout every rank takes rank 0's, as a one-process run would.

Atomic like checkpointing.py: every rank writes into the same temporary folder (named for rank 0),
and rank 0 renames it once DCP has written every rank's data and the metadata, then moves `latest`.
A job killed mid-save leaves the previous checkpoint as `latest`. The save_dir must be on a file
system every rank sees (as for Megatron-LM's and torchtitan's checkpoints).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from .. import checkpointing as ckpt
from ..dcp_reading import _first_line, _quiet, _read, extras_key, read_metadata
from .checkpoint_boxes import Boxes
from .dcp_planners import BoxSavePlanner
from .watchdog import collective, is_comm_failure

FORMAT = "dcp"
SAVING = "checkpoint save (DCP: plans, data and metadata on the checkpoint group)"
LOADING = "checkpoint load (DCP: the read plan on the checkpoint group)"


class DistributedCheckpointer:
    """Saves and loads this rank's boxes; collective over all ranks (its own gloo group, so that a
    save running in the background never interleaves with the training's collectives)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float = 1800.0):
        self.rank, self.world_size = rank, world_size
        # (collective: every rank; new_group does not inherit init_process_group's timeout)
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world_size > 1 else None
        tag = [ckpt.owner_tag()]
        if self.group is not None:  # the temporary folder is named for rank 0, which cleans up after it
            dist.broadcast_object_list(tag, src=0, group=self.group)
        self.tag = tag[0]

    def _agree(self, error: str | None) -> None:
        """Raise on every rank if rank 0 failed (the others would wait for it in the next collective)."""
        status = [error]
        if self.group is not None:
            dist.broadcast_object_list(status, src=0, group=self.group)
        if status[0]:
            raise ckpt.CheckpointError(status[0])

    def save(self, save_dir, name: str, boxes: dict[str, Boxes], plain: dict, meta: dict, keep: int,
             watched: bool = True) -> Path:
        """Write checkpoint `name` (collective). `boxes`: this rank's tensors; `plain`: its plain state.
        watched: inside a watchdog region (a dead or hung peer is named); a background save is not
        (the watchdog follows the training thread), a peer's failure is its CheckpointError."""
        region = collective(SAVING) if watched else contextlib.nullcontext()
        with region:
            return self._save(save_dir, name, boxes, plain, meta, keep)

    def _save(self, save_dir, name: str, boxes: dict[str, Boxes], plain: dict, meta: dict, keep: int) -> Path:
        ckpt.check_plain(plain)
        extras = io.BytesIO()
        torch.save(plain, extras)
        state = {**boxes, extras_key(self.rank): extras}
        final, tmp, error = ckpt.checkpoint_root(save_dir) / name, ckpt.temporary_path(save_dir, name, self.tag), None
        if self.rank == 0:  # a fresh folder, made once for all ranks
            try:
                ckpt.temporary_folder(save_dir, name, self.tag)
            except ckpt.CheckpointError as e:
                error = str(e)
        self._agree(error)
        try:
            with _quiet():
                dcp.save(state, storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True),
                         planner=BoxSavePlanner(), process_group=self.group, no_dist=self.group is None)
        except Exception as e:  # noqa: BLE001 - DCP reports any rank's failure on every rank
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _raise_comm_failure(e)
            raise ckpt.CheckpointError(f"could not save checkpoint {final}: {_first_line(e)}; "
                                       f"{ckpt._previous(save_dir)}") from e
        if self.rank == 0:
            try:
                ckpt.publish(save_dir, name, tmp, {**meta, "format": FORMAT, "world_size": self.world_size},
                             keep, self.tag)
            except ckpt.CheckpointError as e:
                error = str(e)
        self._agree(error)
        return final

    def load(self, folder, boxes: dict[str, Boxes], where: str) -> None:
        """Copy the checkpoint's values into this rank's boxes (collective), from whichever saved boxes
        overlap them: the layout it was saved in does not matter."""
        metadata = read_metadata(folder)
        missing = [k for k in boxes if k not in metadata.state_dict_metadata]
        if missing:
            raise ckpt.CheckpointError(f"{where}: {folder} has no {missing[0]!r} ({len(missing)} tensors missing)")
        wrong = [k for k in boxes if tuple(metadata.state_dict_metadata[k].size) != tuple(boxes[k].shape)]
        if wrong:
            k = wrong[0]
            raise ckpt.CheckpointError(f"{where}: {k}: checkpoint shape {tuple(metadata.state_dict_metadata[k].size)} "
                                       f"vs model {tuple(boxes[k].shape)}")
        with collective(LOADING):
            try:
                _read(folder, boxes, self.group, where)
            except ckpt.CheckpointError as e:
                _raise_comm_failure(e.__cause__)
                raise


def _raise_comm_failure(e: BaseException | None) -> None:
    """A peer died or hung during DCP's exchanges: re-raise the backend's error itself, for the
    watchdog region to name the rank (DCP may wrap it, per rank, in a CheckpointException)."""
    causes = [e, *getattr(e, "failures", {}).values()] if e is not None else []
    for cause in causes:
        if isinstance(cause, BaseException) and is_comm_failure(cause):
            raise cause


def saved_layout(folder) -> str | None:
    """The layout a checkpoint was saved in (meta.json), None when it does not say."""
    try:
        return json.loads((Path(folder) / "meta.json").read_text()).get("layout")
    except (OSError, ValueError):
        return None

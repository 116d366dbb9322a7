"""torch.distributed.checkpoint planners over `Boxes` (checkpoint_boxes.py), and a reader that
unpickles the checkpoint's metadata without running code.

The state dicts handed to DCP are flat: key -> Boxes, or -> io.BytesIO (bytes stored as they are). Saving, a rank's plan holds one write item per
box, addressed by (key, offsets in the full tensor); DCP's default global plan then drops the boxes
that other ranks also hold (replicas) and checks that each tensor's boxes tile it exactly. Loading,
each box of the new layout reads the overlap of every saved box with it, wherever it came from.
"""
from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import _create_read_item_for_byteio, create_read_items_for_chunk_list

from .checkpoint_boxes import Box, Boxes


def _find(state_dict: dict[str, Boxes], index: MetadataIndex) -> Box:
    offsets = tuple(index.offset or ())
    for box in state_dict[index.fqn].boxes:
        if box.offsets == offsets:
            return box
    raise AssertionError(f"{index.fqn}: no box at {offsets}")


class BoxSavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, boxes in self.state_dict.items():
            if isinstance(boxes, io.BytesIO):
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
                continue
            for box in boxes.boxes:
                offsets = torch.Size(box.offsets)
                items.append(WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(
                                           chunk=ChunkStorageMetadata(offsets=offsets, sizes=box.data.size()),
                                           properties=TensorProperties.create_from_tensor(box.data),
                                           size=torch.Size(boxes.shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return self.state_dict[write_item.index.fqn]
        data = _find(self.state_dict, write_item.index).data.detach()
        # a view is pickled with its whole storage: write only the box's own elements
        whole = data.untyped_storage().nbytes() == data.numel() * data.element_size()
        return data if whole and data.is_contiguous() else data.contiguous().clone()


class BoxLoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator
        self.loaded_bytes: dict[str, bytes] = {}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, boxes in self.state_dict.items():
            if isinstance(boxes, io.BytesIO):
                items.append(_create_read_item_for_byteio(MetadataIndex(fqn), 0, MetadataIndex(fqn), 0, 0))
                continue
            chunks = [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=b.data.size()) for b in boxes.boxes]
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], chunks)
        self.plan = LoadPlan(items)
        return self.plan

    def resolve_tensor(self, read_item) -> torch.Tensor:
        data = _find(self.state_dict, read_item.dest_index).data
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            data = data.narrow(dim, start, length)
        return data  # (a view: the reader copies into the destination itself)

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.loaded_bytes[read_item.dest_index.fqn] = value.read()  # (unpickled by the caller, weights_only)


def _allowed(module: str, name: str) -> bool:
    """The globals a DCP metadata file names: its own dataclasses and enums, torch.Size, dtypes,
    layouts and memory formats; no other function (a pickle could call one)."""
    if module.startswith("torch.distributed.checkpoint."):
        obj = getattr(__import__(module, fromlist=[name]), name, None)
        return isinstance(obj, type)
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    # _get_layout: how torch pickles a layout (a lookup of the layout's name)
    return (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                              ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling refuses anything but DCP's own data types (torch's
    reader uses plain pickle.load: a shared checkpoint could run code); tensors are read with
    torch.load(weights_only=True) by the base reader."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is not None:  # (what the base reader records in it)
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata

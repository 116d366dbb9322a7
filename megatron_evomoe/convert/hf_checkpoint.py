"""A Hugging Face model folder on disk: its ``config.json`` and lazily read weight tensors.

`HFCheckpoint` reads ``model.safetensors``, a sharded ``model.safetensors.index.json`` (or
any ``*.safetensors``), or ``pytorch_model.bin`` (+ index) as a fallback; every problem is a
`ConversionError` naming the file or tensor. It records which tensors were read, so callers
can report the ones left over.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .errors import ConversionError, check_shape

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class HFCheckpoint:
    """A Hugging Face model folder: its config.json and lazily read weight tensors."""

    def __init__(self, directory, config: Optional[dict] = None):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: not a directory")
        self.config = config if config is not None else read_config(self.dir)
        self._where: Dict[str, Path] = {}  # tensor name -> file
        self._index: Optional[Path] = None  # the weight index that filled _where, if any
        self._keys: Dict[Path, set] = {}  # file -> the tensor names it really holds
        self._handles: dict = {}
        self._bin_cache: Dict[Path, dict] = {}
        self.used: set = set()
        self._index_weights()

    # ----------------------------------------------------------------- listing
    def _index_weights(self) -> None:
        d = self.dir
        if (d / SAFE_INDEX).is_file() or (d / BIN_INDEX).is_file():
            index = d / SAFE_INDEX if (d / SAFE_INDEX).is_file() else d / BIN_INDEX
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a valid weight index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ConversionError(f"{index}: 'weight_map' must map tensor names to shard file names")
            self._index = index
            for name, fname in weight_map.items():
                self._where[name] = d / fname
            missing = sorted({str(p.name) for p in self._where.values() if not p.is_file()})
            if missing:
                raise ConversionError(f"{index}: lists shard file(s) that are missing: {', '.join(missing)}")
            return
        files = sorted(d.glob("*.safetensors"))
        if not files and (d / "pytorch_model.bin").is_file():
            files = [d / "pytorch_model.bin"]
        if not files:
            raise ConversionError(f"{d}: no weights found (expected model.safetensors, {SAFE_INDEX}, "
                                  f"*.safetensors or pytorch_model.bin)")
        for f in files:
            for name in self._file_keys(f):
                self._where[name] = f

    def _file_keys(self, path: Path) -> List[str]:
        if path.suffix == ".safetensors":
            return list(self._safe(path).keys())
        return list(self._bin(path).keys())

    def _safe(self, path: Path):
        if path not in self._handles:
            try:
                from safetensors import safe_open
            except ImportError as e:  # pragma: no cover - install_requires has it
                raise ConversionError("reading .safetensors needs the `safetensors` package: "
                                      "pip install safetensors") from e
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # the Rust side raises its own error types
                raise ConversionError(f"{path}: cannot be read as safetensors ({e})") from None
        return self._handles[path]

    def _bin(self, path: Path) -> dict:
        if path not in self._bin_cache:
            try:
                try:
                    self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                    self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConversionError(f"{path}: cannot be read as a PyTorch state dict ({e})") from None
        return self._bin_cache[path]

    @property
    def files(self) -> List[str]:
        return sorted({p.name for p in self._where.values()})

    def keys(self) -> List[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    # ----------------------------------------------------------------- reading
    def _missing(self, name: str) -> ConversionError:
        return ConversionError(f"{self.dir}: tensor {name!r} not found in {', '.join(self.files)}")

    def _file_of(self, name: str) -> Path:
        """The file holding `name`; an index may name a shard that lacks it (an edited or mixed-up index)."""
        if name not in self._where:
            raise self._missing(name)
        path = self._where[name]
        if path not in self._keys:
            self._keys[path] = set(self._file_keys(path))
        if name not in self._keys[path]:
            raise ConversionError(f"{self._index}: maps tensor {name!r} to {path.name}, which does not contain it")
        return path

    def shape(self, name: str) -> Tuple[int, ...]:
        path = self._file_of(name)
        if path.suffix == ".safetensors":
            return tuple(self._safe(path).get_slice(name).get_shape())
        return tuple(self._bin(path)[name].shape)

    def get(self, name: str, shape: Optional[Iterable[int]] = None, why: str = "") -> torch.Tensor:
        """Tensor `name`; with `shape`, a ConversionError naming tensor and file if it differs."""
        path = self._file_of(name)
        if shape is not None:
            check_shape(name, self.shape(name), shape, f"{self.dir / path.name}", why)
        if path.suffix == ".safetensors":
            t = self._safe(path).get_tensor(name)
        else:
            t = self._bin(path)[name]
        self.used.add(name)
        return t

    def unused(self, prefixes: Iterable[str] = ("",)) -> List[str]:
        prefixes = tuple(prefixes)
        return sorted(k for k in self._where if k not in self.used and k.startswith(prefixes))


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model folder?)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return cfg

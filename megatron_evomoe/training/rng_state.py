"""Seeding every random generator, and their states as checkpoint data (python, numpy, torch, CUDA)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and plain data (checkpoints load with weights_only=True):
    python's is a tuple of ints; numpy's key array is kept as an int64 tensor."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_rng(saved) -> tuple:
    if not isinstance(saved, dict):  # numpy's own tuple, in checkpoints of earlier versions
        return saved
    return (saved["name"], saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
            saved["cached_gaussian"])


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_rng(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Distributed checkpoints (parallel/distributed_checkpoint.py): a TP2 x EP2 (x DP2) job with ZeRO-1
writes every tensor once (bytes on disk within 5% of model + AdamW state, counted once); the checkpoint
loads directly into another layout (PP2 x DP2, unsharded AdamW) and into one process, bit for bit; an
asynchronous save writes the values of its step; bad checkpoints give one-line errors."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.parallel import ParallelState, full_state_dict, parallelize
from megatron_evomoe.parallel.checkpoint_boxes import (Box, Boxes, fresh_entry, install_entries, live_entries,
                                                       model_boxes, optimizer_boxes, optimizer_slots)
from megatron_evomoe.dcp_reading import _read, read_metadata
from megatron_evomoe.parallel.distributed_checkpoint import DistributedCheckpointer
from megatron_evomoe.training.background_save import BackgroundSave

from . import common as C
from .dist_utils import run_distributed

# wide enough (5M parameters) that DCP's per-item framing (a torch.save header per box, ~1 KB) and the
# metadata stay small next to the tensors, as they do for any real model
WIDE = ("--model.hidden_size=256", "--model.ffn_hidden_size=512")
SAVED = dict(tp=2, ep=2, extra=WIDE)  # world 4: dp 2, expert-dp 1; ZeRO-1 shards the dense moments over dp
LOADED = dict(pp=2, extra=WIDE)  # world 4: dp 2, plain AdamW


def _boxes(model, opt, state, entries=None):
    named = dict(model.named_parameters())
    inner, slots = optimizer_slots(opt, [(n, p) for n, p in named.items() if p.requires_grad])
    entries = live_entries(inner, slots) if entries is None else entries
    return {**model_boxes(model, state), **optimizer_boxes(model, slots, entries, state)}, inner, slots


def full_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in full, read by one process (no process group)."""
    boxes = {k: Boxes(tuple(md.size), [Box(torch.empty(tuple(md.size), dtype=md.properties.dtype), (0,) * len(md.size))])
             for k, md in read_metadata(folder).state_dict_metadata.items() if not k.startswith("extras/")}
    _read(folder, boxes, None, "test")
    return {k: b.boxes[0].data for k, b in boxes.items()}


def _worker(rank, world, tmp):
    batches = C.make_batches(2, 8)
    saver = DistributedCheckpointer(rank, world)
    # ---- layout A: TP2 x EP2 (x DP2), ZeRO-1
    cfg = C.tiny_cfg(**SAVED)
    opts = []
    state = ParallelState.build(cfg, rank, world)
    model = parallelize(C.build_model(cfg), state, cfg)
    C.train(model, state, batches, 2, zero=True, optimizer=opts)
    boxes, _, _ = _boxes(model, opts[0], state)
    saver.save(tmp, "a", boxes, {"stage_idx": 0, "step": 2, "rank": rank}, {"global_step": 2}, keep=3)
    out = {"full_a": full_state_dict(model, state)}
    # ---- an asynchronous save writes what the tensors held when it was submitted
    saves = BackgroundSave(True)
    staged = {k: b.staged() for k, b in boxes.items()}
    saves.submit(lambda: saver.save(tmp, "async", staged, {"stage_idx": 0, "step": 2, "rank": rank}, {"global_step": 3}, keep=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on
    saves.close(failing=False)
    # ---- layout B: PP2 (x DP2), unsharded AdamW, loads A's checkpoint directly
    cfg_b = C.tiny_cfg(**LOADED)
    state_b = ParallelState.build(cfg_b, rank, world)
    model_b = parallelize(C.build_model(cfg_b, seed=5), state_b, cfg_b)  # other values everywhere
    opt_b = torch.optim.AdamW([p for p in model_b.parameters() if p.requires_grad], lr=1e-2)
    params_b = [(n, p) for n, p in model_b.named_parameters() if p.requires_grad]
    inner, slots = optimizer_slots(opt_b, params_b)
    entries = {s.name: fresh_entry(s) for s in slots}
    boxes_b, _, _ = _boxes(model_b, opt_b, state_b, entries)
    saver.load(Path(tmp) / "checkpoints" / "a", boxes_b, "test")
    install_entries(opt_b, inner, slots, entries)
    # saved again from B: the same tensors as A's checkpoint (model and moments), bit for bit
    boxes_b, _, _ = _boxes(model_b, opt_b, state_b)
    saver.save(tmp, "b", boxes_b, {"stage_idx": 0, "step": 2, "rank": rank}, {"global_step": 4}, keep=3)
    out["steps_b"] = sorted({float(opt_b.state[p]["step"]) for _, p in params_b})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    per_rank = run_distributed(_worker, 4, str(tmp), timeout=300)
    return tmp, per_rank


def test_each_tensor_written_once_and_loads_into_another_layout_and_one_process(saved):
    tmp, per_rank = saved
    folder = tmp / "checkpoints" / "a"
    # the one-process model and AdamW state, counted once: full model tensors + 2 moments and a step
    # per trainable tensor (the tiny model's every parameter trains)
    ref = C.build_model(C.tiny_cfg(extra=WIDE))
    model_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    opt_bytes = sum(2 * p.numel() * p.element_size() + 4 for p in ref.parameters())
    written = sum(f.stat().st_size for f in folder.iterdir() if f.name != "meta.json")
    assert abs(written - (model_bytes + opt_bytes)) <= 0.05 * (model_bytes + opt_bytes), (written, model_bytes, opt_bytes)
    assert written < 1.3 * (model_bytes + opt_bytes)  # a per-rank copy would be 2x (dp 2)
    # one process reads the full model (no consolidation step): the job's gathered state dict
    one = ckpt.load_checkpoint(folder)
    assert one["step"] == 2 and one["rank"] == 0
    for k, want in per_rank[0]["full_a"].items():
        assert torch.equal(one["model"][k], want), k
    # PP2 x DP2 with unsharded AdamW loaded everything and saves the same tensors again
    a, b = full_tensors(folder), full_tensors(tmp / "checkpoints" / "b")
    assert sorted(a) == sorted(b) and any(k.endswith("exp_avg_sq") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(r["steps_b"] == [2.0] for r in per_rank)
    # the asynchronous save holds the values of its step, not the ones changed after it
    asynchronous = full_tensors(tmp / "checkpoints" / "async")
    for k in a:
        assert torch.equal(asynchronous[k], a[k]), k
    assert ckpt.find_latest(tmp).name == "b"


def test_bad_distributed_checkpoints_are_one_line_errors(saved, tmp_path):
    tmp, _ = saved
    folder = tmp / "checkpoints" / "a"
    # a missing shard file
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"the shard file __1_0.distcp is missing") as e:
        ckpt.load_checkpoint(broken)
    assert "\n" not in str(e.value)
    # another model shape (hidden 48 instead of 32), through the trainer's loading path
    from megatron_evomoe.dcp_reading import read_plain
    from megatron_evomoe.parallel.training_hooks import ParallelTraining
    wider = C.tiny_cfg(extra=["--model.hidden_size=48"])  # (the checkpoint's is 256)
    par = ParallelTraining(C.build_model(wider), ParallelState.single(wider), wider)
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit the configured model \(shape of "):
        par.load_state({**read_plain(folder, 0), "dcp_folder": folder}, opt=None, load_optimizer=False)
    # metadata that would run code when unpickled is refused, and nothing runs
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: cannot be read \(refused"):
        ckpt.load_checkpoint(evil)
    assert not marker.exists()

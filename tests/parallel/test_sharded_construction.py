"""Sharded construction and shard-wise train.init_from (issue 14, item 1).

Each rank builds the model on the meta device, parallelizes it there and materialises only its
shards: the gathered model equals the one-process model built the same way, a rank's peak of live
tensor bytes is its shard (+ one drawn chunk), not the model, and a one-process checkpoint
(memory-mapped state.pt, or a safetensors file read slice by slice) loads into the shards.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_evomoe import checkpointing as ckpt
from megatron_evomoe.model import init as model_init
from megatron_evomoe.parallel import ParallelState, full_state_dict
from megatron_evomoe.parallel.memory_tracking import LiveTensorBytes
from megatron_evomoe.parallel.sharded_construction import full_shapes, materialise_shards
from megatron_evomoe.parallel.training_hooks import ParallelTraining
from megatron_evomoe.stages.structure import build_model
from tests.parallel import common as C

from .dist_utils import run_distributed

SEED = 3


def _meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg, C.IMAGE_TOKEN)


def _one_process(cfg, seed=SEED) -> dict[str, torch.Tensor]:
    model = materialise_shards(_meta_model(cfg), ParallelState.single(cfg), cfg, "cpu", seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("chunk_elements", [3, 40, 1 << 24])  # a chunk < a row, a few rows, the whole tensor
def test_any_box_holds_the_full_tensors_values(monkeypatch, chunk_elements):
    monkeypatch.setattr(model_init, "CHUNK_ELEMENTS", chunk_elements)
    rule, shape = model_init.InitRule("normal", 0.5), (5, 3, 7)
    full = model_init.full_tensor(rule, SEED, "w", shape)
    assert full.std().item() == pytest.approx(0.5, rel=0.3) and full.unique().numel() == full.numel()
    for starts, local in [((0, 0, 0), (5, 3, 7)), ((2, 1, 0), (3, 2, 7)), ((0, 0, 4), (5, 3, 3)),
                          ((4, 0, 0), (3, 3, 7))]:  # the last reaches past dim 0: zero padding
        out = torch.full(local, float("nan"))
        model_init.fill_box(out, rule, SEED, "w", shape, starts)
        n0 = min(local[0], shape[0] - starts[0])
        want = full[starts[0]:starts[0] + n0, starts[1]:starts[1] + local[1], starts[2]:starts[2] + local[2]]
        assert torch.equal(out[:n0], want) and not out[n0:].any()
    other = model_init.full_tensor(rule, SEED, "w2", shape)  # another name: another stream
    assert not torch.allclose(full, other)


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _worker(rank, world, cfg, folder, safetensors_file, bad_folder):
    state = ParallelState.build(cfg, rank, world)
    with LiveTensorBytes() as mem:
        model = _meta_model(cfg)
        par = ParallelTraining(model, state, cfg)
        par.materialise("cpu", SEED)
    shard = _storage_bytes([*model.parameters(), *model.buffers()])
    largest = max(math.prod(s) for s in full_shapes(model, state).values()) * 4  # one whole tensor, fp32
    out = {"built": full_state_dict(model, state), "peak": mem.peak, "live": mem.live, "shard": shard,
           "largest": largest}
    loaded = ckpt.load_checkpoint(folder, mmap=True)  # (opened outside the count: the page cache)
    with LiveTensorBytes() as mem:
        par.load_full_weights(loaded, "train.init_from: test")
    out["loaded"], out["load_peak"] = full_state_dict(model, state), mem.peak
    par.load_full_weights(ckpt.load_checkpoint(safetensors_file), "train.init_from: test.safetensors")
    out["from_safetensors"] = full_state_dict(model, state)
    with pytest.raises(ckpt.CheckpointError) as e:
        par.load_full_weights(ckpt.load_checkpoint(bad_folder, mmap=True), "train.init_from: bad")
    out["bad"] = str(e.value)
    return out


def test_sharded_construction_and_init_from_at_tp2_pp2(tmp_path):
    from safetensors.torch import save_file
    cfg = C.tiny_cfg(tp=2, pp=2)
    ref = _one_process(cfg)
    pretrained = _one_process(cfg, seed=SEED + 1)  # other values than the init: the load must show
    folder = ckpt.save_checkpoint(tmp_path / "pre", "step1", {"model": pretrained}, {"global_step": 1}, keep=1)
    save_file(pretrained, str(tmp_path / "pre.safetensors"))
    wider = C.tiny_cfg(extra=["--model.ffn_hidden_size=64"])
    bad = ckpt.save_checkpoint(tmp_path / "bad", "step1", {"model": _one_process(wider), "config": wider.to_dict()},
                               {"global_step": 1}, keep=1)
    results = run_distributed(_worker, 4, cfg, folder, tmp_path / "pre.safetensors", bad)
    model_bytes = _storage_bytes(ref.values())
    for rank, r in enumerate(results):
        assert r["built"].keys() == ref.keys()
        for k, v in ref.items():  # every layout holds the one-process values, bit for bit
            assert torch.equal(r["built"][k], v), (rank, k)
            assert torch.equal(r["loaded"][k], pretrained[k]) and torch.equal(r["from_safetensors"][k], pretrained[k])
        # the rank's peak during construction is its shard plus one drawn chunk (here a whole small
        # tensor, drawn and indexed: 2x), not the model
        assert r["live"] >= r["shard"] - 4096  # (the rotary tables: counted in shard, 2 KB)
        assert r["peak"] <= 1.05 * r["shard"] + 2 * r["largest"], (rank, r)
        assert model_bytes > 1.5 * r["peak"], (rank, model_bytes, r["peak"])
        assert r["load_peak"] <= 0.05 * r["shard"], (rank, r["load_peak"])  # copied into the shards in place
        assert "does not fit the configured model (shape of llm.layers.0.mlp.w_gate.weight" in r["bad"], r["bad"]
        assert "model.ffn_hidden_size=64 in the checkpoint, 48 now" in r["bad"]


def test_one_process_materialise_keeps_ties_rules_and_buffers():
    cfg = C.tiny_cfg(extra=["--model.tie_embeddings=true"])
    model = materialise_shards(_meta_model(cfg), ParallelState.single(cfg), cfg, "cpu", SEED)
    plain = build_model(cfg, C.IMAGE_TOKEN)  # the old construction: same shapes, distributions, tables
    assert model.llm.lm_head.weight is model.llm.embed.weight
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.llm.rope.cos, plain.llm.rope.cos) and torch.equal(model.llm.rope.sin, plain.llm.rope.sin)
    new, old = dict(model.named_parameters()), dict(plain.named_parameters())
    assert new.keys() == old.keys()
    for k in ["llm.layers.0.attn.wq.weight", "llm.layers.0.mlp.w_down.weight", "vision.blocks.0.fc1.weight"]:
        assert new[k].std().item() == pytest.approx(old[k].std().item(), rel=0.15), k  # same distribution,
        assert not torch.equal(new[k], old[k])                                          # another stream
    for k in ["llm.norm.weight", "vision.blocks.0.norm1.bias"]:
        assert torch.equal(new[k], old[k]), k  # constants computed directly

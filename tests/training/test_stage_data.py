"""StageData on the micro-batch loader: a bad sample with skipping is dropped from its row (an unpacked
row then is padding), a packed stage hands the packer's rows of (ids, labels, image) to collate_packed
(data/packing.py), and a state_dict resumes the same micro-batches."""
from __future__ import annotations

import json
import shutil

import torch

import megatron_evomoe.data.packing as packing
from megatron_evomoe.config import load_config
from megatron_evomoe.data.mixture import SampleStream
from megatron_evomoe.data.tokenizer import load_tokenizer
from megatron_evomoe.model.mllm import IGNORE_INDEX
from megatron_evomoe.training.data_setup import DataBundle
from megatron_evomoe.training.stage_data import StageData
from tests.reliability.bad_inputs import corrupt_image
from tests.training.tiny_config import TINY

STAGE = ("--stages=[{name: p, trainable: ['projector.*'], data: captions.json, conversation_template: plain, steps: 1,"
         " eval: false}]")


def _stage_data(root, *extra, seed=0):
    cfg = load_config(None, [*TINY, STAGE, f"--data.root={root}", "--data.build_if_missing=false", *extra])
    return StageData(DataBundle(root, load_tokenizer(str(root / "tokenizer"))), cfg.stages[0], cfg, seed=seed)


def test_a_bad_sample_is_dropped_from_its_row(data_root, tmp_path):
    root = shutil.copytree(data_root, tmp_path / "data")
    records = json.loads((root / "captions.json").read_text())
    first = int(SampleStream([len(records)], 0).take(1)[0])  # the stream's first sample: row 0 of step 1
    corrupt_image(root / "images" / records[first]["image"])
    data = _stage_data(root, "--data.skip_bad_samples=true")
    batch = data.next_batches(1)[0]
    assert (batch["input_ids"][0] == data.dataset.tokenizer.pad_id).all()
    assert (batch["labels"][0] == IGNORE_INDEX).all() and not batch["has_image"][0]
    assert batch["has_image"][1:].all() and batch["images"].shape[0] == 3
    assert data.num_skipped == 1 and data.skipped_by_reason() == {"corrupt_image": 1}


def test_packed_rows_reach_the_collate_and_resume(data_root):
    # seq_len 40: about two plain-template captions per row, so the window of 8 fills at least 4 rows
    data = _stage_data(data_root, "--data.packing=pack", "--data.pack_window=8", "--train.micro_batch_size=2",
                       "--data.seq_len=40")
    ds = data.dataset
    window = SampleStream([len(ds)], 0).take(8)
    rows = [[int(window[p]) for p in row] for row in packing.pack_rows(ds.lengths[window], ds.seq_len)]
    assert max(len(r) for r in rows) >= 2  # the tiny captions do pack
    first, second = data.next_batches(2)
    for batch, pair in ((first, rows[:2]), (second, rows[2:4])):
        for r, row in enumerate(pair):
            expect = torch.cat([ds.tokens(i)[0] for i in row])
            assert torch.equal(batch["input_ids"][r, :len(expect)], expect)
        assert batch["images"].shape[0] == sum(len(row) for row in pair) and "padding_tokens" not in batch
    resumed = _stage_data(data_root, "--data.packing=pack", "--data.pack_window=8", "--train.micro_batch_size=2",
                          "--data.seq_len=40")
    state = data.state_dict()
    third = data.next_batches(1)[0]
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batches(1)[0]["input_ids"], third["input_ids"])
    assert state["stats"]["rows"] == 4 and state["stats"]["samples"] == sum(len(r) for r in rows[:4])

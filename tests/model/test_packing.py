"""Packed rows (data/packing.py + the block-diagonal attention of model/llm.py) against the same
samples one per row: per-sample LM loss, LM-loss gradients and every real token's routing match
(fp32, 1e-5) on a tiny multimodal model with DTR-routed MoE layers; pack_rows and collate_packed
on hand-derived examples."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from megatron_evomoe.data.llava_dataset import collate_llava
from megatron_evomoe.data.packing import collate_packed, pack_rows, padding_fraction
from megatron_evomoe.model.llm import Attention, block_causal_mask
from megatron_evomoe.model.mllm import IGNORE_INDEX
from megatron_evomoe.moe.moe_layer import MoELayer

from ..parallel import common as C

SEQ = 32
PAD = 0


def make_samples(seed: int = 3) -> list:
    """Five samples (ids [L], labels [L], image or None): images in three, text-only in two; the
    labels supervise each sample's second half, as an answer after a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, has_image in ((9, True), (6, False), (8, True), (5, False), (10, True)):
        ids = torch.randint(1, C.VOCAB - 1, (n,), generator=g)
        if has_image:
            ids[1:1 + C.NUM_IMAGE_TOKENS] = C.IMAGE_TOKEN
        labels = torch.full((n,), IGNORE_INDEX)
        labels[n // 2:] = ids[n // 2:]
        image = torch.randn(3, 16, 16, generator=g) if has_image else None
        out.append((ids, labels, image))
    return out


def packed_batch(samples):
    """Rows [A, B, C] (two images and a text-only sample in one row), [D, E], and an empty row."""
    rows = [[samples[0], samples[1], samples[2]], [samples[3], samples[4]], []]
    return rows, collate_packed(rows, SEQ, PAD, 16)


def unpacked_batch(samples):
    """Today's path: each sample padded to SEQ in its own row, collated as LlavaDataset does."""
    padded = []
    for ids, labels, image in samples:
        n = ids.shape[0]
        padded.append({"input_ids": F.pad(ids, (0, SEQ - n), value=PAD),
                       "labels": F.pad(labels, (0, SEQ - n), value=IGNORE_INDEX), "image": image})
    return collate_llava(padded, 16)


def token_losses(logits, labels):
    """[B, S] cross-entropy of the token predicted at t (label t+1); 0 where ignored or t = S-1."""
    B, S, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none").view(B, S - 1)
    return F.pad(ce, (0, 1))


def sample_spans(rows):
    """[(row, start, length)] of every sample, in the order make_samples gives them."""
    spans = []
    for b, row in enumerate(rows):
        start = 0
        for ids, _, _ in row:
            spans.append((b, start, ids.shape[0]))
            start += ids.shape[0]
    return spans


def run(model, batch, routing: list):
    """The model's forward on a batch (packed when it has segment_ids), appending each MoE layer's
    (expert indices [B*S, K], gates [B*S, K]) to `routing`."""
    moe_layers = [l.mlp for l in model.llm.layers if isinstance(l.mlp, MoELayer)]
    assert len(moe_layers) == 2
    for m in moe_layers:
        m.routing_hook = lambda layer, r, mod: routing.append((r.topk_idx.clone(), r.gates.detach().clone()))
    out = model(batch["input_ids"], batch["images"], batch["labels"], positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"))
    for m in moe_layers:
        m.routing_hook = None
    return out


@pytest.fixture(scope="module")
def both():
    """(packed, unpacked): each {out, routing, grads, batch, per-token losses}."""
    samples = make_samples()
    rows, packed = packed_batch(samples)
    res = []
    for batch in (packed, unpacked_batch(samples)):
        model = C.build_model(C.tiny_cfg())
        routing = []
        out = run(model, batch, routing)
        out.lm_loss_sum.backward()  # LM loss only: the aux loss also sees padding tokens
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res.append(dict(out=out, routing=routing, grads=grads, batch=batch,
                        tok=token_losses(out.logits.detach(), batch["labels"])))
    return rows, res[0], res[1]


def test_packed_per_sample_loss_matches_unpacked(both):
    rows, packed, unpacked = both
    assert torch.isfinite(packed["out"].logits).all()  # the empty row too
    for k, (b, start, n) in enumerate(sample_spans(rows)):
        got = packed["tok"][b, start:start + n].sum()
        want = unpacked["tok"][k].sum()
        assert want > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(packed["out"].num_tokens) == int(unpacked["out"].num_tokens) == 20
    torch.testing.assert_close(packed["out"].lm_loss_sum, unpacked["out"].lm_loss_sum, rtol=1e-5, atol=1e-6)


def test_packed_gradients_match_unpacked(both):
    _, packed, unpacked = both
    assert packed["grads"].keys() == unpacked["grads"].keys()
    assert any(".router." in n for n in packed["grads"]) and any("vision" in n for n in packed["grads"])
    for name, g in unpacked["grads"].items():
        torch.testing.assert_close(packed["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_routing_matches_unpacked(both):
    rows, packed, unpacked = both
    S = SEQ
    for (idx_p, gate_p), (idx_u, gate_u) in zip(packed["routing"], unpacked["routing"], strict=True):
        for k, (b, start, n) in enumerate(sample_spans(rows)):
            real_p = slice(b * S + start, b * S + start + n)  # [B*S] token order of the router
            real_u = slice(k * S, k * S + n)
            assert torch.equal(idx_p[real_p], idx_u[real_u])
            torch.testing.assert_close(gate_p[real_p], gate_u[real_u], rtol=1e-5, atol=1e-6)


def test_block_causal_mask_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(seg), want[None, None])


def test_collate_packed_by_hand():
    a = (torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7]), torch.ones(3, 2, 2))
    b = (torch.tensor([8, 9]), torch.tensor([8, 9]), None)
    c = (torch.tensor([4, 3]), torch.tensor([4, 3]), 2 * torch.ones(3, 2, 2))
    batch = collate_packed([[a, b], [], [c]], 6, PAD, 2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [0] * 6, [4, 3, 0, 0, 0, 0]]
    # each sample's first label is ignored (8 would be predicted from sample a's last token)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100], [-100] * 6, [-100, 3, -100, -100, -100, -100]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [-1] * 6, [0, 0, -1, -1, -1, -1]]
    assert batch["images"][:, 0, 0, 0].tolist() == [1.0, 2.0]  # row-major image order
    assert int((batch["segment_ids"] == -1).sum()) == 1 + 6 + 4  # padding tokens
    empty = collate_packed([[]], 4, PAD, 2)
    assert empty["images"].shape == (0, 3, 2, 2) and int((empty["segment_ids"] == -1).sum()) == 4
    with pytest.raises(ValueError, match="row 0 holds 8 tokens"):
        collate_packed([[a, a, b]], 6, PAD, 2)


def test_pack_rows_best_fit_decreasing_by_hand():
    lengths = [5, 9, 3, 7, 2, 4]
    # longest first: 9 -> new row, 7 -> new row, 5 -> new row, 4 -> the 5's row (room 5, tightest),
    # 3 -> the 7's row (room 3), 2 -> no row has room 2 -> new row
    rows = pack_rows(lengths, 10)
    assert rows == [[0, 5], [1], [2, 3], [4]]
    assert padding_fraction(lengths, rows, 10) == pytest.approx(10 / 40)
    assert padding_fraction(lengths, [[i] for i in range(6)], 10) == pytest.approx(1 - 30 / 60)
    with pytest.raises(ValueError, match="sample 2 of the packing window is 11 tokens"):
        pack_rows([3, 4, 11], 10)


def test_pack_rows_properties():
    rng = random.Random(0)
    for trial in range(20):
        seq_len = rng.choice([16, 64, 2048])
        lengths = [rng.randint(1, seq_len) if rng.random() < 0.2 else rng.randint(1, seq_len // 4)
                   for _ in range(rng.randint(0, 300))]
        rows = pack_rows(lengths, seq_len)
        flat = sorted(i for row in rows for i in row)
        assert flat == list(range(len(lengths)))  # every sample exactly once
        assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
        assert all(row == sorted(row) for row in rows) and [r[0] for r in rows] == sorted(r[0] for r in rows)
        assert pack_rows(tuple(lengths), seq_len) == rows  # a pure function of its input
        if lengths:  # never worse than one sample per row, and within the bin-packing bound
            assert len(rows) <= len(lengths)
            assert len(rows) >= -(-sum(lengths) // seq_len)


def test_positions_reach_rope():
    """RoPE is relative, so restarting positions changes nothing inside a segment; stretching them
    does: the forward must use the batch's positions, not 0..S-1."""
    _, batch = packed_batch(make_samples())
    model = C.build_model(C.tiny_cfg())
    with torch.no_grad():
        base = run(model, batch, [])
        halved = run(model, dict(batch, positions=batch["positions"] // 2), [])
    diff = (base.logits - halved.logits).abs().amax(-1)  # [B, S]
    real, first = batch["segment_ids"] >= 0, batch["positions"] == 0
    assert diff[real & first].max() == 0  # a sample's first token sees only itself
    assert diff[real & ~first].min() > 5e-6  # the others see other distances (rounding: ~6e-8)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_one_additive_mask_per_forward_in_the_attention_dtype(autocast, monkeypatch):
    """Every layer gets the same mask tensor, already in q's dtype: SDPA would otherwise convert
    a bool mask in each layer and keep every copy for the backward."""
    seen = []
    real = Attention.forward

    def spy(self, x, rope, positions, kv_cache=None, attn_mask=None):
        seen.append(attn_mask)
        return real(self, x, rope, positions, kv_cache, attn_mask)

    monkeypatch.setattr(Attention, "forward", spy)
    _, batch = packed_batch(make_samples())
    model = C.build_model(C.tiny_cfg())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run(model, batch, [])
    assert torch.isfinite(out.logits).all()
    want = torch.where(block_causal_mask(batch["segment_ids"]), 0.0, float("-inf"))
    assert len(seen) == 4 and all(m is seen[0] for m in seen)
    assert seen[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(seen[0].float(), want)

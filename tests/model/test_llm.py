import torch

from megatron_evomoe.config import load_config
from megatron_evomoe.model.llm import Attention, DecoderLM, RotaryEmbedding
from megatron_evomoe.model.mllm import MultimodalLM
from megatron_evomoe.model.modality import IMAGE, TEXT


def tiny_cfg(**kw):
    o = ["--stages=[{name: s}]", "--model.vocab_size=50", "--model.hidden_size=32", "--model.num_heads=4",
         "--model.num_kv_heads=2", "--model.ffn_hidden_size=48", "--model.num_layers=2", "--model.max_seq_len=40",
         "--vision.image_size=16", "--vision.patch_size=8", "--vision.hidden_size=16", "--vision.num_heads=2",
         "--data.seq_len=32"]
    return load_config(None, o + [f"--{k}={v}" for k, v in kw.items()])


def test_gqa_attention_matches_explicit_repeat():
    torch.manual_seed(0)
    attn = Attention(32, 4, 2)
    rope = RotaryEmbedding(8, 16, 10000.0)
    x = torch.randn(2, 10, 32)
    pos = torch.arange(10)
    y = attn(x, rope, pos)
    assert y.shape == (2, 10, 32)
    # reference: explicit head repetition and a manual causal softmax
    q = rope(attn.wq(x).view(2, 10, 4, 8).transpose(1, 2), pos)
    k = rope(attn.wk(x).view(2, 10, 2, 8).transpose(1, 2), pos).repeat_interleave(2, 1)
    v = attn.wv(x).view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), float("-inf"))
    ref = attn.wo((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    lm = DecoderLM(tiny_cfg().model)
    h = torch.randn(1, 12, 32)
    mod = torch.zeros(1, 12, dtype=torch.long)
    a, _ = lm(h, mod)
    h2 = h.clone()
    h2[:, 8:] += 1.0
    b, _ = lm(h2, mod)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_image_splice_and_modality_mask():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = MultimodalLM(cfg, image_token_id=3)
    P = cfg.vision.num_image_tokens  # 4
    ids = torch.tensor([[1, 3, 3, 3, 3, 7, 8, 9], [1, 5, 6, 7, 8, 9, 10, 11]])
    images = torch.randn(1, 3, 16, 16)
    h, mod = model.embed(ids, images)
    assert mod.tolist() == [[TEXT] + [IMAGE] * P + [TEXT] * 3, [TEXT] * 8]
    torch.testing.assert_close(h[0, 1:5], model.image_features(images)[0])
    torch.testing.assert_close(h[1], model.llm.embed(ids[1]))
    out = model(ids, images, labels=ids)
    assert out.logits.shape == (2, 8, 50) and out.num_tokens == 14


def test_image_count_mismatch_is_a_clear_error():
    cfg = tiny_cfg()
    model = MultimodalLM(cfg, image_token_id=3)
    ids = torch.tensor([[1, 3, 3, 3, 3, 7]])
    try:
        model.embed(ids, torch.randn(2, 3, 16, 16))
    except ValueError as e:
        assert "4 image-token positions but 2 images" in str(e)
    else:
        raise AssertionError("expected ValueError")

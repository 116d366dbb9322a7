"""stages/flops.py: hand-computed counts of a tiny config, and the count against torch's FlopCounterMode
on a real forward + backward; the GPU peak table and MFU."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_evomoe.config import load_config
from megatron_evomoe.stages.flops import mfu, peak_tflops, router_flops_per_token, step_flops
from megatron_evomoe.stages.structure import build_model

TEXT_ONLY = ["--stages=[{name: s, moe_mode: sparse}]", "--model.vocab_size=100", "--model.hidden_size=64",
             "--model.num_layers=2", "--model.num_heads=4", "--model.num_kv_heads=2", "--model.ffn_hidden_size=128",
             "--vision.enabled=false", "--moe.num_experts=4", "--moe.top_k=2", "--moe.layers=1",
             "--router.type=linear"]


def test_tiny_config_by_hand():
    cfg = load_config(None, TEXT_ONLY)
    f = step_flops(cfg, num_tokens=32, seq_len=16)
    # per token, forward: C=64, 4 heads of 16 (q width 64), 2 kv heads (k, v width 32), F=128, V=100
    per_token = {
        "attention_proj": 2 * (2 * 64 * (64 + 32 + 32) + 2 * 64 * 64),  # 2 layers x (qkv + o) = 49152
        "attention_scores": 2 * 4 * 16 * 64,  # 2 layers x QK^T + PV over 16 keys = 8192
        "dense_ffn": 6 * 64 * 128,  # layer 0, SwiGLU = 49152
        "moe_experts": 2 * 6 * 64 * 128,  # layer 1, top-2 experts = 98304
        "shared_expert": 0,
        "router": 2 * 64 * 4,  # linear router on layer 1 = 512
        "lm_head": 2 * 64 * 100,  # = 12800
    }
    assert f.terms == {k: 32 * v for k, v in per_token.items()}
    assert f.forward == 32 * 218112
    assert f.total == 3 * 32 * 218112 == 20_938_752
    assert step_flops(cfg, 32, 16, recompute="full").total == 4 * 32 * 218112
    # dense (stage I) and evolve (stage II: FFN1 only) run the MoE-designated layer as the dense FFN
    for mode in ("dense", "evolve"):
        d = step_flops(cfg, 32, 16, moe_mode=mode).terms
        assert d["dense_ffn"] == 32 * 2 * 6 * 64 * 128 and d["moe_experts"] == d["router"] == 0


def test_dtr_router_by_hand():
    cfg = load_config(None, TEXT_ONLY + ["--router.type=dtr", "--router.hyper_hidden_size=16", "--router.rank=8",
                                         "--router.embed_dim=16"])
    # C=64, H=16, 2R=16, R=8, D=16, E=4: W1 z, W2_down z, h.p, b2_down z, W2_up a, h.q, b2_up a, phi e
    macs = 64 * 16 + 64 * 16 * 16 + 16 * 16 + 64 * 16 + 8 * 16 * 16 + 16 * 16 + 8 * 16 + 16 * 4
    assert router_flops_per_token(cfg) == 2 * macs == 42368


VISION_MOE = ["--stages=[{name: s, moe_mode: sparse}]", "--model.vocab_size=50", "--model.hidden_size=64",
              "--model.num_layers=2", "--model.num_heads=4", "--model.num_kv_heads=2", "--model.ffn_hidden_size=96",
              "--model.max_seq_len=32", "--data.seq_len=24", "--vision.image_size=16", "--vision.patch_size=8",
              "--vision.hidden_size=32", "--vision.num_layers=1", "--vision.num_heads=2",
              "--vision.ffn_hidden_size=48", "--vision.cls_token=true", "--moe.num_experts=4", "--moe.top_k=2",
              "--moe.layers=1", "--moe.expert_backend=loop", "--router.backend=torch", "--moe.init=copy",
              "--moe.shared_expert_size=40"]


# Phi-2's decoder: GELU FFN and GELU experts (two matrices each, biases), no shared expert (SwiGLU only)
PHI = ["--model.norm=layernorm", "--model.parallel_residual=true", "--model.ffn_activation=gelu_tanh",
       "--model.mlp_bias=true", "--moe.shared_expert_size=0"]


def test_gelu_experts_by_hand():
    f = step_flops(load_config(None, TEXT_ONLY + PHI), num_tokens=32, seq_len=16).terms
    assert f["dense_ffn"] == 32 * 4 * 64 * 128  # layer 0: fc1 + fc2 = 32768 per token
    assert f["moe_experts"] == 32 * 2 * 4 * 64 * 128  # layer 1: top-2 GELU experts


def test_gelu_expert_parameter_count_by_hand():
    from megatron_evomoe.stages.size import count_parameters
    dense_cfg, moe_cfg = (load_config(None, TEXT_ONLY + PHI + ["--moe.init=copy",
                                                               f"--stages=[{{name: s, moe_mode: {m}}}]"])
                          for m in ("dense", "sparse"))
    dense, moe = count_parameters(dense_cfg)[0], count_parameters(moe_cfg)[0]
    ffn = 2 * 64 * 128 + 128 + 64  # fc1 [F, C] + fc2 [C, F] + their biases
    assert moe["llm"] - dense["llm"] == 4 * ffn - ffn + 64 * 4  # 4 experts replace the FFN, + the router
    assert moe["llm"] - moe["llm_active_per_token"] == 2 * ffn  # top-2 of 4: two experts idle per token


@pytest.mark.parametrize("router,extra", [("dtr", []), ("linear", []), ("linear_per_modality", []), ("linear", PHI)],
                         ids=["dtr", "linear", "linear_per_modality", "phi_gelu_experts"])
def test_matches_flop_counter_on_forward_backward(router, extra):
    """The multimodal model (ViT with a class token, GQA, a MoE layer with a shared expert, or Phi's GELU
    experts) through a real forward + backward under FlopCounterMode. Attention runs on SDPA's math path:
    it is made of bmm's the counter sees (the CPU flash kernel is not in its table) and computes the full
    S x S square, as we count."""
    cfg = load_config(None, VISION_MOE + [f"--router.type={router}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, image_token_id=49, up_to_stage=0)  # loop experts: plain matmuls, exact rows
    B, S, num_images = 2, 24, 2
    ids = torch.randint(0, 49, (B, S))
    ids[:, 2:6] = 49  # 4 image tokens (16 / 8)^2 per sample, one image each
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(ids, torch.randn(num_images, 3, 16, 16), ids)
        (out.lm_loss_sum / out.num_tokens + out.aux_loss).backward()
    want = step_flops(cfg, B * S, S, num_images=num_images)
    # the one gap: the images need no gradient, so the patch convolution's backward computes the
    # weight gradient only (1 x its forward instead of 2 x)
    patch_conv_fwd = num_images * 4 * 2 * 3 * 8 * 8 * 32
    assert counter.get_total_flops() == want.total - patch_conv_fwd
    assert abs(counter.get_total_flops() / want.total - 1) < 0.005


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("Tesla T4") is None
    cfg = load_config(None, TEXT_ONLY)
    f = step_flops(cfg, 32, 16)
    assert mfu(f, 1e-3, 989.0) == pytest.approx(20_938_752 / 1e-3 / 989e12)
    assert f.tflops_per_s(1e-3) == pytest.approx(20_938_752 / 1e-3 / 1e12)
    with pytest.raises(ValueError, match="vision.enabled"):
        step_flops(cfg, 32, 16, num_images=1)

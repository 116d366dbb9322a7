"""A decoder layer whose FFN is a DTR MoE block (router, permute, experts, unpermute, aux loss) under
torch.compile(fullgraph=True): one graph, forward and backward, equal to eager.

fullgraph=True raises on any graph break, and with Dynamo's capture_scalar_outputs and
capture_dynamic_output_shape_ops off every host read (.item(), .tolist(), bool(tensor)) and every
data-dependent shape (bincount, nonzero, repeat_interleave without output_size) would be one: a
compiled graph is a structural proof that the layer never waits on the device."""
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from megatron_evomoe.config import load_config
from megatron_evomoe.model.llm import DecoderLayer, RotaryEmbedding, rotary_dim
from megatron_evomoe.moe.dtr import DynamicTokenRouter
from megatron_evomoe.moe.moe_layer import MoELayer
from megatron_evomoe.moe.upcycling import upcycle_to_moe

B, S, C = 2, 12, 32
NO_HOST_READS = dict(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False)


# Phi-2's layer: LayerNorm, parallel residual, GELU(tanh) FFN with fc1/fc2 biases -> GELU experts with biases
PHI = ("--model.norm=layernorm", "--model.parallel_residual=true", "--model.ffn_activation=gelu_tanh",
       "--model.mlp_bias=true", "--model.qkv_bias=true", "--model.attn_out_bias=true")


def moe_decoder_layer(expert_backend: str, options=()):
    """A decoder layer converted to MoE the way a stage does it (upcycle_to_moe from the config)."""
    cfg = load_config(None, [f"--model.hidden_size={C}", "--model.num_heads=4", "--model.num_kv_heads=2",
                             "--model.ffn_hidden_size=48", "--model.max_seq_len=64", "--moe.num_experts=4",
                             "--moe.top_k=2", "--moe.init=noise", "--moe.aux_loss_coeff=0.1",
                             "--moe.z_loss_coeff=0.01", f"--moe.expert_backend={expert_backend}",
                             "--router.type=dtr", "--router.backend=auto", "--stages=[{name: sparse}]", *options])
    torch.manual_seed(0)
    layer = DecoderLayer(cfg.model, 0)
    layer.mlp = upcycle_to_moe(layer.mlp, cfg, torch.Generator().manual_seed(1))
    assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp.router, DynamicTokenRouter)
    return layer, RotaryEmbedding(rotary_dim(cfg.model), cfg.model.max_seq_len, cfg.model.rope_theta)


def inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, S, C, generator=gen)
    modality = (torch.rand(B, S, generator=gen) < 0.5).long()  # both modalities: both DTR branches run
    assert 0 < int(modality.sum()) < B * S
    return x, modality


def run(fn, module, x, modality):
    """-> (output, aux loss, dL/dx, {name: dL/dparam}) for L = mean(y^2) + aux."""
    x = x.clone().requires_grad_()
    y, aux = fn(x, modality)
    (y.square().mean() + aux).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return y.detach(), aux.detach(), x.grad, grads


def assert_same(compiled, eager):
    (y, aux, dx, grads), (y_ref, aux_ref, dx_ref, grads_ref) = compiled, eager
    assert float(aux_ref) > 0  # the weighted aux + z losses are in the loss
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert g.abs().max() > 0, name  # every parameter, router included, gets a gradient
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def compile_and_check(module, fn_eager, backend):
    x, modality = inputs()
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(**NO_HOST_READS):
        compiled = run(torch.compile(fn_eager, backend=backend, fullgraph=True), module, x, modality)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert_same(compiled, run(fn_eager, module, x, modality))


def test_decoder_layer_with_dtr_moe_is_one_graph_equal_to_eager():
    """The CPU's backends (auto: the CPU extension's permute and grouped GEMM, the PyTorch DTR),
    traced by AOTAutograd (forward and backward graphs)."""
    layer, rope = moe_decoder_layer("auto")
    positions = torch.arange(S)
    compile_and_check(layer, lambda x, mod: layer(x, mod, rope, positions), "aot_eager")


def test_phi_moe_block_with_gelu_bias_experts_is_one_graph_equal_to_eager():
    """The per-row expert biases (each row's expert found on the device) add no host read."""
    layer, _ = moe_decoder_layer("auto", PHI)
    assert layer.mlp.experts.activation == "gelu_tanh" and layer.mlp.experts.b_down is not None
    with torch.no_grad():  # non-zero biases, as an upcycled Phi-2 has
        layer.mlp.experts.b_up.normal_(0.0, 0.3)
        layer.mlp.experts.b_down.normal_(0.0, 0.3)
    compile_and_check(layer.mlp, layer.mlp, "aot_eager")  # (the attention half is the dense Phi's)


def test_moe_block_compiles_with_inductor():
    """The real backend once, on the MoE block alone (the attention half is stock PyTorch), with the
    PyTorch expert backend; one compile worker keeps its cost low on a 2-core CI machine."""
    layer, _ = moe_decoder_layer("torch")
    with torch._inductor.config.patch(compile_threads=1):
        compile_and_check(layer.mlp, layer.mlp, "inductor")

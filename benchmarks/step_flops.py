"""FLOPs of one training step (forward + backward) of the benchmark's MoE decoder, two ways.

`counted_flops`: torch.utils.flop_counter.FlopCounterMode over a real forward + backward. Its
registry knows aten.mm/addmm/bmm and the CUDA attention kernels, not the ops a CPU step runs
for experts and attention, so `FORMULAS` adds them (passed as the counter's custom_mapping, not
registered globally): aten._grouped_mm (Mixtral's default experts), this project's grouped-GEMM
custom ops (forward, dgrad, wgrad) and the CPU flash attention forward/backward. Attention is
counted as torch counts its CUDA kernels: the full S x S score matrix, causal or not.

`hand_flops`: the same count from the configuration, as a cross-check (2 FLOPs per multiply-add;
backward = 2 x forward for every matmul: dgrad + wgrad).
"""
from __future__ import annotations


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._grouped_mm: 2-D x 3-D (rows grouped), 2-D x 2-D (groups along K: the wgrad),
    3-D x 2-D (groups along N), 3-D x 3-D (batched)."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [T, K] x [E, K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2:  # [K, T] x [T, N] -> [E, K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(b_shape) == 2:  # [E, M, K] x [K, N] -> [M, N]
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # [E, M, K] x [E, K, N]


def _rows_times_weight_flop(a_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """megatron_evomoe::grouped_mm(x [T, K], w [E, K, N]) and ::grouped_mm_dgrad(dy [T, N], w)."""
    return 2 * a_shape[0] * w_shape[1] * w_shape[2]


def _wgrad_flop(x_shape, dy_shape, *args, out_shape=None, **kwargs) -> int:
    """megatron_evomoe::grouped_mm_wgrad(x [T, K], dy [T, N]) -> [E, K, N]."""
    return 2 * x_shape[0] * x_shape[1] * dy_shape[1]


def _attention_flop(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash attention forward: QK^T and PV, q [B, H, S, D], k [B, Hkv, Sk, D]."""
    b, h, s, d = q_shape
    return 4 * b * h * s * k_shape[-2] * d


def _attention_backward_flop(grad_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """dQ, dK, dV and dP: twice the forward (torch's convention for its CUDA kernels)."""
    return 2 * _attention_flop(q_shape, k_shape)


def formulas() -> dict:
    import torch
    import megatron_evomoe.ops.grouped_gemm  # noqa: F401  (registers the custom ops)
    aten, ours = torch.ops.aten, torch.ops.megatron_evomoe
    return {aten._grouped_mm: _grouped_mm_flop,
            ours.grouped_mm: _rows_times_weight_flop, ours.grouped_mm_dgrad: _rows_times_weight_flop,
            ours.grouped_mm_wgrad: _wgrad_flop,
            aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flop}


def counted_flops(loss_fn, ids) -> int:
    """FLOPs of loss_fn(ids).backward() as FlopCounterMode counts them (with `formulas()`)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False, custom_mapping=formulas())
    with counter:
        loss_fn(ids).backward()
    return counter.get_total_flops()


def hand_flops(a) -> int:
    """Forward + backward FLOPs from the config `a` (fields as in train_throughput.py's arguments)."""
    tokens, head_dim = a.batch * a.seq, a.hidden // a.heads
    kv = a.kv_heads * head_dim
    per_token_macs = (a.top_k * 3 * a.hidden * a.ffn  # SwiGLU experts: gate, up, down
                      + a.hidden * (a.hidden + 2 * kv + a.hidden)  # q, k, v, o projections
                      + a.hidden * a.experts)  # router
    attention = 4 * a.batch * a.heads * a.seq * a.seq * head_dim  # forward QK^T + PV, full S x S
    forward = a.layers * (2 * tokens * per_token_macs + attention) + 2 * tokens * a.hidden * a.vocab  # + LM head
    return 3 * forward
